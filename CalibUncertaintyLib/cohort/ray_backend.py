"""The Ray side of ``executor.run_cohort``: a Ray runtime for the run and the task loop.

Ray is imported here only (it is the optional extra ``calib-uncertainty[ray]``). Without an
address a local runtime is started for the run (no dashboard, no usage statistics, its files
under a short temp folder so its socket paths stay within the OS limit) and shut down at the
end, also after an error or Ctrl-C. A runtime that is already initialised in this process (a
test session, a notebook) or a cluster given by address is used as it is; only what this
module started is stopped.

Each case is one Ray task running ``_cohort_case(fn, job, item)``: the shared ``job`` is put in
the object store once. Ray retries a task whose worker died (``max_retries``); Python errors
are not retried by Ray (``retry_exceptions=False``) but by the loop below, following
``executor.is_transient``. At most ``workers`` (default: what the cluster's CPUs / GPUs allow)
cases are in flight, so "running" in the progress means running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import traceback

from ..errors import InputError
from .executor import error_text, is_transient

log = logging.getLogger(__name__)


def _short_temp_dir() -> str:
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(base, f"calibu-ray-{uid}")


def import_ray():
    """``import ray`` with usage statistics off; InputError naming the extra when Ray is missing."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise InputError("--executor ray needs Ray: pip install 'calib-uncertainty[ray]' "
                         "(or pip install 'ray==2.60.0')") from None
    return ray


def init_kwargs(options) -> dict:
    """Arguments of ``ray.init`` for ``options`` (join ``ray_address``, else start a local runtime)."""
    kw = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if options.ray_address:
        return {"address": options.ray_address, "log_to_driver": False, "logging_level": logging.WARNING}
    # "local": a new runtime even when RAY_ADDRESS or a `ray start` cluster exists (use
    # --ray-address auto for those)
    kw.update(address="local", num_cpus=options.workers, _temp_dir=_short_temp_dir())
    return kw


@contextlib.contextmanager
def ray_runtime(options):
    """Yield the ``ray`` module with a runtime to use; stop it afterwards when started here."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(**init_kwargs(options))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {options.ray_address}" if options.ray_address else "a local Ray runtime"
        raise InputError(f"could not start or join {where}: {exc}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def _cohort_case(fn, job, item):
    """The Ray task of one case (the worker's process title reads ``ray::_cohort_case``)."""
    return fn(job, item)


def placement(cluster: dict, resources, workers: int | None) -> tuple[float, int, int]:
    """(CPUs per task, GPUs per task, cases in flight) for a cluster's resources (``ray.cluster_resources()``).

    A task that wants a GPU (``resources.gpu_if_available``: inference) gets one GPU and no CPU
    reservation where the cluster has GPUs, and as many cases run at once as there are GPUs;
    otherwise ``resources.num_cpus`` CPUs and as many cases as the CPUs allow. ``workers`` caps
    the cases in flight.
    """
    if resources.gpu_if_available and cluster.get("GPU", 0) >= 1:
        cpus, gpus, slots = 0.0, 1, int(cluster["GPU"])
    else:
        cpus, gpus = float(resources.num_cpus), 0
        slots = int(cluster.get("CPU", 1) // max(cpus, 1e-9))
    slots = max(1, slots)
    return cpus, gpus, (workers if workers is not None else slots)


def run_on_ray(fn, job, items, options, resources, result, progress) -> None:
    """Run every case as a Ray task and fill ``result`` (see ``executor.run_cohort``)."""
    with ray_runtime(options) as ray:
        from ray.exceptions import RayTaskError

        cpus, gpus, slots = placement(ray.cluster_resources(), resources, options.workers)
        task = ray.remote(_cohort_case).options(num_cpus=cpus, num_gpus=gpus, max_retries=options.max_retries,
                                               retry_exceptions=False)
        fn_ref, job_ref = ray.put(fn), ray.put(job)
        pending = list(reversed(items))
        inflight: dict = {}
        errors_seen: dict[str, int] = {}
        try:
            while pending or inflight:
                while pending and len(inflight) < slots:
                    case, item = pending.pop()
                    result.attempts[case] = result.attempts.get(case, 0) + 1
                    inflight[task.remote(fn_ref, job_ref, item)] = (case, item)
                    progress.started(case)
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
                for ref in ready:
                    case, item = inflight.pop(ref)
                    try:
                        value = ray.get(ref)
                    except RayTaskError as exc:  # the function raised: our retry policy
                        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                        errors_seen[case] = errors_seen.get(case, 0) + 1
                        if is_transient(cause) and errors_seen[case] <= options.max_retries:
                            log.warning("case %s: %s; retrying", case, error_text(cause))
                            progress.retried(case)
                            progress.running.discard(case)
                            pending.append((case, item))
                            continue
                        log.debug("case %s failed on Ray:\n%s", case, "".join(traceback.format_exception(cause)))
                        result.failed[case] = error_text(cause)
                        progress.finished(case, ok=False)
                    except Exception as exc:  # worker died more often than max_retries, object lost ...
                        first = (str(exc).strip().splitlines() or [""])[0]
                        result.failed[case] = f"{type(exc).__name__}: {first}"
                        progress.finished(case, ok=False)
                    else:
                        result.add_done(case, value)
                        progress.finished(case, ok=True)
        except KeyboardInterrupt:
            for ref in inflight:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
