"""ReviewController: the Qt-free logic behind the module's display section and region table.

The widget calls only this class. It owns which overlay is shown (slice-composite foreground),
its opacity and threshold (the layer's display node), and navigation through the error regions
of regions.json (METHODS.md section 5: parts of the connected components of {U > τ*} in the ROI
that each fit one view, ranked by volume × mean U), which jumps every slice view of the Red
view's view group (Slicer's ``JumpAllSlices``) to each region's jump point (its most uncertain
part, a voxel of the region; the centroid for folders written before jump points existed) and
shows only that region's markup and label (``nodes.show_current_region``: labels never collide).

The review state (shown layer, opacity, threshold per layer, current region) is written on the
case's segmentation node after every change (case_record.py), so a saved scene brings it back:
:meth:`ReviewController.restore` rebuilds the controller from a loaded scene.

A layer node the user deletes is dropped (:meth:`prune_removed`); asking for it again raises
InputError (a class probability is read again from its file when the file is still there).

Navigation wraps: ``next_region()`` after the last region goes to the first and
``previous_region()`` before the first goes to the last (a reviewer cycling through a short
list expects that). With no regions both return None and nothing moves.

Listeners: ``add_listener(callback)`` registers ``callback(event, value)``, called after each
change with event one of "foreground" (layer name), "opacity" (float), "threshold" ((lo, hi)),
"region" (index). It returns a function that removes the listener.
"""

from __future__ import annotations

import logging
import math

from ..errors import InputError
from .case_folder import Region
from .case_record import load_review_state, restore_case_nodes, save_review_state
from .nodes import show_current_region
from .overlay_display import apply_overlay_range, legend as overlay_legend, show_contours_only, show_filled
from .slice_jump import (DEFAULT_SLICE_NODE_IDS, composite_node_for, ensure_slice_views,
                         jump_view_group_to_ras, view_group_slice_nodes)

log = logging.getLogger(__name__)


