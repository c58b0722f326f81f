#!/usr/bin/env bash
# The fused step's GPU checks in one call, for a session that has a CUDA device (an H200 in
# the issue's targets). Runs the gpu-marked tests (sync detection, agreement with the
# reference, peak memory), then the step-time benchmark on CUDA twice -- Inductor's default
# and with combo kernels for the fused passes -- and the fmnist_cnn epoch comparison.
# Output: stdout, plus runs/gpu_check/*.json. About 5-8 minutes, most of it compiling.
# Usage: bash scripts/gpu_check.sh [--quick]   (--quick: CNN and ResNet-34 sets only)
# Dry run without a GPU: DEVICE=cpu SETS=cnn REPEATS=2 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -d .venv ]; then . .venv/bin/activate; fi
out=runs/gpu_check
mkdir -p "$out"
device="${DEVICE:-cuda}"
repeats="${REPEATS:-30}"
sets="${SETS:-cnn resnet34 gpt2}"
if [ "${1:-}" = "--quick" ]; then sets="cnn resnet34"; fi
status=0

echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
echo "== pytest -m gpu"
python -m pytest -q -m gpu tests/gpu -p no:cacheprovider
rc=$?; if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then status=1; fi  # 5: all skipped (no CUDA)

echo "== step time, $device, Inductor defaults"
python benchmarks/step_time.py --device "$device" --sets $sets --repeats "$repeats" \
  --json "$out/step_time_$device.json" || status=1
echo "== step time, $device, combo kernels for the fused passes"
python benchmarks/step_time.py --device "$device" --sets $sets --repeats "$repeats" \
  --optimizers "arturo (fused)" "AdamW (fused)" --inductor combo_kernels=1 \
  --json "$out/step_time_${device}_combo.json" || status=1
echo "== fmnist_cnn epoch, $device"
python benchmarks/step_time.py --device "$device" --sets cnn --repeats 5 \
  --optimizers "Adam (foreach)" --epoch --json "$out/epoch_$device.json" || status=1
echo "== exit status $status"
exit $status
