"""Cohorts on a real local Ray runtime (2 CPUs, no GPU) against the local executor.

Real OpenKBP CT and labels (128³) with synthetic nnU-Net-style members. One Ray runtime is
shared by the tests of this module (session fixture, shut down at the end); the CLI sees it is
initialised and uses it. ``test_cli_starts_and_stops_its_own_runtime`` runs the console entry
point in a subprocess without a terminal, where the command starts its own runtime, is
interrupted with SIGINT (Ctrl-C) and must leave no Ray process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from CalibUncertaintyLib.cli.main import main
from CalibUncertaintyLib.io.images import read_image
from CalibUncertaintyLib.synthetic.members import make_member_folders

FIT = ["OKBP_train_001", "OKBP_train_002"]
EVAL = ["OKBP_train_009", "OKBP_train_012", "OKBP_train_013"]
RAY = ["--executor", "ray"]
REPO = Path(__file__).resolve().parents[2]


def _session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` other than its leader (what a command started)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()]
    return [int(p) for p, s in rows if int(s) == sid and int(p) != sid]


def _ray_pids(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (e.g. a Ray session's temp folder)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines()
            if marker in line and str(os.getpid()) != line.split(None, 1)[0]]


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    temp = f"/tmp/calibu-ray-test-{os.getpid()}"
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             _temp_dir=temp)
    yield ray
    ray.shutdown()
    deadline = time.time() + 20
    while (_ray_pids(temp) or _ray_pids("ray::")) and time.time() < deadline:
        time.sleep(0.2)
    left = _ray_pids(temp) + _ray_pids("ray::")
    shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"Ray processes left running after shutdown: {left}"


@pytest.fixture(scope="module")
def cohort(openkbp_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    members = [str(d) for d in make_member_folders(openkbp_dir / "labelsTr", root / "pred", FIT + EVAL,
                                                   n_members=3, seed=0)]
    return {"root": root, "members": members, "images": str(openkbp_dir / "imagesTr"),
            "labels": str(openkbp_dir / "labelsTr")}


def _maps(c, out, *extra, members=None, cases=EVAL):
    return main(["maps", "--members", *(members or c["members"]), "--images", c["images"], "--cases", *cases,
                 "-o", str(out), *extra])


def _same_case_folders(a: Path, b: Path, cases) -> None:
    for case in cases:
        files = sorted(p.name for p in (a / case).iterdir())
        assert files == sorted(p.name for p in (b / case).iterdir())
        for name in files:
            if name.endswith(".nii.gz"):
                (x, gx), (y, gy) = read_image(a / case / name), read_image(b / case / name)
                assert x.dtype == y.dtype and np.array_equal(x, y), f"{case}/{name} differs"
                assert gx.mismatch(gy) is None
        ra, rb = (json.loads((d / case / "regions.json").read_text()) for d in (a, b))
        assert ra == rb
        sa, sb = (json.loads((d / case / "summary.json").read_text()) for d in (a, b))
        for s in (sa, sb):
            s.pop("timings_s")
        assert sa == sb


def test_maps_on_ray_equal_local_then_rerun_skips(cohort, ray_local, capsys):
    root = cohort["root"]
    assert _maps(cohort, root / "maps_local") == 0
    assert _maps(cohort, root / "maps_ray", *RAY) == 0
    _same_case_folders(root / "maps_local", root / "maps_ray", EVAL)
    top = json.loads((root / "maps_ray" / "summary.json").read_text())
    assert top["executor"] == "ray" and top["done"] == EVAL and top["skipped"] == [] and top["failed"] == []
    stamps = {c: (root / "maps_ray" / c / "summary.json").stat().st_mtime_ns for c in EVAL}
    capsys.readouterr()
    assert _maps(cohort, root / "maps_ray", *RAY) == 0  # rerun: every case is complete
    assert "0 done, 3 skipped" in capsys.readouterr().out
    top = json.loads((root / "maps_ray" / "summary.json").read_text())
    assert top["done"] == [] and top["skipped"] == EVAL and [c["case"] for c in top["cases"]] == EVAL
    assert stamps == {c: (root / "maps_ray" / c / "summary.json").stat().st_mtime_ns for c in EVAL}
    # other options are another job: the same folder is recomputed, not skipped
    assert _maps(cohort, root / "maps_ray", *RAY, "--dae-sigma-mm", "3", cases=EVAL[:1]) == 0
    top = json.loads((root / "maps_ray" / "summary.json").read_text())
    assert top["done"] == [EVAL[0]] and top["skipped"] == []


def test_summary_record_not_folder_existence_decides_skip(cohort, ray_local):
    out = cohort["root"] / "maps_ray_partial"
    assert _maps(cohort, out, *RAY, cases=EVAL[:2]) == 0
    (out / EVAL[0] / "map_dae.nii.gz").unlink()  # folder exists, a listed file does not
    os.makedirs(out / EVAL[2])  # folder exists, no summary
    assert _maps(cohort, out, *RAY) == 0
    top = json.loads((out / "summary.json").read_text())
    assert top["done"] == [EVAL[0], EVAL[2]] and top["skipped"] == [EVAL[1]]
    assert (out / EVAL[0] / "map_dae.nii.gz").is_file()


def test_fit_and_evaluate_on_ray_equal_local(cohort, ray_local, monkeypatch):
    import CalibUncertaintyLib.pipeline.evaluate as evaluate_mod

    # a "large cohort" for the curve samples that travel to the driver: 30000 voxels in all
    monkeypatch.setattr(evaluate_mod, "CURVE_TOTAL_VOXELS", 30_000)
    monkeypatch.setattr(evaluate_mod, "CURVE_MIN_VOXELS", 1_000)
    c, root = cohort, cohort["root"]
    cals = {}
    for name, extra in (("local", []), ("ray", RAY)):
        cals[name] = root / f"cal_{name}.json"
        assert main(["fit-temperature", "--members", *c["members"], "--images", c["images"], "--labels", c["labels"],
                     "--cases", *FIT, "--max-voxels", "20000", "--method", "temperature", "-o", str(cals[name]),
                     *extra]) == 0
    a, b = (json.loads(p.read_text()) for p in cals.values())
    assert a["temperature"] == b["temperature"] and a["temperature"] != 1.0
    assert a["nll_before"] == b["nll_before"] and a["nll_after"] == b["nll_after"]
    assert a["thresholds"] == b["thresholds"] and a["ebcu_threshold"] == b["ebcu_threshold"]
    assert a["extra"]["other_ensemble_mode"] == b["extra"]["other_ensemble_mode"]

    evs = {}
    for name, extra in (("local", []), ("ray", RAY)):
        out = root / f"eval_{name}"
        assert main(["evaluate", "--members", *c["members"], "--images", c["images"], "--labels", c["labels"],
                     "--calibration", str(cals["local"]), "--cases", *EVAL, "-o", str(out), *extra]) == 0
        evs[name] = json.loads((out / "evaluation.json").read_text())
    lo, ra = evs["local"], evs["ray"]
    assert [r["case"] for r in ra["per_case"]] == EVAL and ra["cohort"]["done"] == EVAL
    assert lo["options"]["curve_max_voxels"] == ra["options"]["curve_max_voxels"] == 10_000

    def close(x, y, where):
        if isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                close(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                close(u, v, f"{where}[{i}]")
        elif isinstance(x, float):
            assert y is not None and abs(x - y) <= 1e-9, f"{where}: {x} != {y}"
        else:
            assert x == y, where

    for rec in lo["per_case"] + ra["per_case"]:
        rec.pop("time_s")
    for key in ("per_case", "reliability", "cohort_ece", "ueo_curves", "budget_curves", "case_quality", "aggregate"):
        close(lo[key], ra[key], key)
    # cohort report: per-case table in review order (the default priority first: the largest share of
    # the predicted foreground flagged by the regions map)
    import csv

    rows = list(csv.DictReader((root / "eval_ray" / "case_quality.csv").open()))
    assert [int(r["review_rank"]) for r in rows] == [1, 2, 3]
    u = [float(r["fraction_fg_flagged"]) for r in rows]
    assert u == sorted(u, reverse=True)
    report = (root / "eval_ray" / "report.md").read_text()
    assert "in review order" in report and report.index(rows[0]["case"]) < report.index(rows[-1]["case"])
    assert (root / "eval_ray" / "reliability_roi.png").is_file()
    # the cohort ECE is the ECE of the summed bins, not the mean of the per-case ECEs
    per_case_mean = np.mean([r["metrics"]["after"]["roi"]["ece_top"] for r in lo["per_case"]])
    assert lo["cohort_ece"]["after_roi"] != pytest.approx(per_case_mean, abs=1e-12)


def test_corrupt_member_fails_one_case_others_complete(cohort, ray_local, tmp_path, capsys):
    members = []
    for d in map(Path, cohort["members"]):
        shutil.copytree(d, tmp_path / "m" / d.name)
        members.append(str(tmp_path / "m" / d.name))
    bad = Path(members[1]) / f"{EVAL[1]}.npz"
    data = bytearray(bad.read_bytes())  # damaged in the middle: headers (checked up front) intact,
    mid = len(data) // 2                 # the probabilities unreadable (CRC / zlib error on load)
    data[mid:mid + 4096] = bytes(4096)
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    capsys.readouterr()
    assert _maps(cohort, out, *RAY, "--max-retries", "1", members=members) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and EVAL[1] in err and "2 case(s) are complete" in err
    top = json.loads((out / "summary.json").read_text())
    assert top["done"] == [EVAL[0], EVAL[2]] and [f["case"] for f in top["failed"]] == [EVAL[1]]
    assert top["failed"][0]["error"]
    assert sorted(p.name for p in out.iterdir()) == sorted([EVAL[0], EVAL[2], "summary.json"])


def test_worker_killed_mid_case_is_retried(cohort, ray_local, tmp_path):
    """SIGKILL the worker process running a case: Ray retries the task and every case completes."""
    from CalibUncertaintyLib.cohort.executor import ExecutorOptions
    from CalibUncertaintyLib.io.nnunet_outputs import pair_cases
    from CalibUncertaintyLib.pipeline.case import CaseOptions
    from CalibUncertaintyLib.pipeline.maps_job import run_maps

    killed, stop = [], threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            for pid in _ray_pids("ray::_cohort_case"):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
                break
            time.sleep(0.02)

    pairing = pair_cases(cohort["members"], cohort["images"], None, EVAL[:2])
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        names = [Path(d).name for d in cohort["members"]]
        result = run_maps(pairing, None, CaseOptions(n_members=3, member_names=names), tmp_path / "out",
                          ExecutorOptions(kind="ray", max_retries=2))
    finally:
        stop.set()
        thread.join()
    assert killed, "no worker was seen running a case"
    assert result.failed == {} and sorted(result.done) == EVAL[:2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == EVAL[:2]  # no partial folder left
    _same_case_folders(cohort["root"] / "maps_local", tmp_path / "out", EVAL[:2])


def test_cli_starts_and_stops_its_own_runtime(cohort, tmp_path):
    """The console entry point with no terminal: it starts its own Ray runtime, Ctrl-C (SIGINT)
    while the first case runs stops it with exit code 130, only complete cases are left, and
    no process of its runtime survives. (The signal goes at the first case's start, not after its
    end: on a loaded machine this reader lags the command, which could finish every case before a
    later signal arrived.)"""
    env = {**os.environ, "CALIBU_PROGRESS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "CalibUncertaintyLib.cli.main", "maps", "--members", *cohort["members"],
           "--images", cohort["images"], "--cases", *EVAL, "-o", str(out), *RAY, "--workers", "1"]
    # SIGINT as a terminal's Ctrl-C finds it: a pytest-xdist worker ignores SIGINT, and an ignored
    # signal stays ignored in the processes it starts (Python then installs no KeyboardInterrupt)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, seen_runtime = [], False
    try:
        for line in proc.stderr:
            lines.append(line)
            if '"stage": "cohort"' in line and '"event": "started"' in line:
                seen_runtime = seen_runtime or len(_session_pids(proc.pid)) >= 3  # GCS, raylet, worker ...
                proc.send_signal(signal.SIGINT)
                break
        rest_err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, "".join(lines) + rest_err
    assert seen_runtime, "the command's Ray processes were not found while it ran"
    assert "interrupted" in rest_err
    left = [p.name for p in out.iterdir() if not p.name.startswith(".")] if out.exists() else []
    for case in left:
        summary = json.loads((out / case / "summary.json").read_text())
        assert all((out / case / f).is_file() for f in summary["files"])
    assert len(left) < len(EVAL)
    deadline = time.time() + 20
    while _session_pids(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _session_pids(proc.pid), "the command's Ray runtime left processes running"


def test_predict_on_ray_equals_local(ray_local, openkbp_dir, tmp_path):
    """predict's per-case function on Ray workers (each loads the tiny real nnU-Net model once)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_nnunet import build_tiny_model_folder, write_test_ct

    model = build_tiny_model_folder(tmp_path / "model", folds=(0, 1))
    cts = sorted((openkbp_dir / "imagesTr").glob("*_0000.nii.gz"))[:2]
    images = tmp_path / "images"
    for i, ct in enumerate(cts):
        write_test_ct(images / f"hn_{i}_0000.nii.gz", source_ct=ct, shape_zyx=(18, 40, 36))
    outs = {}
    for name, extra in (("local", []), ("ray", RAY)):
        outs[name] = tmp_path / f"pred_{name}"
        assert main(["predict", "-i", str(images), "-m", str(model), "-o", str(outs[name]), "--no-tta",
                     "--device", "cpu", *extra]) == 0
    top = json.loads((outs["ray"] / "summary.json").read_text())
    assert top["executor"] == "ray" and top["done"] == ["hn_0", "hn_1"] and top["device"] == "cpu"
    for case in ("hn_0", "hn_1"):
        for f in sorted(p.name for p in (outs["local"] / case).glob("*.nii.gz")):
            a, _ = read_image(outs["local"] / case / f)
            b, _ = read_image(outs["ray"] / case / f)
            assert np.array_equal(a, b), f"{case}/{f}"


