#!/usr/bin/env bash
# Everything a GPU can show, in one call whose step limits sum to 600 s (the device budget is
# 15 minutes including the machine's start), under $OUT:
#   env.txt          device, driver, versions
#   build.log        the extension built for this GPU's arch only
#   tests.log        the test suite on CUDA tensors (triton and ext), CUDA graphs, > 2^31
#                    elements; every failure is listed (no -x: one failure hides nothing)
#   memcheck.log, initcheck.log, racecheck.log
#                    compute-sanitizer on small multi-layer masked fwd+bwd calls
#                    (benchmarks/gpu_smoke.py: the 16-byte and the element-wise kernels)
#   aot.jsonl        the Triton plan compiled for this arch (registers, spills, 16-byte loads)
#   bench/           the headline benchmark points (bench.md, bench.json), % of a device copy,
#                    the fused projection in bf16, and whole training steps in bf16 (step/)
#   summary.json     always written, also when a step fails or times out: per step its
#                    command, limit, rc, seconds, whether it timed out, and what failed
# Usage: OUT=/some/dir benchmarks/gpu_check.sh [--dry-run]
# --dry-run (any machine): checks the script, the imports and each step's command and times
# those checks, runs none of the GPU steps. The machine has no network: the package installs
# with --no-deps.
#
# Step limits (docs/performance.md has the timings behind them): the build compiles the .cu
# files for one arch only; the tests step collects the CUDA cases of four files and compiles
# Triton variants cold; a sanitizer run of a Python process that imports torch is dominated
# by its start, so each smoke call is small. A step that passes its limit is killed and
# recorded (rc 124), and the next step runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/eofd-gpu-check}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
mkdir -p "$OUT"
STEPS="$OUT/steps.tsv"
: > "$STEPS"
FAILED=0

# summary.json from steps.tsv (name, limit, rc, seconds, command), with each failed step's
# failed tests or last log lines; on every exit.
write_summary() {
  python3 - "$OUT" "$DRY" <<'PY' || echo "gpu_check: could not write summary.json"
import json, pathlib, re, sys
out, dry = pathlib.Path(sys.argv[1]), sys.argv[2] == "1"
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, limit, rc, seconds, command = line.split("\t", 4)
    step = {"name": name, "command": command, "limit_s": int(limit), "rc": int(rc),
            "seconds": int(seconds), "timed_out": rc in ("124", "137"), "failed": []}
    log = out / f"{name}.log"
    if rc != "0" and log.is_file():
        text = log.read_text(errors="replace")
        step["failed"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M) or text.splitlines()[-10:]
    steps.append(step)
summary = {"dry_run": dry, "ok": all(s["rc"] == 0 for s in steps), "steps": steps,
           "failed_steps": [s["name"] for s in steps if s["rc"] != 0],
           "seconds": sum(s["seconds"] for s in steps)}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print("summary:", json.dumps({k: summary[k] for k in ("ok", "failed_steps", "seconds")}))
PY
}
trap write_summary EXIT

record() {  # NAME LIMIT RC SECONDS COMMAND...
  local name=$1 limit=$2 rc=$3 seconds=$4
  shift 4
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$limit" "$rc" "$seconds" "$*" >> "$STEPS"
  echo "$name rc=$rc ${seconds}s (limit ${limit}s)"
  [[ $rc == 0 ]] || FAILED=1
}

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  if [[ $DRY == 1 ]]; then
    echo "dry-run $name (limit ${limit}s): $*"
    return 0
  fi
  local start=$SECONDS rc=0
  echo "== $name: $*"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  tail -n 5 "$OUT/$name.log"
  record "$name" "$limit" "$rc" $((SECONDS - start)) "$*"
}

{
  date -u +"%Y-%m-%d %H:%M UTC"
  git log -1 --format="commit %h %s" 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version 2>&1 | tail -1
  compute-sanitizer --version 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

ARCH=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
SM=${ARCH/./}
export TRITON_INTERPRET=0
SANITIZE=(compute-sanitizer --error-exitcode 1 --target-processes all)

step build 120 env EOFD_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 \
  pip install --no-deps --no-build-isolation -e .
step tests 140 python -m pytest -q -p no:cacheprovider -rfE tests/test_gpu.py \
  tests/test_backends.py tests/test_registration.py tests/test_adversarial.py -k "cuda or gpu"
step memcheck 55 "${SANITIZE[@]}" --tool memcheck python benchmarks/gpu_smoke.py
step initcheck 55 "${SANITIZE[@]}" --tool initcheck python benchmarks/gpu_smoke.py
# racecheck: the kernels that share memory between threads (the stats merges).
step racecheck 40 "${SANITIZE[@]}" --tool racecheck python benchmarks/gpu_smoke.py
step aot 20 sh -c "python -m eofd_kernels.backends.triton_aot --arch $SM > '$OUT/aot.jsonl'"
step bench 70 eofd-kernels bench --device cuda --preset gpu-headline --reps 20 \
  --providers "eager ref" "compiled ref" "mse compiled" triton ext --out "$OUT/bench"
step projection 40 eofd-kernels bench --device cuda --fused-projection flan-t5-xxl bert-large \
  --dtypes bf16 --reps 10 --out "$OUT/bench"
step step 60 python -m eofd_kernels bench --step --dtypes bf16 --device cuda \
  --out "$OUT/bench/step"

if [[ $DRY == 1 ]]; then  # what can be checked without a GPU, each check timed
  dry() {  # NAME COMMAND...
    local name=$1 start=$SECONDS rc=0
    shift
    "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    record "$name" 0 "$rc" $((SECONDS - start)) "$*"
  }
  dry dry-syntax bash -n "$0"
  dry dry-compile python -m py_compile benchmarks/gpu_smoke.py tests/test_gpu.py
  dry dry-imports python -c "import eofd_kernels.backends.triton_aot, eofd_kernels.bench.cli"
  dry dry-preset python -c "from eofd_kernels.bench.shapes import PRESETS; PRESETS['gpu-headline']"
  dry dry-smoke-args python benchmarks/gpu_smoke.py --help
  dry dry-collect python -m pytest -q -p no:cacheprovider --collect-only tests/test_gpu.py \
    tests/test_backends.py tests/test_registration.py tests/test_adversarial.py -k "cuda or gpu"
  dry dry-tests python -m pytest -q -p no:cacheprovider tests/test_gpu.py
  [[ $FAILED == 0 ]] && echo "dry-run OK"
fi
exit $FAILED
