#!/usr/bin/env bash
# GPU check (issue 9 item 5, issue 19): `calib-uncertainty predict` and `nnUNetv2_predict --save_probabilities`
# side by side on one real-size CT (an OpenKBP CT resampled to 512x512xSLICES, real anatomy) with a
# 5-fold random-weight nnU-Net model of K = 14 classes (bench/many_classes.py's model: a tiny network,
# logits on a grid twice the CT's in-plane spacing, so both tools resample them with nnU-Net's
# probability resampling), test-time augmentation on, on CUDA. Prints wall/CPU time, peak host RSS and
# peak GPU memory (nvidia-smi, above idle) of both tools and the ratios predict / nnU-Net
# (bench/predict_vs_nnunet.py --gpu-memory). Before that, bench/gpu_equivalence.py compares on the GPU:
# the sliding window (and its out-of-memory fallback) with nnU-Net's, and the maps computed on the GPU
# (torch backend: resampling, softmax, sums, every map) with the CPU path's.
#
#   bash bench/gpu_check.sh                 # on a machine with an NVIDIA GPU (CUDA build of torch)
#   bash bench/gpu_check.sh --cpu           # dry run of every step on the CPU (tiny CT, 1 fold, no TTA,
#                                           #   no nvidia-smi; the maps through the torch backend on the CPU)
#   SLICES=300 K=14 FOLDS=5 TTA=1 bash bench/gpu_check.sh          # the defaults on a GPU
#   MODEL=/path/to/model bash bench/gpu_check.sh                   # a real model folder instead
#   EQUIVALENCE=0 bash bench/gpu_check.sh                          # without the equivalence checks
#   CALIBU_DEVICE_MAPS=0 bash bench/gpu_check.sh                   # predict with the maps on the CPU (baseline)
#
# Writes nothing into the repository; the results go to stdout (and $OUT/gpu_check.json when OUT is set).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
mode="${1:-gpu}"
work="$(mktemp -d "${TMPDIR:-/tmp}/calibu_gpu_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
k="${K:-14}"
if [ "$mode" = "--cpu" ]; then
  device=cpu; slices="${SLICES:-8}"; gpu_flag=""; folds="${FOLDS:-1}"; tta="${TTA:-0}"
  export CALIBU_DEVICE_MAPS="${CALIBU_DEVICE_MAPS:-cpu}"  # the device path, run by torch on the CPU
else
  device=cuda; slices="${SLICES:-300}"; gpu_flag="--gpu-memory"; folds="${FOLDS:-5}"; tta="${TTA:-1}"
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
if [ "${EQUIVALENCE:-1}" != 0 ]; then  # sliding window vs nnU-Net's (incl. the device-memory fallback); maps on the device vs the CPU's
  "$py" "$here/bench/gpu_equivalence.py" --device "$device" --ct "$work/ct_0000.nii.gz" \
    || echo "gpu_equivalence: differences found (see above)"
fi
model="${MODEL:-}"
if [ -z "$model" ]; then  # K classes, folds 0..FOLDS-1, random weights (bench/many_classes.py)
  model="$("$py" - "$work/models" "$work/ct_0000.nii.gz" "$k" "$folds" <<'PY'
import sys
sys.path.insert(0, "bench")
import SimpleITK as sitk
from many_classes import build_model
ct = sitk.ReadImage(sys.argv[2])
print(build_model(__import__("pathlib").Path(sys.argv[1]), int(sys.argv[3]), ct.GetSpacing(),
                  [str(f) for f in range(int(sys.argv[4]))]))
PY
)"
  echo "model: random-weight, K = $k classes, $folds fold(s): $model"
fi
tta_flag="--no-tta"
[ "$tta" = 1 ] && tta_flag="--tta"
"$py" "$here/bench/predict_vs_nnunet.py" --model "$model" --ct "$work/ct_0000.nii.gz" \
  --device "$device" "$tta_flag" $gpu_flag ${OUT:+--json "$OUT/gpu_check.json"}
