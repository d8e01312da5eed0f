#!/usr/bin/env bash
# Everything a GPU can show, in one call of under 8 minutes (step limits: 480 s), under $OUT:
#   env.txt        device, driver, versions
#   build.log      the extension built for this GPU's arch only
#   tests.log      the test suite on CUDA tensors (triton and ext), CUDA graphs, > 2^31 elements
#   memcheck.log   compute-sanitizer memcheck of a small multi-layer masked fwd+bwd
#   aot.jsonl      the Triton plan compiled for this arch (registers, spills, 16-byte loads)
#   bench/         the headline benchmark points (bench.md, bench.json), % of a device copy,
#                  and the fused projection in bf16 (fused_projection.md)
#   summary.txt    each step's exit code and seconds
# Usage: OUT=/some/dir benchmarks/gpu_check.sh [--dry-run]
# --dry-run (any machine): checks the script, the imports and each step's command, runs none
# of the GPU steps. The machine has no network: the package installs with --no-deps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/eofd-gpu-check}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
mkdir -p "$OUT"
: > "$OUT/summary.txt"
FAILED=0

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS rc=0
  if [[ $DRY == 1 ]]; then
    echo "dry-run $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
    return 0
  fi
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  tail -n 5 "$OUT/$name.log"
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  [[ $rc == 0 ]] || FAILED=1
}

{
  date -u +"%Y-%m-%d %H:%M UTC"
  git log -1 --format="commit %h %s" 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

ARCH=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
SM=${ARCH/./}
export TRITON_INTERPRET=0

step build 120 env EOFD_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 \
  pip install --no-deps --no-build-isolation -e .
step tests 90 python -m pytest -q -x -p no:cacheprovider tests/test_gpu.py \
  tests/test_backends.py tests/test_registration.py tests/test_adversarial.py -k "cuda or gpu"
step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
  python benchmarks/gpu_smoke.py
step aot 30 sh -c "python -m eofd_kernels.backends.triton_aot --arch $SM > '$OUT/aot.jsonl'"
step bench 120 eofd-kernels bench --device cuda --preset gpu-headline --reps 20 \
  --providers "eager ref" "compiled ref" "mse compiled" triton ext --out "$OUT/bench"
step projection 60 eofd-kernels bench --device cuda --fused-projection flan-t5-xxl bert-large \
  --dtypes bf16 --reps 10 --out "$OUT/bench"

if [[ $DRY == 1 ]]; then  # what can be checked without a GPU
  (
    set -e
    bash -n "$0"
    python -m py_compile benchmarks/gpu_smoke.py tests/test_gpu.py
    python -c "import eofd_kernels.backends.triton_aot, eofd_kernels.bench.cli"
    python -c "from eofd_kernels.bench.shapes import PRESETS; PRESETS['gpu-headline']"
    python -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/dry-tests.log"
  ) && echo "dry-run OK" | tee -a "$OUT/summary.txt" || FAILED=1
fi
exit $FAILED