def test_fit_from_model_runs_member_inference_on_ray(ray_local, tmp_path, capsys):
    """fit-temperature --model: the members' inference is one Ray task per case (per-case function
    ``nnunet.member_cache.predict_case_members``); cache, markers and calibration equal local's."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_nnunet import build_tiny_model_folder, write_test_ct
    from CalibUncertaintyLib.io.images import write_image

    model = build_tiny_model_folder(tmp_path / "model", folds=(0, 1))
    images, labels = tmp_path / "images", tmp_path / "labels"
    shape = (14, 36, 32)
    for i, case in enumerate(("c0", "c1")):
        ct = write_test_ct(images / f"{case}_0000.nii.gz", shape_zyx=shape, rotation_deg=20.0 + 15 * i)
        _, geometry = read_image(ct)
        lab = np.zeros(shape, np.uint8)
        lab[4:10, 8 + i:24, 6:20] = 1
        lab[5:9, 12:18, 22:28] = 2
        write_image(labels / f"{case}.nii.gz", lab, geometry)
    cals, caches = {}, {}
    for name, extra in (("local", []), ("ray", RAY)):
        cals[name], caches[name] = tmp_path / f"cal_{name}.json", tmp_path / f"cache_{name}"
        assert main(["fit-temperature", "-m", str(model), "--images", str(images), "--labels", str(labels),
                     "--no-tta", "--device", "cpu", "--member-cache", str(caches[name]), "-o", str(cals[name]),
                     *extra]) == 0
        assert "4 output(s) computed on cpu, 0 reused" in capsys.readouterr().out
    a, b = (json.loads(p.read_text()) for p in cals.values())
    assert a["temperature"] == b["temperature"] and a["thresholds"] == b["thresholds"]
    npz = {name: sorted(caches[name].rglob("*.npz")) for name in caches}
    assert [p.relative_to(caches["local"]) for p in npz["local"]] == [p.relative_to(caches["ray"]) for p in npz["ray"]]
    assert len(npz["ray"]) == 4
    for p, q in zip(npz["local"], npz["ray"]):
        x, y = np.load(p)["probabilities"], np.load(q)["probabilities"]
        assert np.array_equal(x, y), p.name
    assert main(["fit-temperature", "-m", str(model), "--images", str(images), "--labels", str(labels),
                 "--no-tta", "--device", "cpu", "--member-cache", str(caches["ray"]), "-o", str(cals["ray"]),
                 *RAY]) == 0
    assert "0 output(s) computed, 4 reused" in capsys.readouterr().out  # markers recorded each case
