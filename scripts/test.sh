#!/usr/bin/env bash
# The project's test command: sets up .venv if needed, then runs the whole suite.
# Without arguments it first runs the MRML tests on the other slicer-core wheels
# (scripts/test_slicer_wheels.sh; CALIBU_SLICER_WHEELS="" skips them); with arguments it passes
# them to pytest (e.g. one test file) and runs only that. The whole suite runs on 2 pytest-xdist
# workers (CALIBU_TEST_WORKERS=N for another number, 0 for none).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
status=0
if [ $# -eq 0 ]; then
  bash "$root/scripts/test_slicer_wheels.sh" || status=$?
fi
if [ $# -eq 0 ]; then
  # the whole suite on CALIBU_TEST_WORKERS pytest-xdist workers (default 2; 0 = in this process)
  set -- -n "${CALIBU_TEST_WORKERS:-2}" --dist loadfile
fi
"${CALIBU_VENV:-$root/.venv}/bin/python" -m pytest -q -ra "$@" || status=$?
exit $status
