"""What the module's Apply button does, Qt-free: export the CT, run ``predict`` out of process,
load the results into the scene; and the check that enables Apply.

:class:`ScenePrediction` is one run for one CT node of a scene:

- :meth:`start` writes the node to a temporary NIfTI (geometry kept, volumes.py) and starts a
  :class:`~CalibUncertaintyLib.runner.PredictionRun`; the widget polls it from a timer;
- every run writes a case folder of its own: the case is named after the node and, when the
  output folder already holds a folder of that name (an earlier run on the same CT, perhaps still
  under review in the scene, whose probabilities are read from that folder when first shown), it
  gets the first free ``<name>_2``, ``<name>_3``... (:func:`unique_case_name`); nothing an earlier
  run wrote is replaced;
- :meth:`loader` (after success) gives a ``case_loader.CaseLoader`` of the case folder on the
  CT's grid, which the widget steps from a timer; :meth:`load` runs it to the end. If the user
  deleted the CT node while the run was going, the exported copy is loaded as the CT instead of
  failing (the outputs are on its grid; the case then owns it);
- :meth:`cancel` stops the run (``wait=False``: returns at once, :meth:`poll` finishes it);
- :meth:`cleanup` deletes the exported copy.

:class:`ApplyCheck` answers "why can Apply not run?" and re-evaluates it whenever an input
changes, including on disk (a fold added to the model folder, a calibration file written) and the
CT node leaving the scene - not only when a parameter changes.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..errors import InputError
from ..runner import PredictionRun, PredictOptions, RunState, locate_case_dir, safe_case_name

INPUT_PLACEHOLDER = "{input}"


def node_in_scene(scene, node) -> bool:
    return node is not None and node.GetScene() is scene


def unique_case_name(out_dir, case: str) -> str:
    """``case``, or the first of ``case_2``, ``case_3``... that names no entry of ``out_dir``, so
    that a run never replaces the case folder of an earlier run."""
    out_dir = Path(out_dir)
    if not (out_dir / case).exists():
        return case
    n = 2
    while (out_dir / f"{case}_{n}").exists():
        n += 1
    return f"{case}_{n}"


class ScenePrediction:
    """One out-of-process prediction of a CT node (see the module docstring).

    ``command`` replaces the ``calib-uncertainty predict`` command built from ``options`` (tests
    and scripts: any command with ``{output}``; ``{input}`` becomes the exported CT)."""

    def __init__(self, scene, input_node, options: PredictOptions | None, out_dir, temp_root=None,
                 on_progress=None, on_log=None, env=None, command=None):
        if not node_in_scene(scene, input_node):
            raise InputError("no input CT volume in the scene")
        if options is None and command is None:
            raise InputError("a prediction needs options or a command")
        self.scene = scene
        self.input_node = input_node
        self.options = options
        self.out_dir = Path(out_dir)
        self.temp_root = temp_root
        self.case = unique_case_name(self.out_dir, safe_case_name(input_node.GetName()))
        self.export_dir: Path | None = None
        self.exported_ct: Path | None = None
        self.run: PredictionRun | None = None
        self._command = list(command) if command is not None else None
        self._callbacks = (on_progress, on_log, env)

    def start(self) -> "ScenePrediction":
        from .volumes import export_volume_node

        if self.options is not None and self._command is None:
            self.options.validate(check_input=False)
        self.export_dir = Path(tempfile.mkdtemp(prefix="CalibUncertainty-input-", dir=self.temp_root))
        try:
            self.exported_ct = export_volume_node(self.input_node, self.export_dir / f"{self.case}.nii.gz")
            on_progress, on_log, env = self._callbacks
            if self._command is not None:
                command = [a.replace(INPUT_PLACEHOLDER, str(self.exported_ct)) for a in self._command]
            else:
                self.options.input_path = self.exported_ct
                command = self.options
            self.run = PredictionRun(command, self.out_dir, on_progress=on_progress, on_log=on_log, env=env)
            self.run.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def poll(self) -> RunState:
        return self.run.poll()

    def cancel(self, wait: bool = True) -> RunState:
        """Stop the run; ``wait=False`` returns at once (state ``cancelling``, :meth:`poll`
        finishes it) so that a GUI thread never waits for the process tree to end."""
        return self.run.cancel(wait=wait) if self.run is not None else RunState.IDLE

    @property
    def input_deleted(self) -> bool:
        return not node_in_scene(self.scene, self.input_node)

    def loader(self, **kwargs):
        """A ``case_loader.CaseLoader`` of the finished run's case folder (not started). The CT
        node if it is still in the scene, else the exported copy of it (the case then owns it:
        ``owns_input``)."""
        from .case_loader import CaseLoader

        if self.run is None or self.run.state is not RunState.SUCCEEDED:
            raise InputError("the prediction has not finished successfully; nothing to load")
        case_dir = locate_case_dir(self.run.out_dir, self.case)
        if not self.input_deleted:
            return CaseLoader(self.scene, case_dir, self.input_node, **kwargs)
        if self.exported_ct is None or not self.exported_ct.is_file():
            raise InputError("the input CT was deleted during the run and its exported copy is gone; "
                             f"load {case_dir} with its CT")
        return CaseLoader(self.scene, case_dir, None, input_file=self.exported_ct, **kwargs)

    def load(self, **kwargs):
        """Load the finished run's case folder into the scene in one call -> CaseNodes."""
        return self.loader(**kwargs).run()

    def cleanup(self) -> None:
        if self.export_dir is not None:
            shutil.rmtree(self.export_dir, ignore_errors=True)


