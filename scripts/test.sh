#!/usr/bin/env bash
# The project's test command: sets up .venv if needed, then runs the whole suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "${CALIBU_VENV:-$root/.venv}/bin/python" -m pytest -q -ra "$@"
