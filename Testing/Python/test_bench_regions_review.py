"""bench/regions_review.py --smoke: the regions bench runs end to end on tiny phantom cases (the
real run, on the stock model and OpenKBP CT, is in bench/results/regions_review.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_regions_review_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "regions_review.py"), "--smoke",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "regions_review.json").read_text())
    after, before = run["pooled"]["after"], run["pooled"]["before"]
    # after the change every top region fits one view and the views jump inside it
    assert after["fit_view"] == 1.0 and after["jump_inside"] == 1.0
    assert after["max_extent_mm"] <= run["options"]["max_extent_mm"]
    # the phantom's uncertain shell is one component longer than a view before the change
    assert before["max_extent_mm"] > run["options"]["max_extent_mm"]
    assert 0.0 <= after["held"] <= 1.0 and after["in_view"] >= before["in_view"]
    text = (tmp_path / "regions_review.md").read_text()
    assert "| true error volume held by the top 10 regions |" in text and "--smoke" in text
