"""Cohort progress for a person (a tqdm bar: done, running, failed, ETA; or, under the command
line, its live display, which follows the ``cohort`` events) and for programs
(``progress.emit_progress`` lines with stage ``cohort``)."""

from __future__ import annotations

import sys

from ..progress import emit_progress


class CohortProgress:
    """Counts of one cohort run, shown as a bar on stderr (when it is a terminal) and as
    ``CALIBU_PROGRESS {"stage": "cohort", "fraction", "done", "running", "failed", "skipped", ...}`` lines."""

    def __init__(self, total: int, desc: str, n_skipped: int = 0):
        self.total, self.desc, self.skipped = total, desc, n_skipped
        self.done = self.failed = 0
        self.running: set[str] = set()
        self._bar = None

    def __enter__(self):
        from tqdm import tqdm

        from ..progress import has_display

        if has_display():  # the command line's live display shows the cohort (cli.live_progress)
            self._show(None)
            return self
        self._bar = tqdm(total=self.total, desc=self.desc, file=sys.stderr, disable=None, unit="case",
                         dynamic_ncols=True, leave=False)
        self._show(None)
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()
        return False

    def started(self, case: str) -> None:
        self.running.add(case)
        self._show(case, event="started")

    def retried(self, case: str) -> None:
        self._show(case, event="retry")

    def finished(self, case: str, ok: bool) -> None:
        self.running.discard(case)
        if ok:
            self.done += 1
        else:
            self.failed += 1
        if self._bar is not None:
            self._bar.update(1)
        self._show(case, event="done" if ok else "failed")

    def _show(self, case, event: str | None = None) -> None:
        if self._bar is not None:
            self._bar.set_postfix(running=len(self.running), failed=self.failed, refresh=True)
        finished = self.done + self.failed
        emit_progress("cohort", finished / self.total if self.total else 1.0, case=case, event=event,
                      done=self.done, running=len(self.running), failed=self.failed, skipped=self.skipped,
                      n_cases=self.total, message=self.desc)
