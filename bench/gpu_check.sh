#!/usr/bin/env bash
# GPU validation in one go, for a lent H100/H200 (see the device tool's README):
#   1. the machine and versions;
#   2. the GPU parity tests (tests/gpu: cuda backend against torch, real sizes; BatchNorm through
#      the C++ cuda ops, tests/gpu/test_cuda_ops.py), and the backend's tests again with the C++
#      ops off (FASTNORM_CUDA_OPS=0: every launch from Python);
#   3. the benchmark suite for the cuda and torch providers: BatchNorm at (64, 256), (8192, 2048),
#      (256, 64, 56, 56), (64, 256, 28, 28); optimizers on the MLP, 100M and 1B parameters;
#      the device-to-device copy roofline; the markdown report and chart;
#   4. whole training steps (bench/test_bench_e2e.py, eager) on the GPU: gpu-e2e.{json,md};
#   5. bench/cuda_launch.py: BatchNorm, LayerNorm, RMSNorm, GroupNorm and an Adam step through the
#      C++ ops against torch (cuDNN) and the Python launchers
#      (step time, host time per op, CUDA-graph replay): bench/results/gpu/launch.md;
#   6. bench/gpu_profile.py: per-kernel device time of BatchNorm and optimizer steps, both providers.
# Installs nothing: it uses the machine's python3 (torch, numba, numba-cuda, pytest,
# pytest-benchmark) with this checkout on PYTHONPATH. Designed to finish in under 10 minutes on an
# H100. Usage: bash bench/gpu_check.sh [OUT_DIR]   (default: $OUT, else bench/results/gpu)
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"  # fastnorm, and fastnorm_kernels (kernels/)
export FASTNORM_CACHE="${FASTNORM_CACHE:-/tmp/fastnorm-cache}"
export FASTNORM_PTX_CACHE="${FASTNORM_PTX_CACHE:-/tmp/fastnorm-cache/ptx}"
start=$(date +%s)

{
  echo "# machine"; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  "$PY" - <<'PY'
import platform, torch, numba
try:
    import numba_cuda; ncv = numba_cuda.__version__
except Exception:
    ncv = "n/a"
import pytest_benchmark
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"numba {numba.__version__}, numba-cuda {ncv}, pytest-benchmark {pytest_benchmark.__version__}")
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
import fastnorm
print("fastnorm backends:", fastnorm.backends())
from numba import cuda
cuda.detect()
PY
} > "$OUT_DIR/machine.txt" 2>&1
cat "$OUT_DIR/machine.txt"
if ! "$PY" -c "import torch, numba.cuda, pytest, pytest_benchmark; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu_check: this machine lacks a CUDA device or one of torch, numba-cuda, pytest, pytest-benchmark" >&2
  exit 3
fi

echo "# parity (tests/gpu)"
timeout 180 "$PY" -m pytest tests/gpu -q -p no:cacheprovider -rfE > "$OUT_DIR/parity.txt" 2>&1
parity=$?
tail -25 "$OUT_DIR/parity.txt"
echo "# parity again, the C++ cuda ops off (FASTNORM_CUDA_OPS=0: the Python launchers)"
FASTNORM_CUDA_OPS=0 timeout 70 "$PY" -m pytest tests/gpu/test_cuda_backend.py -q -p no:cacheprovider -rfE \
  > "$OUT_DIR/parity_python_launch.txt" 2>&1
tail -3 "$OUT_DIR/parity_python_launch.txt"

echo "# benchmarks"
timeout 200 "$PY" -m fastnorm bench --device cuda --ops batchnorm,optim \
  --providers cuda,torch,torch-foreach,torch-fused \
  --shapes 64x256,8192x2048,256x64x56x56,64x256x28x28,mlp,100M,1B \
  --budget 0.2 --out "$OUT_DIR/gpu.json" --title "fastnorm on $("$PY" -c 'import torch; print(torch.cuda.get_device_name())')" \
  > "$OUT_DIR/bench.log" 2>&1
bench=$?
tail -5 "$OUT_DIR/bench.log"
if [ -f "$OUT_DIR/gpu.md" ]; then  # the report names the GPU, its driver and numba-cuda
  { echo; echo "## machine"; echo; echo '```'; cat "$OUT_DIR/machine.txt"; echo '```'; } >> "$OUT_DIR/gpu.md"
fi

echo "# whole training steps, eager (MLP, ResNet-18, transformer block): torch, torch fused, fastnorm cuda / auto"
timeout 90 "$PY" -m fastnorm bench --device cuda --ops e2e \
  --providers eager:torch,eager:torch-fused,eager:fastnorm-cuda,eager:fastnorm-auto \
  --shapes mlp-b64,resnet18-b32-64x64,block-b16x128x256 --budget 0.2 --out "$OUT_DIR/gpu-e2e.json" \
  --title "fastnorm whole training steps on $("$PY" -c 'import torch; print(torch.cuda.get_device_name())')" \
  > "$OUT_DIR/bench-e2e.log" 2>&1
tail -3 "$OUT_DIR/bench-e2e.log"

echo "# BatchNorm: C++ cuda ops / Python launchers / cuDNN"
timeout 90 "$PY" bench/cuda_launch.py "$OUT_DIR/launch.md" > "$OUT_DIR/launch.log" 2>&1
tail -25 "$OUT_DIR/launch.log"

echo "# profile (kernel tables)"
timeout 50 "$PY" bench/gpu_profile.py > "$OUT_DIR/profile.txt" 2>&1
tail -60 "$OUT_DIR/profile.txt"
echo "gpu_check: parity exit $parity, bench exit $bench, $(( $(date +%s) - start )) s; files in $OUT_DIR"
[ "$parity" -eq 0 ] && [ "$bench" -eq 0 ]
