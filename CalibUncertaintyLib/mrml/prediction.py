"""What the module's Apply button does, Qt-free: export the CT, run ``predict`` out of process,
load the results into the scene; and the check that enables Apply.

:class:`ScenePrediction` is one run for one CT node of a scene:

- :meth:`start` writes the node to a temporary NIfTI (geometry kept, volumes.py) and starts a
  :class:`~CalibUncertaintyLib.runner.PredictionRun`; the widget polls it from a timer;
- :meth:`load` (after success) loads the case folder as nodes on the CT's grid. If the user
  deleted the CT node while the run was going, the exported copy is loaded as the CT instead of
  failing (the outputs are on its grid);
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
        self.case = safe_case_name(input_node.GetName())
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

    def cancel(self) -> RunState:
        return self.run.cancel() if self.run is not None else RunState.IDLE

    @property
    def input_deleted(self) -> bool:
        return not node_in_scene(self.scene, self.input_node)

    def load(self, **kwargs):
        """Load the finished run's case folder into the scene -> CaseNodes. The CT node if it is
        still in the scene, else the exported copy of it (``owns_input`` then True)."""
        from .nodes import load_case_outputs, load_volume_file

        if self.run is None or self.run.state is not RunState.SUCCEEDED:
            raise InputError("the prediction has not finished successfully; nothing to load")
        case_dir = locate_case_dir(self.run.out_dir, self.case)
        if not self.input_deleted:
            return load_case_outputs(self.scene, case_dir, self.input_node, **kwargs)
        ct = load_volume_file(self.scene, self.exported_ct, name=f"{self.case} CT")
        try:
            case = load_case_outputs(self.scene, case_dir, ct, **kwargs)
        except BaseException:
            self.scene.RemoveNode(ct)
            raise
        case.owns_input = True
        return case

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


class ApplyCheck:
    """Why Apply cannot run (empty list when it can), cached until an input changes.

    ``problems(scene, input_node, model_dir, ensemble, folds, calibration, device, tta, passes)`` keys its
    cache on the parameters, on whether the CT node is still in the scene, and on the
    modification times of the model folder (and its fold folders) and the calibration file.
    """

    def __init__(self):
        self._key = None
        self._problems: list[str] = []
        self.evaluations = 0

    def problems(self, scene, input_node, model_dir, ensemble="deep", folds=None, calibration=None,
                 device="auto", tta=True, passes=None) -> list[str]:
        from ..runner import DEFAULT_PASSES, as_optional_path, parse_folds

        passes = DEFAULT_PASSES if passes is None else int(passes)
        present = node_in_scene(scene, input_node)
        key = (input_node.GetID() if present else None, str(model_dir or ""), ensemble, str(folds or ""),
               str(calibration or ""), device, bool(tta), passes, _stamp(model_dir), _stamp(calibration))
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
