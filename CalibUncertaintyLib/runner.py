"""Run ``calib-uncertainty predict`` out of process, with progress, a log, and a Cancel that works.

Qt-free and Slicer-free: the Slicer module drives a :class:`PredictionRun` from a ``QTimer`` by
calling :meth:`PredictionRun.poll`, and scripts call :func:`blocking_run`. Nothing here imports
torch, nnU-Net, numpy, slicer or qt.

How a run works

1. The command writes into a fresh hidden *staging* folder inside ``out_dir``
   (``out_dir/.staging-*``: same file system, so the final move is a rename, and nothing is ever
   created beside the folder the user chose). No output entry of ``out_dir`` is written while the
   process runs; case-folder lookups skip dot-folders.
2. Two reader threads turn the child's stdout/stderr into lines on a queue; :meth:`poll` drains the
   queue without blocking, hands progress events (``CalibUncertaintyLib.progress`` format) to
   ``on_progress`` and every other line to ``on_log``. Callbacks therefore run in the thread that
   calls :meth:`poll` (the GUI thread in Slicer), never in a reader thread.
3. On exit code 0 every top-level entry of the staging folder replaces the entry of the same name
   in ``out_dir``, except the folder index ``summary.json``, which is merged into ``out_dir``'s
   (``pipeline.folder_index.update_folder_index``) (the old one is kept aside until the new one is in place, then deleted); other
   entries of ``out_dir`` are left alone. On failure or cancel the staging folder is deleted and
   ``out_dir`` is exactly as it was.
4. :meth:`cancel` ends the whole process tree, not just the direct child: the child starts in a new
   session / process group (POSIX) and gets SIGTERM, then SIGKILL after ``timeout`` seconds for
   whatever is still alive in the group; on Windows ``taskkill /T /F`` ends the tree.

States: ``idle -> running -> succeeded | failed | cancelled``; a finished run may be started again,
a running one refuses a second :meth:`start`. ``cancel(wait=False)`` (the Slicer module's Cancel)
returns at once in state ``cancelling``: SIGTERM is sent, and :meth:`poll` sends SIGKILL after the
timeout, then removes the staging folder and ends in ``cancelled`` once no process of the tree is
left - nothing is waited for in the caller's (GUI) thread.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import CalibUncertaintyError, InputError, ModelFolderError
from .pipeline.folder_index import INDEX_NAME, update_folder_index
from .progress import ENV_VAR as PROGRESS_ENV_VAR, parse_progress_line

log = logging.getLogger(__name__)

#: Put this token in a raw command where the output folder goes; the run replaces it by its
#: staging folder (``PredictionRun`` never lets a command write into ``out_dir`` directly).
OUTPUT_PLACEHOLDER = "{output}"

#: Name prefix of the hidden staging folder a run creates inside its output folder.
STAGING_PREFIX = ".staging-"
#: subprocess.CREATE_NO_WINDOW (Windows only; the value, so the flag is testable anywhere).
WINDOWS_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
WINDOWS_NEW_PROCESS_GROUP = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)

ENSEMBLE_CHOICES = ("deep", "checkpoint", "single", "tta", "dropout")
DEFAULT_PASSES = 10  # MC-dropout passes (nnunet.single_model_members.DEFAULT_PASSES)
DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
STDERR_TAIL_LINES = 20
_EOF_GRACE_S = 2.0  # after the child exits, wait this long for grandchildren to close the pipes


class RunState(str, enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    CANCELLING = "cancelling"  # cancel(wait=False) was asked; poll() finishes it
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


class RunError(CalibUncertaintyError):
    """An out-of-process run failed (the message carries the last lines of its stderr)."""


class RunStateError(CalibUncertaintyError, RuntimeError):
    """The run was asked to do something its state does not allow (e.g. start twice)."""


# --------------------------------------------------------------------------------------------
# Options of `calib-uncertainty predict` and the command line built from them
# --------------------------------------------------------------------------------------------

def as_optional_path(value) -> Path | None:
    """``None`` for an unset path. Qt path widgets give "" for empty, which ``Path`` turns into
    ".", so both count as unset."""
    if value is None:
        return None
    text = str(value).strip()
    if text in ("", "."):
        return None
    return Path(text).expanduser()


def parse_folds(text: str | Sequence | None) -> tuple[str, ...] | None:
    """Parse the folds field: "0,1,2", "0 1 2" or "all"; empty means "every fold the model has"
    (``None``). Returns the folds as strings, as the command line wants them."""
    if text is None:
        return None
    if not isinstance(text, str):
        text = " ".join(str(t) for t in text)
    parts = [p for p in re.split(r"[\s,;]+", text.strip()) if p]
    if not parts:
        return None
    for p in parts:
        if not (p.isdigit() or p == "all"):
            raise InputError(f"folds must be fold numbers such as '0,1,2,3,4' or 'all'; got {p!r}")
    if "all" in parts and len(parts) > 1:
        raise InputError("folds: 'all' (the model trained on all cases) cannot be mixed with fold numbers")
    if len(set(parts)) != len(parts):
        raise InputError(f"folds: a fold is listed twice in {text!r}")
    return tuple(parts)


def model_folder_problem(model_dir, ensemble: str | None = None, folds=None, passes: int | None = None) -> str | None:
    """Why ``model_dir`` cannot serve the requested ensemble, or ``None`` if it can.

    Uses ``nnunet.model_folder.ModelFolder`` (JSON files and file names only, no torch): the folder
    must be a trained nnU-Net v2 model folder, and when ``ensemble`` is given it must hold the
    members that ensemble needs (the given folds, or snapshot checkpoints for ``checkpoint``,
    mirroring axes for ``tta``, dropout layers in the plans for ``dropout``; ``passes`` only for
    ``dropout``).
    """
    from .nnunet.model_folder import ModelFolder

    path = as_optional_path(model_dir)
    if path is None:
        return "Choose the nnU-Net model folder (the one that holds dataset.json, plans.json and fold_*)."
    try:
        folder = ModelFolder.open(path)
        if ensemble is not None:
            folder.members(ensemble, folds, passes=passes if ensemble == "dropout" else None)
    except ModelFolderError as exc:
        return str(exc)
    return None


@dataclass
class PredictOptions:
    """What the Slicer module (or a script) asks ``calib-uncertainty predict`` to do.

    ``input_path`` is a CT file the caller has already written (the runner exports nothing);
    ``folds`` None means every fold the model has; ``calibration`` None means uncalibrated
    (T = 1, EBCU threshold from the case itself, see METHODS.md). ``passes``: MC-dropout passes,
    used with ``ensemble="dropout"`` only (ignored otherwise, so a GUI can keep its value).
    """

    input_path: Path | None
    model_dir: Path
    ensemble: str = "deep"
    folds: tuple[str, ...] | None = None
    calibration: Path | None = None
    device: str = "auto"
    tta: bool = True
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    passes: int = DEFAULT_PASSES

    @property
    def dropout_passes(self) -> int | None:
        return int(self.passes) if self.ensemble == "dropout" else None

    def problems(self, check_input: bool = True) -> list[str]:
        """Every reason the options cannot run, in the order a user should fix them (empty list
        when they can). ``check_input=False`` skips the input file (the GUI exports it later)."""
        out = []
        if check_input:
            p = as_optional_path(self.input_path)
            if p is None:
                out.append("No input CT file.")
            elif not p.is_file():
                out.append(f"The input CT file {p} does not exist.")
        if self.ensemble not in ENSEMBLE_CHOICES:
            out.append(f"Unknown ensemble type {self.ensemble!r}; choose one of {', '.join(ENSEMBLE_CHOICES)}.")
            problem = model_folder_problem(self.model_dir)
        else:
            problem = model_folder_problem(self.model_dir, self.ensemble, self.folds, self.dropout_passes)
        if problem:
            out.append(problem)
        if self.ensemble == "tta" and not self.tta:
            out.append("The tta ensemble makes each mirrored prediction a member: turn mirroring (TTA) on.")
        cal = as_optional_path(self.calibration)
        if cal is not None and not cal.is_file():
            out.append(f"The calibration file {cal} does not exist.")
        elif cal is not None and not problem and self.ensemble in ENSEMBLE_CHOICES:
            mismatch = calibration_mismatch(cal, self.model_dir, self.ensemble, self.folds, self.tta,
                                            self.dropout_passes)
            if mismatch:
                out.append(mismatch)
        if self.device not in DEVICE_CHOICES:
            out.append(f"Unknown device {self.device!r}; choose one of {', '.join(DEVICE_CHOICES)}.")
        return out

    def validate(self, check_input: bool = True) -> "PredictOptions":
        """Raise :class:`ModelFolderError` (model folder) or :class:`InputError` (anything else)
        with every problem found; return ``self`` when the options can run."""
        model_problem = model_folder_problem(self.model_dir, self.ensemble if self.ensemble in ENSEMBLE_CHOICES
                                             else None, self.folds, self.dropout_passes)
        if model_problem:
            raise ModelFolderError(model_problem)
        problems = self.problems(check_input=check_input)
        if problems:
            raise InputError(" ".join(problems))
        return self


def calibration_tta(calibration) -> bool | None:
    """The TTA setting a calibration file was fitted with (None: not recorded, or unreadable), so a
    panel can preset it: the file is refused with the other setting."""
    import json

    try:
        rec = json.loads(Path(calibration).read_text(encoding="utf-8")).get("ensemble") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return rec["tta"] if isinstance(rec.get("tta"), bool) else None


def calibration_mismatch(calibration, model_dir, ensemble: str, folds, tta: bool, passes: int | None) -> str | None:
    """Why ``calibration`` does not fit these members (another ensemble kind, member set or TTA
    setting: ``CalibrationFile.check_ensemble``), or None. Reads only JSON files and file names.
    An unreadable file is left to ``predict`` (which reports it)."""
    from .calibration.calibration_file import CalibrationFile
    from .errors import CalibUncertaintyError
    from .nnunet.model_folder import ModelFolder

    try:
        cal = CalibrationFile.load(calibration)
        members = ModelFolder.open(as_optional_path(model_dir)).members(ensemble, folds, passes=passes)
        cal.check_ensemble(ensemble, [m.name for m in members], True if ensemble == "tta" else bool(tta))
    except CalibUncertaintyError as exc:
        return str(exc)
    return None


def build_predict_command(options: PredictOptions, output: str = OUTPUT_PLACEHOLDER,
                          python: str | None = None) -> list[str]:
    """The ``calib-uncertainty predict`` command line for ``options``, run as
    ``<python> -m CalibUncertaintyLib.cli.main predict ...`` so that it works inside Slicer
    (``PythonSlicer``) where no console script is on the PATH."""
    if options.input_path is None:
        raise InputError("PredictOptions.input_path is not set: export the CT to a file first")
    cmd = [python or default_python(), "-m", "CalibUncertaintyLib.cli.main", "predict",
           "-i", str(options.input_path), "-m", str(options.model_dir), "-o", output,
           "--ensemble", options.ensemble]
    if options.folds:
        cmd += ["--folds", *[str(f) for f in options.folds]]
    cal = as_optional_path(options.calibration)
    if cal is not None:
        cmd += ["--calibration", str(cal)]
    if options.dropout_passes is not None:
        cmd += ["--passes", str(options.dropout_passes)]
    cmd += ["--device", options.device, "--tta" if options.tta else "--no-tta"]
    cmd += [str(a) for a in options.extra_args]
    return cmd


def default_python() -> str:
    """The interpreter for child processes: ``PythonSlicer`` inside the Slicer application (where
    ``sys.executable`` is Slicer itself), else ``sys.executable``."""
    slicer_mod = sys.modules.get("slicer")
    if slicer_mod is not None and hasattr(slicer_mod, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def safe_case_name(name: str) -> str:
    """A file-system-safe case name from a node name ("CT chest #2" -> "CT_chest_2"). A trailing
    nnU-Net channel suffix ``_0000`` is dropped so that the case folder keeps the same name."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-")
    text = re.sub(r"_0000$", "", text)
    return text or "case"


