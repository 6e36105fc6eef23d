"""Every bench runs (issue 18): each ``bench/`` script in its smoke mode on tiny inputs.

A change to the library that breaks a benchmark (a renamed function, a new return value, a changed
file layout) fails here, so the commands behind ``bench/results`` and the README's numbers keep
running. Tiny inputs (``bench/_tiny_inputs.py``): five real OpenKBP cases cropped to 24 x 40 x 48
voxels around their organs, a 20 x 32 x 32 crop of the abdominal OOD CT, and a random-weight
two-fold nnU-Net model folder of the OpenKBP classes; the benches that read a model folder share one
member cache (the product's ``--member-cache``), computed once. Each bench writes its report into a
temporary folder (never ``bench/results``) and the test checks the report's key lines.

Benches run in this process through their ``main(argv)`` (the imports are shared) except those
whose design is a process per variant (they start their own). Smoke options that leave something
out, and why (suite time, each part tested elsewhere or pinned):

- ``bench/gpu_check.sh`` is not run (needs an NVIDIA GPU); its comparison script runs as
  ``gpu_equivalence.py --device cpu`` (the CPU dry run of the same comparisons).
- the training steps of ``bench/openkbp.py`` / ``openkbp_local.py`` are not run (nnU-Net training on
  the CPU takes minutes; the same ``nnunet.training`` functions are exercised by
  ``test_snapshot_training.py`` and the ``tiny_trained_model`` fixture): their smoke runs take
  ``--model-folder`` and run every step after training.
- ``predict_vs_nnunet.py --skip-nnunet``: predict's process only; ``nnUNetv2_predict`` and its worker
  processes would cost about 30 s of imports (nnunetv2 is pinned; its command line does not change).
- ``many_classes.py --skip-full --smoke``: the post-processing comparison in this process rather
  than in fresh ones (no memory numbers), no whole runs (``predict_vs_nnunet.py`` covers one).
- ``cohort.py --executors local``: no Ray runtime (``test_cohort_ray.py`` starts one).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
for p in (REPO, BENCH):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, openkbp_dir, ood_ct_path):
    import _tiny_inputs as ti

    root = tmp_path_factory.mktemp("bench_smoke")
    ds = ti.tiny_openkbp(openkbp_dir, root / "data", n_cases=5)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (ds / "labelsTr").glob("*.nii.gz"))
    ood = ti.tiny_ct(ood_ct_path, root / "abdomen_0000.nii.gz")
    names = [n for n, _ in sorted(json.loads((ds / "dataset.json").read_text())["labels"].items(),
                                  key=lambda kv: kv[1])]
    model = ti.tiny_model(root / "model", n_classes=len(names), folds=(0, 1), class_names=names)
    return SimpleNamespace(root=root, data=ds, cases=cases, ood=ood, model=model, cache=root / "member_cache",
                           results=root / "results")


def _run(main, argv):
    rc = main(argv)
    assert rc in (0, None), f"{main.__module__} {argv} returned {rc}"


def test_small_benches_run(tmp_path, capsys):
    """temperature_fit, spatial_maps_cost, roi, maps (both modes), import_memory."""
    import import_memory
    import maps
    import roi
    import spatial_maps_cost
    import temperature_fit

    _run(temperature_fit.main, ["--n", "20000", "--reference"])
    out = capsys.readouterr().out
    assert "fit (Newton on 1/T)" in out and "|Δ log T|" in out
    spatial_maps_cost.main(["2", "5.0"])
    out = capsys.readouterr().out
    assert "ROI (15 mm)" in out and "EBCU" in out
    _run(roi.main, ["--shape", "12", "48", "48"])
    assert "masks equal: True" in capsys.readouterr().out
    _run(maps.main, ["--shape", "6", "24", "24", "--members", "2"])
    out = capsys.readouterr().out
    assert "streaming" in out and "naive" in out and "max relative difference" in out
    _run(maps.main, ["--ebcu", "--shape", "6", "24", "24"])
    assert "FFT vs EBCU max abs difference" in capsys.readouterr().out
    _run(import_memory.main, ["--smoke"])
    assert "MiB" in capsys.readouterr().out


def test_conformal_synthetic_and_ebcu_study(tiny):
    """conformal_openkbp.py with synthetic members (its default), then ebcu_study.py on its work folder."""
    import conformal_openkbp
    import ebcu_study

    work, res = tiny.root / "conformal_synthetic", tiny.root / "results_synthetic"
    _run(conformal_openkbp.main, ["--data", str(tiny.data), "--n-cal", "3", "--n-test", "2", "--splits", "2",
                                  "--workdir", str(work), "--results", str(res)])
    text = (res / "conformal_openkbp.md").read_text()
    assert "## synthetic/temperature" in text and "| entropy | 0.3 |" in text and "### Error detection per map" in text
    rec = json.loads((res / "conformal_openkbp.json").read_text())
    assert rec["alphas"] == [0.3] and rec["runs"]["synthetic/temperature"]["resampled"]["flags"]["dae"]["0.3"]["miss"]
    _run(ebcu_study.main, ["--data", str(tiny.data), "--workdir", str(work), "--results", str(res)])
    assert "Largest non-boundary recall at the budget" in (res / "ebcu_study.md").read_text()


def test_model_folder_benches(tiny):
    """triage_openkbp, conformal_openkbp, openkbp_local and openkbp with --model-folder: one member
    cache (computed by the first), the same tiny model and cases."""
    import conformal_openkbp
    import openkbp
    import openkbp_local
    import triage_openkbp

    common = ["--model-folder", str(tiny.model), "--data", str(tiny.data), "--member-cache", str(tiny.cache),
              "--cases", *tiny.cases, "--results", str(tiny.results)]
    _run(triage_openkbp.main, [*common, "--ood", str(tiny.ood), "--n-cal", "3", "--splits", "1", "--configs",
                               "deep", "--method", "temperature", "--workdir", str(tiny.root / "triage")])
    text = (tiny.results / "triage_stock.md").read_text()
    assert "## deep (2 member(s)" in text and "| organ_volume_atypicality |" in text and "| mean_u_roi[dae] |" in text
    _run(conformal_openkbp.main, [*common, "--n-cal", "3", "--splits", "2", "--configs", "deep", "--methods",
                                  "temperature", "--workdir", str(tiny.root / "conformal")])
    text = (tiny.results / "conformal_stock.md").read_text()
    assert "## deep/temperature" in text and "### Product path, shifted split" in text
    assert "### What a tighter guarantee needs (dae flags" in text
    _run(openkbp_local.main, [*common, "--ood", str(tiny.ood), "--n-cal", "3", "--splits", "1", "--configurations",
                              "deep", "--max-voxels-per-case", "3000", "--no-loco", "--workdir", str(tiny.root / "local")])
    text = (tiny.results / "openkbp_local_stock.md").read_text()
    assert "| local T(x), open bin fitted beyond the ROI **(default)** |" in text and "beats global T" in text
    _run(openkbp.main, [*common, "--n-cal", "3", "--configs", "deep", "--workdir", str(tiny.root / "openkbp")])
    text = (tiny.results / "openkbp_stock.md").read_text()
    assert "trained model folder" in text and "## Temperature scaling (test cases, inside the ROI)" in text
    cached = json.loads(next(tiny.cache.glob("*/notta/fold_0_checkpoint_final/.calibu_member.json")).read_text())
    assert set(tiny.cases) | {"abdomen"} == set(cached["cases"])  # every bench read the one cache


def test_cohort_and_many_classes(tiny, capsys):
    """cohort.py (local executor) on the tiny cases; many_classes.py on a 64 x 64 x 8 CT, K = 3."""
    import cohort
    import many_classes

    _run(cohort.main, ["--data", str(tiny.data), "--cases", "2", "--members", "2", "--executors", "local",
                       "--work", str(tiny.root / "cohort")])
    assert "Estimate for 1,000 CTs" in capsys.readouterr().out
    _run(many_classes.main, ["--k", "3", "--slices", "8", "--inplane", "64", "--folds", "0", "--skip-full", "--smoke",
                             "--work", str(tiny.root / "many"), "--ct", str(next((tiny.data / "imagesTr").iterdir()))])
    out = capsys.readouterr().out
    assert "export cpu s" in out and "\n  3 " in out


def test_predict_vs_nnunet_and_gpu_equivalence_on_cpu(tiny, capsys):
    """predict_vs_nnunet.py (tiny random-weight model, both tools as processes); gpu_equivalence.py's
    CPU dry run."""
    import gpu_equivalence
    import predict_vs_nnunet

    ct = next((tiny.data / "imagesTr").iterdir())
    _run(predict_vs_nnunet.main, ["--ct", str(ct), "--tiny-folds", "1", "--no-tta", "--skip-nnunet", "--json",
                                  str(tiny.root / "pvn.json")])
    out = capsys.readouterr().out
    assert "calib-uncertainty predict" in out and "predict's own timings (summary.json)" in out
    _run(gpu_equivalence.main, ["--device", "cpu", "--ct", str(ct), "--shape", "16", "32", "32",
                                "--fallback-shape", "16", "32", "32"])
    assert "all equal" in capsys.readouterr().out