class ReviewController:
    """Display and region navigation for one loaded case (a CaseNodes from nodes.load_case_outputs)."""

    def __init__(self, scene, case_nodes, slice_node_ids=DEFAULT_SLICE_NODE_IDS, wrap: bool = True):
        self.scene = scene
        self.case = case_nodes
        self.wrap = wrap
        if tuple(slice_node_ids) == DEFAULT_SLICE_NODE_IDS:
            ensure_slice_views(scene)
        self.slice_nodes = []
        for sid in slice_node_ids:
            node = scene.GetNodeByID(sid)
            if node is None:
                raise InputError(f"no slice node {sid!r} in the scene")
            self.slice_nodes.append(node)
        self.view_group = self.slice_nodes[0].GetViewGroup()
        self._listeners = []
        self.current_map: str | None = None
        self.current_region_index: int | None = None
        self.opacity = 0.6
        self._thresholds = {}                      # layer -> (lo, hi) as last set
        self._restoring = False
        ct = case_nodes.input_volume
        if ct is not None and ct.GetScene() is scene:
            for comp in self.composite_nodes:
                comp.SetBackgroundVolumeID(ct.GetID())

    @property
    def composite_nodes(self) -> list:
        """Slice-composite nodes of the managed views and of every other slice view of their
        view group (a layout may have more than Red, Yellow and Green)."""
        nodes = list(self.slice_nodes)
        for n in view_group_slice_nodes(self.scene, self.view_group):
            if n not in nodes:
                nodes.append(n)
        return [composite_node_for(self.scene, n) for n in nodes]

    # --- saved state --------------------------------------------------------------------
    def state(self) -> dict:
        """What a saved scene keeps of this review (JSON-serialisable)."""
        return {"map": self.current_map, "opacity": self.opacity,
                "thresholds": {k: list(v) for k, v in self._thresholds.items()},
                "region": self.current_region_index}

    def _save_state(self) -> None:
        if not self._restoring and self.case.segmentation is not None:
            save_review_state(self.case.segmentation, self.state())

    def save_state(self) -> None:
        """Write the review state on the case's segmentation node now (after previews)."""
        self._save_state()

    @classmethod
    def restore(cls, scene, case_nodes=None, map_name: str | None = None, opacity: float | None = None,
                threshold: tuple | None = None, region: int | None = None, **kwargs) -> "ReviewController":
        """A controller for a case brought back by a loaded scene, showing the review as it was saved.

        ``case_nodes`` defaults to the scene's first recorded case (case_record.restore_case_nodes).
        The recorded state is applied; the keyword values (e.g. the module's parameter node) win
        over it where given. A saved layer that is no longer available falls back to the first map,
        shown with that map's own range (its recorded threshold, else its default): ``threshold``
        belongs to the saved layer and is never put on another one.
        """
        case = case_nodes if case_nodes is not None else restore_case_nodes(scene)
        ctl = cls(scene, case, **kwargs)
        saved = load_review_state(case.segmentation)
        ctl._restoring = True
        try:
            for name, (lo, hi) in (saved.get("thresholds") or {}).items():
                if name in case.default_shown:
                    ctl._thresholds[name] = (float(lo), float(hi))
            op = opacity if opacity is not None else saved.get("opacity")
            ctl.set_opacity(0.6 if op is None else op)
            names = ctl.map_names()
            wanted = map_name or saved.get("map")
            if wanted in names:
                ctl.set_foreground_map(wanted)
            elif names:
                ctl.set_foreground_map(names[0])
            if threshold is not None and ctl.current_map is not None and ctl.current_map == wanted:
                ctl.set_threshold(*threshold)
            i = region if region is not None else saved.get("region")
            if i is not None and 0 <= int(i) < len(case.regions):
                ctl.go_to_region(int(i))
        finally:
            ctl._restoring = False
        ctl._save_state()
        return ctl

    def prune_removed(self) -> list[str]:
        """Forget layers whose node the user deleted from the scene; returns their names. The
        shown layer becomes None when it was one of them."""
        gone = [n for n, node in self.case.layers().items() if node.GetScene() is not self.scene]
        for name in gone:
            if name in self.case.maps:
                del self.case.maps[name]
            else:
                del self.case.probabilities[name[len("prob_"):]]
        if self.current_map in gone and self.current_map not in self.map_names():
            self.current_map = None
            show_filled(self.case)              # no overlay any more: Slicer's default fill again
        if gone:
            self._save_state()
        return gone

    # --- listeners ---------------------------------------------------------------------
    def add_listener(self, callback):
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def _notify(self, event: str, value) -> None:
        for cb in list(self._listeners):
            try:
                cb(event, value)
            except Exception:                      # a broken listener must not break the review
                log.exception("review listener failed on %s", event)

    # --- layers ------------------------------------------------------------------------
    def map_names(self) -> list[str]:
        """Selectable overlays: the map names (MAP_NAMES order), then ``prob_<Class>`` for every
        class (a probability volume is loaded when first shown)."""
        return self.case.layer_names()

    def layer_node(self, name: str):
        return self.case.layer_node(self.scene, name)

    def _known(self, name: str) -> None:
        if name not in self.case.layer_names():
            raise InputError(f"no overlay named {name!r}; available: {', '.join(self.case.layer_names())}")

    def set_foreground_map(self, name: str) -> None:
        """Show layer ``name`` as the foreground of every managed view, at the current opacity,
        with its threshold (the last one set for it, else its default). The case segmentation
        and the margins are shown as outlines from now on (overlay_display.py: a fill would be
        drawn over the overlay and hide it)."""
        node = self.layer_node(name)
        for comp in self.composite_nodes:
            comp.SetForegroundVolumeID(node.GetID())
            comp.SetForegroundOpacity(self.opacity)
        show_contours_only(self.case)
        self.current_map = name
        lo, hi = self._thresholds.get(name, self.case.default_shown[name])
        self._apply_threshold(name, lo, hi)
        self._save_state()
        self._notify("foreground", name)

    def set_opacity(self, x: float) -> None:
        """Foreground opacity (0 transparent - 1 opaque) of every managed view."""
        x = float(x)
        if not 0.0 <= x <= 1.0 or math.isnan(x):
            raise InputError(f"opacity must be between 0 and 1, got {x}")
        self.opacity = x
        for comp in self.composite_nodes:
            comp.SetForegroundOpacity(x)
        self._save_state()
        self._notify("opacity", x)

    def _layer_max(self, name: str) -> float:
        import slicer

        node = self.layer_node(name)
        return float(slicer.util.arrayFromVolume(node).max())

    def _apply_threshold(self, name: str, lo: float, hi: float) -> None:
        """Threshold and colour window together (overlay_display.apply_overlay_range): the colours
        span what is shown."""
        top = self.case.value_ranges.get(name, (lo, hi))[1]
        apply_overlay_range(self.layer_node(name), lo, hi, top)
        self._thresholds[name] = (lo, hi)

    def set_threshold(self, lo: float, hi: float | None = None) -> None:
        """Show only voxels of the current overlay with lo ≤ value ≤ hi (others transparent).

        ``hi=None`` means the layer's maximum. Raises InputError without a current overlay or
        when lo > hi.
        """
        if self.current_map is None:
            raise InputError("choose an overlay (set_foreground_map) before setting its threshold")
        lo = float(lo)
        hi = max(self._layer_max(self.current_map), lo) if hi is None else float(hi)
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise InputError(f"threshold needs lo <= hi, got lo={lo}, hi={hi}")
        self._apply_threshold(self.current_map, lo, hi)
        self._save_state()
        self._notify("threshold", (lo, hi))

    def preview_threshold(self, lo: float, hi: float) -> None:
        """Show the current overlay with lo ≤ value ≤ hi while a slider is being dragged: only
        the display node changes; nothing is recorded on the case node and no listener is told
        (``set_threshold`` at the end of the drag records it). Invalid values are ignored."""
        if self.current_map is None:
            return
        lo, hi = float(lo), float(hi)
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            return
        self._apply_threshold(self.current_map, lo, hi)

    @property
    def threshold(self) -> tuple[float, float] | None:
        return self._thresholds.get(self.current_map) if self.current_map else None

    def default_threshold(self, name: str) -> float:
        """τ* for map ``name`` (METHODS.md section 4: the threshold maximising mean UEO on the
        calibration cases, as recorded in regions.json / summary.json for this case); the
        documented fallbacks when the case gives none (see nodes.default_thresholds)."""
        self._known(name)
        return float(self.case.default_thresholds[name][0])

    def default_range(self, name: str) -> tuple[float, float]:
        """The (lo, hi) a layer is shown with by default: [τ*, max] for uncertainty maps,
        [min, τ*] for maps flagged where low (confidence), [0.1, 1] for probabilities."""
        self._known(name)
        return tuple(self.case.default_shown[name])

    def threshold_source(self, name: str) -> str:
        return str(self.case.default_thresholds[name][1])

    def value_range(self, name: str) -> tuple[float, float]:
        """Range of values the layer's threshold moves in (0 to its robust max; 0-1 for
        probabilities). The colour window Slicer draws with is the legend's range (:meth:`legend`)."""
        self._known(name)
        return tuple(self.case.value_ranges[name])

    def slider_steps(self, name: str | None = None) -> tuple[int, float]:
        """(decimals, single step) for a threshold slider over layer ``name``'s shown values."""
        name = name or self.current_map
        lo, hi = self.value_range(name)
        t = self._thresholds.get(name, self.case.default_shown.get(name, (lo, hi)))
        return slider_steps(min(lo, t[0]), max(hi, t[1]))

    def legend(self, name: str | None = None):
        """The legend of a layer as Slicer draws it now: its display node's colour window and
        threshold (overlay_display.legend)."""
        name = name or self.current_map
        if name is None:
            raise InputError("no overlay shown, so there is no legend")
        self._known(name)
        return overlay_legend(name, self.layer_node(name))

    # --- regions -----------------------------------------------------------------------
    def regions(self) -> list[Region]:
        return list(self.case.regions)

    def go_to_region(self, i: int):
        """Jump every slice view of the view group, centred, to region i's jump point (RAS mm);
        show and select its markup only.

        Returns the list of SliceMove. Raises InputError for an index out of range.
        """
        regions = self.case.regions
        if not 0 <= int(i) < len(regions):
            raise InputError(f"region index {i} out of range (this case has {len(regions)} regions)")
        i = int(i)
        moves = jump_view_group_to_ras(self.scene, regions[i].jump_ras, self.view_group, centred=True)
        markups = self.case.regions_markups
        if markups is not None and markups.GetScene() is self.scene:
            show_current_region(markups, i)
        self.current_region_index = i
        self._save_state()
        self._notify("region", i)
        return moves

    def _step(self, step: int):
        n = len(self.case.regions)
        if n == 0:
            return None
        if self.current_region_index is None:
            i = 0 if step > 0 else n - 1
        else:
            i = self.current_region_index + step
            i = i % n if self.wrap else min(max(i, 0), n - 1)
        return self.go_to_region(i)

    def next_region(self):
        """Go to the next region (wraps to the first after the last); None without regions."""
        return self._step(+1)

    def previous_region(self):
        """Go to the previous region (wraps to the last before the first); None without regions."""
        return self._step(-1)


#: steps across a threshold slider's range (at least)
SLIDER_STEPS = 200


def slider_steps(lo: float, hi: float, steps: int = SLIDER_STEPS) -> tuple[int, float]:
    """(decimals, single step) for a slider over [lo, hi]: the step is the power of ten that gives
    at least ``steps`` steps across the range (a map of values up to 0.002 gets 1e-5 steps, a
    probability 0.001, a map up to 40 gets 0.1) and the decimals show that step - ctkRangeWidget
    rounds its values to its decimals and refuses a step it cannot show. At most 10 decimals."""
    span = float(hi) - float(lo)
    if not math.isfinite(span) or span <= 0:
        return 3, 0.001
    exponent = math.floor(math.log10(span / steps))
    exponent = max(exponent, -10)
    step = 10.0 ** exponent
    return max(0, -exponent), float(f"{step:.10g}")
