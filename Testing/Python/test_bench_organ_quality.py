"""``bench/organ_quality.py --smoke`` runs end to end on tiny synthetic inputs (phantom CT, synthetic
members, no model), so a change that breaks the bench fails CI; its numbers are not results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_organ_quality_bench_smoke(tmp_path):
    out = tmp_path / "oq"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "organ_quality.py"), "--smoke", "--workdir",
                           str(tmp_path / "work"), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["smoke"] and r["alpha"] == 0.2 and r["organs"] == ["node", "vessel"]
    res = r["random"]["5"]
    iv = res["intervals"]["node|dice|0.2"]
    assert iv["n"] > 0 and 0 <= iv["coverage"] <= 1 and 0 < iv["width"] <= 1
    assert res["flags"]["contour|dae|0.2"]["burden_mm3"] > 0 and "voxel|0.2" in res["smallest_burden"]
    assert len(r["shifted"]) == 1 and r["shifted"][0]["per_case"]
    md = out.with_suffix(".md").read_text()
    assert "SMOKE RUN" in md and "bench/organ_quality.py --smoke" in md and "## Shifted splits" in md