def locate_case_dir(out_dir, case: str | None = None) -> Path:
    """The per-case folder a predict run wrote in ``out_dir``: ``out_dir/<case>`` if it exists,
    else the only sub-folder that holds ``summary.json`` or ``regions.json``."""
    out_dir = Path(out_dir)
    if case and (out_dir / case).is_dir():
        return out_dir / case
    cands = sorted(p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and ((p / "summary.json").is_file() or (p / "regions.json").is_file())) \
        if out_dir.is_dir() else []
    if len(cands) == 1:
        return cands[0]
    found = ", ".join(p.name for p in cands) or "none"
    raise InputError(f"cannot tell which case folder in {out_dir} holds the results for "
                     f"{case or 'this run'} (case folders found: {found})")


def describe_progress(event: dict) -> tuple[int | None, str]:
    """(percent or None, one line of text) for a progress event, e.g.
    ``(43, "inference - member 2/5 - case_001 - fold_1")``."""
    frac = event.get("fraction")
    percent = None if frac is None else int(round(100 * min(max(float(frac), 0.0), 1.0)))
    parts = [str(event.get("stage", ""))]
    if event.get("member") is not None:
        n = event.get("n_members")
        parts.append(f"member {event['member']}/{n}" if n else f"member {event['member']}")
    for unit, total in (("patch", "n_patches"), ("slab", "n_slabs")):  # progress.tick lines
        if event.get(unit) is not None and event.get(total):
            parts.append(f"{unit} {event[unit]}/{event[total]}")
    for key in ("case", "message"):
        if event.get(key):
            parts.append(str(event[key]))
    return percent, " - ".join(p for p in parts if p)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

