#!/usr/bin/env bash
# GPU check (issue 9, item 5): `calib-uncertainty predict` and `nnUNetv2_predict --save_probabilities`
# side by side on one real-size CT (an OpenKBP CT resampled to 512x512xSLICES, real anatomy) with a
# 5-fold random-weight nnU-Net model, on CUDA; prints wall/CPU time, peak host RSS, peak GPU memory
# (nvidia-smi, above idle) of both and the ratios (bench/predict_vs_nnunet.py --gpu-memory); before that, on
# CUDA, bench/gpu_equivalence.py compares the CUDA sliding window (and its out-of-memory fallback) with nnU-Net's.
#
#   bash bench/gpu_check.sh                 # on a machine with an NVIDIA GPU (CUDA build of torch)
#   bash bench/gpu_check.sh --cpu           # dry run of the same steps on the CPU: small CT, 1 fold, no nvidia-smi
#   SLICES=300 MODEL=/path/to/model bash bench/gpu_check.sh   # a real model folder instead of the random one
#   FOLDS=2 EQUIVALENCE=0 bash bench/gpu_check.sh              # 2 folds, without the sliding-window comparison
#
# Writes nothing into the repository; the results go to stdout (and $OUT/gpu_check.json when OUT is set).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
mode="${1:-gpu}"
work="$(mktemp -d "${TMPDIR:-/tmp}/calibu_gpu_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
if [ "$mode" = "--cpu" ]; then
  device=cpu; slices="${SLICES:-16}"; gpu_flag=""; folds="${FOLDS:-1}"  # a dry run: one fold
else
  device=cuda; slices="${SLICES:-300}"; gpu_flag="--gpu-memory"; folds="${FOLDS:-5}"
  command -v nvidia-smi >/dev/null || { echo "error: nvidia-smi not found (use --cpu for a dry run)" >&2; exit 2; }
  "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { echo "error: torch sees no CUDA device (a CPU build of torch?)" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
cd "$here"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
"$py" - "$work/ct_0000.nii.gz" "$slices" <<'PY'
import sys
sys.path.insert(0, "bench")
from _real_size_ct import make_ct
from predict_vs_nnunet import default_ct
size, spacing = make_ct(default_ct(), __import__("pathlib").Path(sys.argv[1]), int(sys.argv[2]))
print(f"input CT: {default_ct().name} resampled to {size}, spacing {tuple(round(s, 3) for s in spacing)} mm")
PY
if [ "$device" = cuda ] && [ "${EQUIVALENCE:-1}" != 0 ]; then  # CUDA sliding window vs nnU-Net's, incl. the device-memory fallback
  "$py" "$here/bench/gpu_equivalence.py" --device cuda --ct "$work/ct_0000.nii.gz" || echo "gpu_equivalence: differences found (see above)"
fi
model_args=()
[ -n "${MODEL:-}" ] && model_args=(--model "$MODEL")
"$py" "$here/bench/predict_vs_nnunet.py" "${model_args[@]}" --tiny-folds "$folds" --ct "$work/ct_0000.nii.gz" \
  --device "$device" --no-tta $gpu_flag ${OUT:+--json "$OUT/gpu_check.json"}
