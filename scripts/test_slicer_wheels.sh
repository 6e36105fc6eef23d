#!/usr/bin/env bash
# The MRML tests (every test file marked `pytestmark = pytest.mark.slicer`, run with -m slicer) on
# each slicer-core wheel other than the suite's own (scripts/requirements.txt pins 5.13.31053.0 in
# .venv): by default 5.11.0.6 (the 5.11 line trame-slicer builds on) and 5.12.4.0 (Slicer 5.12's).
# Run by scripts/test.sh after the suite; on its own:  bash scripts/test_slicer_wheels.sh
#
# One small venv per version (slicer-core + scripts/requirements-slicer-wheels.txt: numpy, scipy,
# SimpleITK as Slicer 5.12 ships them, pytest; no torch), each created once and kept while its
# stamp (the requirements, the version, the Python) matches, like scripts/setup.sh's .venv.
# Wheels are kept in a wheelhouse outside the clone (downloaded once, then installed offline:
# pip's own HTTP cache is not kept on every machine); the venvs are installed and tested in
# parallel. Environment: CALIBU_SLICER_WHEELS (versions, "" = none), CALIBU_WHEEL_VENVS (where the
# venvs go), CALIBU_WHEELHOUSE, PYTHON.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
versions="${CALIBU_SLICER_WHEELS-5.11.0.6 5.12.4.0}"
venvs="${CALIBU_WHEEL_VENVS:-$root/.venv-slicer-wheels}"
house="${CALIBU_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/calib-uncertainty/wheelhouse}"
req="$root/scripts/requirements-slicer-wheels.txt"
[ -n "$versions" ] || { echo "slicer-core wheels: none requested"; exit 0; }
mkdir -p "$venvs" "$house"
t0=$(date +%s)
log() { echo "[slicer-core wheels $(( $(date +%s) - t0 ))s] $*"; }

# 1. wheels into the wheelhouse, one version after the other (same folder: no two writers)
for v in $versions; do
  want="$( (cat "$req"; echo "slicer-core==$v"; "$py" -V) | sha256sum | cut -c1-16)"
  if [ -f "$venvs/$v/.calibu-installed" ] && [ "$(cat "$venvs/$v/.calibu-installed")" = "$want" ]; then
    continue
  fi
  log "downloading slicer-core $v and its test requirements (once per wheelhouse)"
  "$py" -m pip download -q -d "$house" "slicer-core==$v" -r "$req" 2>&1 | grep -v '^WARNING: Location' || true
done

# 2. the venvs, in parallel, offline from the wheelhouse
setup_one() {
  local v=$1 venv="$venvs/$1" want
  want="$( (cat "$req"; echo "slicer-core==$v"; "$py" -V) | sha256sum | cut -c1-16)"
  if [ -f "$venv/.calibu-installed" ] && [ "$(cat "$venv/.calibu-installed")" = "$want" ]; then
    return 0
  fi
  rm -rf "$venv"
  "$py" -m venv "$venv" || return 1
  "$venv/bin/python" -m pip install -q --no-compile --no-index --find-links "$house" "slicer-core==$v" -r "$req" \
    2>&1 | grep -v '^WARNING: Location'
  "$venv/bin/python" -c "import importlib.metadata as m, slicer; assert m.version('slicer-core') == '$v'" || return 1
  echo "$want" > "$venv/.calibu-installed"
}
pids=()
for v in $versions; do setup_one "$v" > "$venvs/setup-$v.log" 2>&1 & pids+=($!); done
status=0
i=0
for v in $versions; do
  if ! wait "${pids[$i]}"; then status=1; log "could not set up slicer-core $v:"; cat "$venvs/setup-$v.log"; fi
  i=$((i + 1))
done
[ $status -eq 0 ] || exit $status
log "venvs ready"

# 3. the MRML tests in each, in parallel
files=$(grep -l '^pytestmark = pytest.mark.slicer' Testing/Python/test_*.py)
pids=()
for v in $versions; do
  PYTHONPATH="$root" "$venvs/$v/bin/python" -m pytest -q -ra -m slicer -p no:cacheprovider --durations=10 $files \
    > "$venvs/test-$v.log" 2>&1 &
  pids+=($!)
done
i=0
for v in $versions; do
  rc=0; wait "${pids[$i]}" || rc=$?
  echo "===== MRML tests on slicer-core $v (exit $rc) ====="
  cat "$venvs/test-$v.log"
  [ $rc -eq 0 ] || status=1
  i=$((i + 1))
done
log "done"
exit $status