ProgressCallback = Callable[[dict], None]
LogCallback = Callable[[str, str], None]  # (line, "stdout" | "stderr" | "runner")


class PredictionRun:
    """One out-of-process run that writes into ``out_dir`` only if it succeeds.

    ``command`` is either :class:`PredictOptions` (the ``calib-uncertainty predict`` command is
    built from them) or a raw argument list containing :data:`OUTPUT_PLACEHOLDER` where the
    output folder goes. ``on_progress(event)`` gets parsed progress events, ``on_log(line,
    stream)`` every other line; both are called from :meth:`poll`. ``env`` replaces the child's
    environment (default: this process's); the folder holding ``CalibUncertaintyLib`` is always
    put first on the child's ``PYTHONPATH`` so ``-m CalibUncertaintyLib.cli.main`` resolves to
    this very copy of the library.
    """

    def __init__(self, command: PredictOptions | Sequence[str], out_dir, on_progress: ProgressCallback | None = None,
                 on_log: LogCallback | None = None, env: dict | None = None, cwd=None, python: str | None = None):
        self.options = command if isinstance(command, PredictOptions) else None
        if self.options is not None:
            self._template = build_predict_command(self.options, OUTPUT_PLACEHOLDER, python=python)
        else:
            self._template = [str(a) for a in command]
            if not self._template:
                raise InputError("empty command")
            if not any(OUTPUT_PLACEHOLDER in a for a in self._template):
                raise InputError(f"the command must contain {OUTPUT_PLACEHOLDER!r} where its output folder goes, "
                                 "so that it writes into a staging folder and never half-overwrites the outputs")
        self.out_dir = Path(out_dir).expanduser().absolute()
        self.on_progress = on_progress
        self.on_log = on_log
        self.env = env
        self.cwd = cwd
        self.state = RunState.IDLE
        self.error: str | None = None
        self.returncode: int | None = None
        self.command: list[str] | None = None
        self.staging_dir: Path | None = None
        self.last_progress: dict | None = None
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._open_streams = 0
        self._exited_at: float | None = None
        self._stderr_tail: collections.deque = collections.deque(maxlen=STDERR_TAIL_LINES)

    # ---------------------------------------------------------------- public API
    @property
    def running(self) -> bool:
        return self.state is RunState.RUNNING

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stderr_tail(self) -> list[str]:
        """The last lines the child wrote on stderr (progress lines excluded)."""
        return list(self._stderr_tail)

    def start(self) -> "PredictionRun":
        """Start the child process. Raises :class:`RunStateError` while a run is in progress and
        :class:`RunError` (state ``failed``) if the program cannot be started at all."""
        if self.state in (RunState.RUNNING, RunState.CANCELLING):
            raise RunStateError("this prediction is already running; cancel it or wait for it to finish "
                                "before starting it again")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise InputError(f"the output folder {self.out_dir} exists and is not a folder")
        self._reset()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.staging_dir = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out_dir))
        except OSError as exc:
            raise InputError(f"cannot create a staging folder in the output folder {self.out_dir}: {exc}") from exc
        self.command = [a.replace(OUTPUT_PLACEHOLDER, str(self.staging_dir)) for a in self._template]
        kwargs = popen_platform_kwargs(os.name == "nt")
        try:
            self._proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, encoding="utf-8", errors="replace", bufsize=1, cwd=self.cwd,
                env=self._child_env(), **kwargs)
        except OSError as exc:
            self._remove_staging()
            self._finish(RunState.FAILED, f"could not start {self.command[0]!r}: {exc}")
            raise RunError(self.error) from exc
        self.state = RunState.RUNNING
        log.info("started pid %s: %s", self._proc.pid, " ".join(self.command))
        for stream, name in ((self._proc.stdout, "stdout"), (self._proc.stderr, "stderr")):
            t = threading.Thread(target=_pump, args=(stream, name, self._queue), daemon=True,
                                 name=f"calibu-runner-{name}")
            t.start()
            self._threads.append(t)
        self._open_streams = 2
        return self

    def poll(self) -> RunState:
        """Deliver the output that has arrived, without blocking; finish the run if the child has
        exited (or, while cancelling, once its whole tree is gone). Returns the state."""
        if self.state is RunState.CANCELLING:
            return self._poll_cancel()
        if self.state is not RunState.RUNNING:
            return self.state
        self._drain()
        if self._exited_at is None and self._proc.poll() is not None:
            self._exited_at = time.monotonic()
        if self._exited_at is not None and (self._open_streams == 0
                                            or time.monotonic() - self._exited_at > _EOF_GRACE_S):
            self._drain()
            self._complete()
        return self.state

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> RunState:
        """Poll until the run has finished or ``timeout`` seconds have passed; returns the state
        (still ``running`` on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll().finished and self.state is not RunState.IDLE:
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(interval)
        return self.state

    def cancel(self, timeout: float = 5.0, wait: bool = True) -> RunState:
        """End the process and every process it started (SIGTERM, then SIGKILL after ``timeout``
        seconds), delete the staging folder, leave ``out_dir`` untouched. A no-op when not running.

        ``wait=False`` returns at once in state ``cancelling`` (for a GUI thread): :meth:`poll`
        escalates to SIGKILL after ``timeout`` and ends in ``cancelled`` when the tree is gone."""
        if self.state is RunState.CANCELLING and wait:
            while self.poll() is RunState.CANCELLING:
                time.sleep(0.02)
            return self.state
        if self.state is not RunState.RUNNING:
            return self.state
        if not wait:
            self._cancel_deadline = time.monotonic() + max(timeout, 0.0)
            self._killed = False
            _terminate_tree(self._proc)
            self.state = RunState.CANCELLING
            self._emit_log("cancelling: the process tree was asked to stop", "runner")
            return self.state
        _kill_tree(self._proc, timeout)
        for t in self._threads:
            t.join(timeout=1.0)
        self._drain()
        self.returncode = self._proc.returncode
        self._remove_staging()
        self._finish(RunState.CANCELLED, None)
        self._emit_log("cancelled: the process tree was stopped and no output was kept", "runner")
        return self.state

    # ---------------------------------------------------------------- internals
    def _poll_cancel(self) -> RunState:
        self._drain()
        if _tree_alive(self._proc):
            if not self._killed and time.monotonic() >= self._cancel_deadline:
                log.warning("process tree of %s ignored SIGTERM; sending SIGKILL", self._proc.pid)
                _kill_now(self._proc)
                self._killed = True
            return self.state
        self._proc.wait()
        for t in self._threads:
            t.join(timeout=0.05)  # the pipes closed with the processes: the readers end at once
        self._drain()
        self.returncode = self._proc.returncode
        self._remove_staging()
        self._finish(RunState.CANCELLED, None)
        self._emit_log("cancelled: the process tree was stopped and no output was kept", "runner")
        return self.state

    def _reset(self):
        self.error = None
        self.returncode = None
        self.last_progress = None
        self._queue = queue.Queue()
        self._threads = []
        self._open_streams = 0
        self._exited_at = None
        self._stderr_tail.clear()

    def _child_env(self) -> dict:
        env = dict(os.environ if self.env is None else self.env)
        lib_parent = str(Path(__file__).resolve().parent.parent)
        old = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = lib_parent + (os.pathsep + old if old else "")
        env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are written, not at exit
        env.setdefault("PYTHONIOENCODING", "utf-8")
        env[PROGRESS_ENV_VAR] = "1"  # the child prints CALIBU_PROGRESS lines only when asked
        return env

    def _drain(self):
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._open_streams -= 1
                continue
            line = line.rstrip("\r\n")
            event = parse_progress_line(line)
            if event is not None:
                self.last_progress = event
                self._call(self.on_progress, event)
                continue
            if name == "stderr" and line.strip():
                self._stderr_tail.append(line)
            self._emit_log(line, name)

    def _emit_log(self, line: str, stream: str):
        self._call(self.on_log, line, stream)

    @staticmethod
    def _call(fn, *args):
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:  # a broken callback must not leave the run half-finished
            log.exception("runner callback %r failed", fn)

    def _complete(self):
        self.returncode = self._proc.wait()
        if os.name != "nt" and _group_alive(self._proc.pid, self._proc):
            # the command exited but left processes of its tree running: the run is over, stop them
            self._emit_log("stopping processes the command left running", "runner")
            _kill_tree(self._proc, timeout=1.0)
        if self.returncode != 0:
            tail = "\n".join(self._stderr_tail) or "(it wrote nothing on stderr)"
            self._remove_staging()
            self._finish(RunState.FAILED, f"{self._describe()} failed with exit code {self.returncode}. "
                                          f"Last lines of its error output:\n{tail}")
            return
        try:
            produced = sorted(self.staging_dir.iterdir())
            if not produced:
                raise RunError(f"{self._describe()} finished but wrote no output")
            index = _staged_index(self.staging_dir)
            _move_into([p for p in produced if index is None or p.name != INDEX_NAME], self.out_dir)
            if index is not None:  # merged, so the folder's index keeps the cases of earlier runs
                run = {k: v for k, v in index.items() if k not in ("cases", "n_cases", "replaced", "updated_utc")}
                update_folder_index(self.out_dir, index["cases"], run)
        except (OSError, RunError) as exc:
            self._remove_staging()
            self._finish(RunState.FAILED, f"{exc}")
            return
        self._remove_staging()
        self._finish(RunState.SUCCEEDED, None)

    def _describe(self) -> str:
        if self.options is not None:
            return "calib-uncertainty predict"
        return Path(self.command[0]).name if self.command else "the command"

    def _finish(self, state: RunState, error: str | None):
        self.state = state
        self.error = error
        if error:
            log.error("%s", error)

    def _remove_staging(self):
        if self.staging_dir is not None and self.staging_dir.exists():
            shutil.rmtree(self.staging_dir, ignore_errors=True)


def popen_platform_kwargs(windows: bool) -> dict:
    """Popen arguments that give the child its own process group (so cancel can end the tree);
    on Windows also no console window, as Slicer's launchConsoleProcess starts PythonSlicer
    (closing such a window would kill the run)."""
    if windows:
        return {"creationflags": WINDOWS_NEW_PROCESS_GROUP | WINDOWS_NO_WINDOW}
    return {"start_new_session": True}


def blocking_run(command: PredictOptions | Sequence[str], out_dir, on_progress: ProgressCallback | None = None,
                 on_log: LogCallback | None = None, timeout: float | None = None, env: dict | None = None,
                 cwd=None, python: str | None = None) -> Path:
    """Run to completion (for scripts and tests); returns ``out_dir``. Raises :class:`RunError`
    with the child's last stderr lines on failure, and cancels the tree and raises
    :class:`RunError` if ``timeout`` seconds pass."""
    run = PredictionRun(command, out_dir, on_progress=on_progress, on_log=on_log, env=env, cwd=cwd, python=python)
    run.start()
    try:
        state = run.wait(timeout=timeout)
    except BaseException:  # Ctrl-C in a script: take the whole tree down with us
        run.cancel()
        raise
    if state is RunState.RUNNING:
        run.cancel()
        raise RunError(f"the run did not finish within {timeout} s and was cancelled; no output was kept")
    if state is not RunState.SUCCEEDED:
        raise RunError(run.error or f"the run ended in state {state.value}")
    return run.out_dir


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _pump(stream, name: str, q: queue.Queue):
    try:
        for line in iter(stream.readline, ""):
            q.put((name, line))
    except (OSError, ValueError):
        pass
    finally:
        q.put((name, None))
        try:
            stream.close()
        except OSError:
            pass


def _staged_index(staging_dir: Path) -> dict | None:
    """The folder index (``pipeline.folder_index``) the command wrote, or None."""
    import json

    try:
        doc = json.loads((staging_dir / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(doc, dict) and isinstance(doc.get("cases"), list) and all(
            isinstance(r, dict) and "case" in r for r in doc["cases"]):
        return doc
    return None


def _move_into(entries: Iterable[Path], out_dir: Path):
    """Move each entry into ``out_dir``, replacing a same-named entry only once the new one can
    take its place (the old one is renamed aside first and restored if the move fails)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in entries:
        dest = out_dir / src.name
        backup = None
        if dest.exists() or dest.is_symlink():
            backup = Path(tempfile.mkdtemp(prefix=f".{src.name}.old-", dir=out_dir)) / src.name
            os.replace(dest, backup)
        try:
            os.replace(src, dest)
        except OSError:
            if backup is not None:
                os.replace(backup, dest)
                shutil.rmtree(backup.parent, ignore_errors=True)
            raise
        if backup is not None:
            shutil.rmtree(backup.parent, ignore_errors=True)


