"""Run ``calib-uncertainty`` with a memory trace: one line per progress event on stderr,

    MEMTRACE <stage> <member or map> rss <MiB> peak-since-previous <MiB>

(resident memory now and its peak since the previous line, from /proc; Linux only). Used by
``bench/predict_vs_nnunet.py --trace``; not part of the library.

    python bench/_memory_trace.py predict -i CT -m MODEL -o OUT ...
"""

from __future__ import annotations

import sys


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _mark(label: str) -> None:
    sys.stderr.write(f"MEMTRACE {label:44s} rss {_status('VmRSS'):7.0f} peak-since-previous {_status('VmHWM'):7.0f}\n")
    sys.stderr.flush()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak (VmHWM) to the current RSS
        f.write("5")


def main(argv: list[str]) -> int:
    import CalibUncertaintyLib.progress as progress

    def traced(stage, fraction=None, stream=None, **fields):
        detail = fields.get("message") or ""
        _mark(f"{stage} {detail}".strip())

    progress.emit_progress = traced  # before any module imports it by name
    from CalibUncertaintyLib.cli.main import main as cli

    _mark("start")
    rc = cli(argv)
    _mark("end")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
