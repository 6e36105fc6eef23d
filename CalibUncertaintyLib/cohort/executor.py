"""Map one per-case function over a cohort: the same function for the local loop and for Ray.

``run_cohort(fn, job, items, options)`` calls ``fn(job, item)`` once per case and returns a
``CohortResult``. ``job`` holds what every case shares (options, calibration, output folder; sent
to Ray once), ``item`` what one case needs (``(case_id, item)`` pairs). The function must be
importable (module level) and its result small: it travels back to the driver.

Policy, the same for both executors:

- A case that raises one of the project's own errors (``errors.CalibUncertaintyError``: bad
  input, geometry, calibration) or any other deterministic Python error fails at once: running
  it again would fail the same way. Transient errors (``OSError``, ``MemoryError``,
  ``TimeoutError``, ``ConnectionError``) are retried up to ``max_retries`` times.
- On Ray, a worker process that dies mid-case (killed, out of memory) is retried by Ray itself
  (``max_retries`` of the task); when retries run out the case is failed with Ray's error.
- A failed case is recorded with its error and the other cases go on; the caller decides what a
  failure means for its result (``CohortResult.failed``).
- Ctrl-C (KeyboardInterrupt) stops the cohort: running Ray tasks are cancelled, a Ray runtime
  started here is shut down, and the interrupt propagates (exit code 130 in the CLI).

Results are returned in the order of ``items`` whatever order the cases finish in, so reductions
over them (sums, concatenations) are the same under both executors.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InputError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
TRANSIENT_ERRORS = (OSError, MemoryError, TimeoutError, ConnectionError)


@dataclass(frozen=True)
class ExecutorOptions:
    """Where and how a cohort runs.

    ``kind``: "local" (one case after the other in this process, the default) or "ray".
    ``ray_address``: join this Ray cluster (e.g. ``ray://head:10001`` or ``auto``); None starts a
    local Ray runtime for the run and stops it afterwards. ``max_retries``: retries per case
    after a worker death or a transient error. ``workers``: at most this many cases at once on
    Ray (and the CPU count of a local runtime started here); None = as the cluster's resources allow.
    """

    kind: str = "local"
    ray_address: str | None = None
    max_retries: int = 2
    workers: int | None = None

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise InputError(f"unknown executor {self.kind!r}; choose one of {', '.join(EXECUTORS)}")
        if self.max_retries < 0:
            raise InputError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"workers must be >= 1, got {self.workers}")
        if self.ray_address is not None and self.kind != "ray":
            raise InputError("a Ray address only applies with the ray executor (--executor ray)")


@dataclass(frozen=True)
class TaskResources:
    """What one case asks the Ray scheduler for: CPUs, and one GPU where the cluster has GPUs
    (``gpu_if_available``: inference). Ignored by the local executor."""

    num_cpus: float = 1.0
    gpu_if_available: bool = False


@dataclass
class CohortResult:
    """Outcome of a cohort run. ``results``: case -> the function's return value (done cases)."""

    cases: list[str]
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    executor: str = "local"
    on_done: Callable | None = field(default=None, repr=False, compare=False)

    def add_done(self, case: str, value) -> None:
        self.results[case] = value
        self.done.append(case)
        if self.on_done is not None:
            self.on_done(case, value)

    def ordered(self) -> list:
        """Results of the done cases, in the order the cases were given."""
        return [self.results[c] for c in self.cases if c in self.results]

    def record(self) -> dict:
        """The JSON record of the run: done / skipped / failed (with each error)."""
        return {"executor": self.executor,
                "done": [c for c in self.cases if c in self.results],
                "skipped": list(self.skipped),
                "failed": [{"case": c, "error": e} for c, e in self.failed.items()],
                "retried": {c: n - 1 for c, n in self.attempts.items() if n > 1}}

    def error(self, resumable: bool = True):
        """The error to raise after a run in which cases failed: the failed case's own message
        first when one failed, else a count with the first three (the others are complete)."""
        from ..errors import CalibUncertaintyError

        n = len(self.cases) + len(self.skipped)
        others = n - len(self.failed)
        if resumable:
            tail = (f"; the other {others} case(s) are complete, and a rerun redoes only the failed ones"
                    if others else "")
        else:
            tail = "; nothing was written"
        if len(self.failed) == 1:
            (case, err), = self.failed.items()
            return CalibUncertaintyError(f"{err} [case {case} failed{tail}]")
        shown = "; ".join(f"{c}: {e}" for c, e in list(self.failed.items())[:3])
        more = f"; and {len(self.failed) - 3} more" if len(self.failed) > 3 else ""
        return CalibUncertaintyError(f"{len(self.failed)} of {n} case(s) failed ({shown}{more}){tail}")

    def describe(self) -> str:
        return (f"{len(self.done)} done, {len(self.skipped)} skipped (already complete), "
                f"{len(self.failed)} failed")


def is_transient(exc: BaseException) -> bool:
    """True for errors worth another attempt (I/O, memory); False for deterministic ones."""
    from ..errors import CalibUncertaintyError

    return isinstance(exc, TRANSIENT_ERRORS) and not isinstance(exc, CalibUncertaintyError)


def error_text(exc: BaseException) -> str:
    """One line naming the error: the project's own errors by their message, others with their type."""
    from ..errors import CalibUncertaintyError

    if isinstance(exc, CalibUncertaintyError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".strip()


def run_cohort(fn: Callable, job, items: list[tuple[str, Any]], options: ExecutorOptions | None = None,
               desc: str = "cohort", resources: TaskResources | None = None,
               skipped: list[str] | None = None, on_done: Callable | None = None) -> CohortResult:
    """Call ``fn(job, item)`` for every ``(case_id, item)`` of ``items`` with ``options``' executor.

    ``skipped``: case ids already complete (reported, not run). ``on_done(case_id, value)`` is
    called in this process as each case finishes (e.g. to record it in an index at once). Shows the cohort progress bar
    and emits the cohort progress lines. Raises InputError for a Ray setup problem (Ray missing,
    cluster unreachable) before any case runs.
    """
    from .progress import CohortProgress

    options = options or ExecutorOptions()
    cases = [c for c, _ in items]
    if len(set(cases)) != len(cases):
        raise InputError("a case id appears twice in the cohort")
    result = CohortResult(cases=cases, skipped=list(skipped or []), executor=options.kind, on_done=on_done)
    with CohortProgress(len(items), desc, n_skipped=len(result.skipped)) as progress:
        if options.kind == "ray":
            from .ray_backend import run_on_ray

            run_on_ray(fn, job, items, options, resources or TaskResources(), result, progress)
        else:
            _run_local(fn, job, items, options, result, progress)
    return result


def _run_local(fn, job, items, options: ExecutorOptions, result: CohortResult, progress) -> None:
    for case, item in items:
        attempt = 0
        while True:
            attempt += 1
            result.attempts[case] = attempt
            progress.started(case)
            try:
                value = fn(job, item)
            except Exception as exc:  # KeyboardInterrupt propagates: Ctrl-C stops the cohort
                if is_transient(exc) and attempt <= options.max_retries:
                    log.warning("case %s: %s; retrying (attempt %d of %d)", case, error_text(exc),
                                attempt + 1, options.max_retries + 1)
                    progress.retried(case)
                    continue
                log.debug("case %s failed:\n%s", case, traceback.format_exc())
                result.failed[case] = error_text(exc)
                progress.finished(case, ok=False)
                break
            result.add_done(case, value)
            progress.finished(case, ok=True)
            break
