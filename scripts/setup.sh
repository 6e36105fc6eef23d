#!/usr/bin/env bash
# Creates .venv (once) with everything the project needs, then installs the project itself.
# Idempotent: a second run only checks that the environment is complete.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CALIBU_VENV:-$root/.venv}"
stamp="$venv/.calibu-installed"
want="$(cat "$root/scripts/requirements.txt" "$root/scripts/constraints.txt" "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
py="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
"$venv/bin/python" -m pip install -q -c "$root/scripts/constraints.txt" -r "$root/scripts/requirements.txt" 2>&1 | grep -v '^WARNING: Location' || true
# nnunetv2 -> dynamic-network-architectures -> timm pulls a torchvision whose compiled ops do not
# load against the CPU torch; nothing on this project's path needs it (see docs/PLATFORM notes).
"$venv/bin/python" -m pip uninstall -y -q torchvision timm 2>/dev/null || true
"$venv/bin/python" -m pip install -q --no-deps -e "$root" 2>&1 | grep -v '^WARNING: Location' || true
"$venv/bin/python" - <<'PY'
import torch, nnunetv2, SimpleITK, scipy, slicer  # noqa: F401  fail loudly if the install is broken
assert torch.__version__.startswith("2.13.0"), torch.__version__
PY
echo "$want" > "$stamp"