def _stamp(path) -> tuple:
    """What can change on disk under a path the options name: its and its children's mtimes."""
    if not path:
        return ()
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return (str(p), None)
    out = [(str(p), st.st_mtime_ns)]
    if p.is_dir():
        try:
            for child in sorted(p.iterdir()):
                if child.is_dir():
                    out.append((child.name, child.stat().st_mtime_ns))
        except OSError:
            pass
    return tuple(out)


#: the parameter node fields Apply depends on (a change of any other field - the shown map, its
#: threshold, the opacity, the region - never re-runs the Apply check)
APPLY_FIELDS = ("inputVolume", "modelFolder", "ensemble", "folds", "calibrationFile", "device", "tta", "passes")


def apply_inputs(parameter_node) -> tuple:
    """The values of :data:`APPLY_FIELDS` of the module's parameter node (node -> its ID)."""
    out = []
    for name in APPLY_FIELDS:
        v = getattr(parameter_node, name)
        out.append(v.GetID() if hasattr(v, "GetID") else v)
    return tuple(out)


class ApplyCheck:
    """Why Apply cannot run (empty list when it can), cached until an input changes.

    ``problems(scene, input_node, model_dir, ensemble, folds, calibration, device, tta, passes)`` keys its
    cache on the parameters, on whether the CT node is still in the scene, and on the
    modification times of the model folder (and its fold folders) and the calibration file.
    Those are read again only when a parameter changed, when ``force`` is given (the Apply click:
    files may have changed) or when ``recheck_s`` seconds have passed since they were last read
    (0: on every call), so repeated calls with the same parameters do not list the model folder.
    """

    def __init__(self, recheck_s: float = 0.0, clock=None):
        import time

        self.recheck_s = float(recheck_s)
        self._clock = clock or time.monotonic
        self._key = None
        self._stamps = None
        self._stamped_at = None
        self._problems: list[str] = []
        self.evaluations = 0
        self.stamp_reads = 0

    def problems(self, scene, input_node, model_dir, ensemble="deep", folds=None, calibration=None,
                 device="auto", tta=True, passes=None, force: bool = False) -> list[str]:
        from ..runner import DEFAULT_PASSES, as_optional_path, parse_folds

        passes = DEFAULT_PASSES if passes is None else int(passes)
        present = node_in_scene(scene, input_node)
        params = (input_node.GetID() if present else None, str(model_dir or ""), ensemble, str(folds or ""),
                  str(calibration or ""), device, bool(tta), passes)
        now = self._clock()
        if (force or self._key is None or params != self._key[0] or self._stamped_at is None
                or now - self._stamped_at >= self.recheck_s):
            stamps = (_stamp(model_dir), _stamp(calibration))
            self.stamp_reads += 1
            self._stamped_at = now
        else:
            stamps = self._key[1]
        key = (params, stamps)
        if key == self._key:
            return list(self._problems)
        self.evaluations += 1
        problems = [] if present else ["Select the input CT volume."]
        try:
            options = PredictOptions(input_path=None, model_dir=as_optional_path(model_dir), ensemble=ensemble,
                                     folds=parse_folds(folds), calibration=as_optional_path(calibration),
                                     device=device, tta=tta, passes=passes)
            problems += options.problems(check_input=False)
        except Exception as exc:          # folds that do not parse
            problems.append(str(exc))
        self._key, self._problems = key, problems
        return list(problems)
