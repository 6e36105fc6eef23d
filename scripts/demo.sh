#!/usr/bin/env bash
# The project's main job on its embedded default: sets up .venv if needed, then generates a
# phantom CT dataset, trains a tiny nnU-Net deep ensemble and checkpoint ensemble on the CPU,
# fits the temperature, predicts held-out cases and writes maps, regions and a report to
# demo_output/. Reruns reuse what is complete.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "${CALIBU_VENV:-$root/.venv}/bin/calib-uncertainty" demo --workdir "${CALIBU_DEMO_DIR:-$root/demo_output}" "$@"
