"""Run one per-case function over a cohort of cases, locally or on Ray (``executor.run_cohort``).

- ``executor``: ``ExecutorOptions`` (local | ray, address, retries, workers), ``run_cohort`` and
  the retry / fail policy, ``CohortResult`` (done / skipped / failed).
- ``ray_backend``: a Ray runtime (started here or joined) and the task loop; Ray is imported there only.
- ``progress``: the cohort progress bar and the machine-readable cohort progress lines.
- ``completeness``: is a case's output folder complete for this very job (its summary.json record)?
"""
