#!/usr/bin/env bash
# The device check for a lent GPU machine (the H200 image: Python 3.12, torch 2.11 + CUDA 13, triton 3.6,
# nvcc 13, no internet). Builds the CUDA extension with the system Python, runs the GPU tests and the
# benchmarks on cuda, writes everything under $OUT and prints the speed table last. Under 8 minutes.
#   OUT=/tmp/out benchmarks/device_check.sh        (then commit $OUT/*.json under benchmarks/results/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # this machine only: half the build time
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
t0=$(date +%s)
elapsed() { echo "[$(($(date +%s) - t0)) s] $*"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/env.txt"

elapsed "building the extension (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if ! $PY -m pip install --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
$PY -c "import dllm_kernels as d; [print(f'{k:10s} {v}') for k, v in d.available_backends().items()]" \
  2>&1 | tee -a "$OUT/env.txt"

elapsed "GPU tests"
timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests >"$OUT/gpu-tests.txt" 2>&1
echo "pytest exit code $?" >>"$OUT/gpu-tests.txt"
tail -15 "$OUT/gpu-tests.txt"

elapsed "benchmarks"
timeout 240 $PY -m dllm_kernels.bench --device cuda --out "$OUT" 2>"$OUT/bench-progress.txt" | tee "$OUT/bench.txt"
elapsed "done"