def _kill_tree(proc: subprocess.Popen, timeout: float):
    """Stop ``proc`` and all its descendants (they share its process group on POSIX)."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return
    pgid = proc.pid  # start_new_session=True made the child the leader of its own group
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + max(timeout, 0.0)
    while _group_alive(pgid, proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _group_alive(pgid, proc):
        log.warning("process group %s ignored SIGTERM for %.1f s; sending SIGKILL", pgid, timeout)
        _signal_group(pgid, signal.SIGKILL)
        end = time.monotonic() + 5.0
        while _group_alive(pgid, proc) and time.monotonic() < end:
            time.sleep(0.02)
    proc.wait()


def _terminate_tree(proc: subprocess.Popen) -> None:
    """Ask the tree to stop without waiting (SIGTERM to the group; on Windows taskkill /F /T,
    which is immediate)."""
    if os.name == "nt":
        _kill_now(proc)
        return
    _signal_group(proc.pid, signal.SIGTERM)


def _kill_now(proc: subprocess.Popen) -> None:
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        return
    _signal_group(proc.pid, signal.SIGKILL)


def _tree_alive(proc: subprocess.Popen) -> bool:
    if os.name == "nt":
        return proc.poll() is None
    return _group_alive(proc.pid, proc)


def _signal_group(pgid: int, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int, proc: subprocess.Popen) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies do not count).

    On Linux this reads /proc, so the leader is not reaped (its pid, hence the group id, cannot be
    reused while we still signal the group). Elsewhere the leader is reaped first and the group
    probed with signal 0.
    """
    proc_root = Path("/proc")
    if sys.platform.startswith("linux") and proc_root.is_dir():
        for entry in proc_root.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X", "x"):
                return True
        return False
    proc.poll()
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = [
    "OUTPUT_PLACEHOLDER", "ENSEMBLE_CHOICES", "DEVICE_CHOICES", "RunState", "RunError", "RunStateError",
    "PredictOptions", "PredictionRun", "blocking_run", "build_predict_command", "default_python",
    "parse_folds", "model_folder_problem", "as_optional_path", "safe_case_name", "locate_case_dir",
    "describe_progress",
]
