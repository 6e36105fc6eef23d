"""Figures keep their look after another library changed matplotlib's global style in the same
process (nnU-Net's logger calls ``seaborn.set(font_scale=2.5)``): report/style.py."""

import matplotlib as mpl
import numpy as np
import pytest
from matplotlib.image import imread

from CalibUncertaintyLib.report import plots
from CalibUncertaintyLib.report.style import STYLE

seaborn = pytest.importorskip("seaborn", reason="seaborn comes with nnunetv2; without it nothing changes the style")

ROWS = [{"lo": i / 10, "hi": (i + 1) / 10, "count": 10 * i + 1, "accuracy": i / 10, "mean_confidence": i / 10 + 0.04}
        for i in range(10)]


def _draw(path, monkeypatch):
    sizes = {}
    real_save = plots._save

    def spy(fig, p):
        ax = fig.axes[0]
        fig.canvas.draw()
        sizes["tick"] = ax.get_yticklabels()[0].get_fontsize()
        sizes["label"] = ax.yaxis.label.get_fontsize()
        sizes["grid"] = any(line.get_visible() for line in ax.get_xgridlines())
        return real_save(fig, p)

    monkeypatch.setattr(plots, "_save", spy)
    plots.reliability_diagram(path, {"before": ROWS, "after": ROWS}, title="t")
    return sizes, imread(path)


def test_figures_ignore_seaborn_font_scale(tmp_path, monkeypatch):
    clean_sizes, clean_png = _draw(tmp_path / "clean.png", monkeypatch)
    assert clean_sizes["tick"] == STYLE["ytick.labelsize"] and clean_sizes["label"] == STYLE["axes.labelsize"]
    with mpl.rc_context():  # give the global style back after the test
        seaborn.set(font_scale=2.5)
        assert mpl.rcParams["xtick.labelsize"] > 2 * STYLE["xtick.labelsize"]  # seaborn did change it
        dirty_sizes, dirty_png = _draw(tmp_path / "after_seaborn.png", monkeypatch)
        assert mpl.rcParams["xtick.labelsize"] > 2 * STYLE["xtick.labelsize"]  # and it is left as it was
    assert dirty_sizes == clean_sizes
    assert np.array_equal(clean_png, dirty_png)  # the very same pixels
