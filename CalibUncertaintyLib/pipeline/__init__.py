"""From ensemble members to reviewable outputs: per-case processing, fitting, evaluation.

- ``case.process_case``: members of one case -> ``<out>/<case>/`` (seg, calibrated probabilities,
  maps, regions.json, summary.json), written atomically.
- ``fit.fit_calibration``: calibration cases -> a ``CalibrationFile`` (T, τ* per map, EBCU t).
- ``evaluate.evaluate_cases`` / ``evaluate.write_evaluation``: metrics before and after
  calibration, error detection, plots and report.md.
- ``maps_job.run_maps`` / ``predict_job.run_predict``: a cohort of cases through the per-case
  function (``maps_case`` / ``predict_case``) on the local executor or Ray (``cohort.executor``),
  skipping cases already complete.
- ``dataset``: labels, fingerprint and calibration-file checks on top of ``io.nnunet_outputs``.
- ``folder_index.update_folder_index``: the output folder's top-level summary.json, merged
  with the cases already there (called once after a run's cases are done).

Modules are imported on use (``from CalibUncertaintyLib.pipeline.case import process_case``).
"""
