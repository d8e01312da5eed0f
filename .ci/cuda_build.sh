#!/usr/bin/env bash
# The CUDA build of the extension, proven on a machine without a GPU: a second venv with a
# CUDA build of torch (2.14.1 is CUDA 13.0, like the machine's nvcc), the extension built with
# EOFD_BUILD_CUDA=1 for sm_80 and sm_90 from a copy of the sources (the main checkout keeps its
# CPU build), every op's CUDA kernel present in the dispatcher, and the extension's CPU tests
# run under that torch. Exits non-zero on any failure; says so and exits 0 where no nvcc is.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  echo "cuda_build: SKIPPED: no nvcc on PATH"
  exit 0
fi
VENV=${EOFD_CUDA_VENV:-/tmp/eofd-cuda-venv}
SRC=/tmp/eofd-cuda-src
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
pip install -q torch==2.14.1 setuptools ninja pytest numpy
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -z | xargs -0 cp --parents -t "$SRC"
cd "$SRC"
echo "cuda_build: torch $(python -c 'import torch; print(torch.__version__, torch.version.cuda)'), $(nvcc --version | tail -1)"
EOFD_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=2 \
  pip install -q --no-deps --no-build-isolation -e .
python - <<'PY'
import torch

from eofd_kernels.backends.ext_loader import load_error

assert load_error() is None, load_error()
for op in ("forward", "backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"eofd_ext::{op}", key), (op, key)
assert torch._C._dispatch_has_kernel_for_dispatch_key("eofd_ext::forward_and_grad", "CPU")
print("cuda_build: eofd_ext::forward and backward have CPU and CUDA kernels")
PY
python -m pytest -q -p no:cacheprovider tests/test_backends.py tests/test_registration.py \
  tests/test_adversarial.py -k "ext and not triton"
echo "cuda_build: OK"
