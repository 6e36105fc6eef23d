"""What a person sees while a command works: a live status line on a terminal, plain lines when not.

``LiveProgress`` is installed by ``cli.main`` for every command (``progress.reporting``) unless the
machine-readable lines are asked for (``--progress`` / ``CALIBU_PROGRESS=1``: a GUI draws them).
It follows the library's progress events (``progress.emit_progress`` / ``progress.tick``):

- on a terminal (stderr is a tty): one status line redrawn in place, at most ``REDRAW_S`` apart and
  at least once a second: ``case 2/5 phantom_007 · inference · member 3/5 · patch 40/96 ·
  1 min 02 s · ETA 2 min 10 s``; it is cleared before any other output (``progress.before_output``);
- piped or logged (stderr is not a tty): the same text as a plain line ``progress: ...`` at least
  every ``interval`` seconds while work goes on (``CALIBU_PROGRESS_INTERVAL``, default 10; 0 turns
  the periodic lines off), and at the start of every case;
- either way, the inference estimate of a case (stage ``estimate``: the size the CT is resampled
  to, the network passes and the expected time) as a line of its own before inference starts.

The ETA: during inference, the network passes still to run times the time per pass measured so
far in this case (before the first pass: the estimate's); over a cohort, the mean time of the
finished cases times the cases left.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time

#: seconds between plain progress lines when stderr is not a terminal
DEFAULT_INTERVAL_S = 10.0
INTERVAL_ENV = "CALIBU_PROGRESS_INTERVAL"
REDRAW_S = 0.2
#: stages that run the network patch by patch: ``predict``'s inference and the member cache's
#: inference of ``fit-temperature`` / ``evaluate --model``
NETWORK_STAGES = ("inference", "members")


from ..progress import format_duration as duration


def interval_from_env(default: float = DEFAULT_INTERVAL_S) -> float:
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return default
    try:
        return max(float(text), 0.0)
    except ValueError:
        return default


class LiveProgress:
    """The display (module docstring). ``stream``: where to draw (default stderr at start);
    ``tty``: force terminal / plain mode (default: ``stream.isatty()``)."""

    def __init__(self, stream=None, tty: bool | None = None, interval: float | None = None):
        self.stream = stream
        self.tty = tty
        self.interval = interval_from_env() if interval is None else float(interval)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = None
        self._shown = False  # a status line is on the terminal
        self._last_draw = 0.0
        self._last_line = 0.0
        self._t0 = time.monotonic()
        self.n_cases = None
        self.job = None  # the cohort's name ("predict", "fit: thresholds", ...)
        self.cases_finished = 0
        self.case_index = 0
        self.case = None
        self.case_t0 = None
        self.case_seconds: list[float] = []
        self.stage = None
        self.message = None
        self.member = self.n_members = None
        self.unit = self.done = self.total = None
        self.estimate = None
        self.passes_done = 0
        self._member_passes_base = 0
        self._inference_t0 = None
        self.lines: list[str] = []  # every plain line printed (tests)

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self):
        if self.stream is None:
            self.stream = sys.stderr
        if self.tty is None:
            try:
                self.tty = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                self.tty = False
        self._t0 = self._last_line = time.monotonic()
        if self.tty or self.interval > 0:
            self._thread = threading.Thread(target=self._heartbeat, name="calibu-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.before_output()
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(REDRAW_S if self.tty else min(0.5, max(self.interval / 3, 0.05))):
            with self._lock:
                if self.stage is None:
                    continue
                now = time.monotonic()
                if self.tty:
                    if now - self._last_draw >= 1.0:
                        self._draw()
                elif self.interval > 0 and now - self._last_line >= self.interval:
                    self._print("progress: " + self.status())

    # --- events ----------------------------------------------------------------------------
    def on_event(self, event: dict) -> None:
        with self._lock:
            stage = event.get("stage")
            if stage == "cohort":
                self.n_cases = event.get("n_cases", self.n_cases)
                self.job = event.get("message") or self.job
                self.cases_finished = int(event.get("done", 0)) + int(event.get("failed", 0))
                if event.get("event") == "started" and event.get("case"):
                    self._start_case(event["case"])
                elif event.get("event") in ("done", "failed") and self.case_t0 is not None:
                    self.case_seconds.append(time.monotonic() - self.case_t0)
                    self.case_t0 = None
                self._update()
                return
            case = event.get("case")
            if case and case != self.case:
                self._start_case(case)
            if stage == "estimate":
                self.estimate = event
                self._print(f"{event.get('case', '')}: {event.get('message', '')}".strip(": "), always=True)
                return
            if stage != self.stage or event.get("member") != self.member:
                self.unit = self.done = self.total = None
            if stage in NETWORK_STAGES and event.get("member") is not None:
                if self._inference_t0 is None:
                    self._inference_t0 = time.monotonic()
                self._member_passes_base = self._passes_before(int(event["member"]) - 1)
            self.stage = stage
            self.message = event.get("message")
            self.member, self.n_members = event.get("member"), event.get("n_members", self.n_members)
            self._update()

    def on_tick(self, unit: str, done: int, total: int) -> None:
        with self._lock:
            self.unit, self.done, self.total = unit, int(done), int(total)
            if unit == "patch" and self.stage in NETWORK_STAGES:
                self.passes_done = self._member_passes_base + int(done) * self._passes_per_patch()
            self._update(draw_only=True)

    def before_output(self) -> None:
        with self._lock:
            if self.tty and self._shown and self.stream is not None:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
                self._shown = False

    # --- text ------------------------------------------------------------------------------
    def status(self) -> str:
        """The status text (without a prefix)."""
        parts = [self.job] if self.job else []
        if self.case:
            n = self.n_cases
            parts.append(f"case {self.case_index}/{n} {self.case}" if n and n > 1 else f"case {self.case}")
        if self.stage:
            parts.append(self.stage + (f" {self.message}" if self.message and self.stage in ("maps", "demo") else ""))
        if self.member is not None and self.n_members:
            parts.append(f"member {self.member}/{self.n_members}")
        if self.unit and self.total:
            parts.append(f"{self.unit} {self.done}/{self.total}")
        parts.append(duration(time.monotonic() - self._t0))
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {duration(eta)}")
        return " · ".join(parts)

    def eta(self) -> float | None:
        """Seconds left (module docstring), or None when unknown."""
        left = None
        est = self.estimate
        if self.stage in NETWORK_STAGES and est and est.get("case") == self.case and est.get("n_network_passes"):
            remaining = max(int(est["n_network_passes"]) - self.passes_done, 0)
            rate = est.get("seconds_per_pass")
            if self.passes_done and self._inference_t0 is not None:
                rate = (time.monotonic() - self._inference_t0) / self.passes_done
            if rate:
                left = remaining * float(rate)
        if self.n_cases and self.case_seconds:
            mean = sum(self.case_seconds) / len(self.case_seconds)
            later = max(self.n_cases - self.cases_finished - (1 if self.case_t0 is not None else 0), 0)
            current = 0.0
            if self.case_t0 is not None:
                if left is None and time.monotonic() - self.case_t0 >= mean:
                    return None  # this case already took longer than the mean: no honest guess
                current = max(mean - (time.monotonic() - self.case_t0), 0.0) if left is None else left
            left = later * mean + current
        return left

    # --- internals -------------------------------------------------------------------------
    def _start_case(self, case: str) -> None:
        if case == self.case and self.case_t0 is not None:
            return
        self.case = case
        self.case_index = min(self.cases_finished + 1, self.n_cases or self.cases_finished + 1)
        self.case_t0 = time.monotonic()
        self.stage = self.member = self.unit = self.done = self.total = None
        self.passes_done = self._member_passes_base = 0
        self._inference_t0 = None
        if not self.tty:
            n = self.n_cases
            job = f"{self.job} · " if self.job else ""
            self._print(f"progress: {job}case {self.case_index}/{n} {case} started" if n and n > 1 else
                        f"progress: {job}case {case} started", always=True)

    def _passes_per_patch(self) -> int:
        est = self.estimate
        if est and est.get("case") == self.case and est.get("n_patches") and est.get("n_members"):
            return max(int(est["n_network_passes"]) // (int(est["n_patches"]) * int(est["n_members"])), 1)
        return 1

    def _passes_before(self, members_done: int) -> int:
        est = self.estimate
        if est and est.get("case") == self.case and est.get("n_members"):
            return members_done * int(est["n_network_passes"]) // int(est["n_members"])
        return 0

    def _update(self, draw_only: bool = False) -> None:
        if self.tty and time.monotonic() - self._last_draw >= REDRAW_S:
            self._draw()

    def _draw(self) -> None:
        if self.stream is None:
            return
        width = shutil.get_terminal_size((100, 20)).columns
        text = self.status()
        if len(text) > width - 1:
            text = text[: max(width - 2, 10)] + "…"
        self.stream.write("\r\x1b[2K" + text)
        self.stream.flush()
        self._shown = True
        self._last_draw = time.monotonic()

    def _print(self, line: str, always: bool = False) -> None:
        if self.stream is None or (not always and not line):
            return
        self.before_output()
        self.stream.write(line + "\n")
        self.stream.flush()
        self.lines.append(line)
        self._last_line = time.monotonic()
        if self.tty:
            self._draw()
