"""What the compiled extension is built from and how: shared by setup.py (the installed
``eofd_kernels._C``) and :func:`jit_load`, the development build.

Imports nothing from the package, so setup.py can load this file on its own.

    EOFD_BUILD_CUDA=auto|0|1   auto (default): CUDA when torch has CUDA and nvcc is found
    TORCH_CUDA_ARCH_LIST       CUDA archs (default "8.0;9.0")
    EOFD_CPU_ARCH              -march for the CPU kernels (default "native": built where it runs)
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_SOURCES = ("csrc/eofd_ops.cpp", "csrc/cpu/cpu_ops.cpp")
# No --use_fast_math: it flushes denormals and approximates division, and nothing measured
# here shows the 1e-6 bounds would still hold (the kernels are memory-bound: it buys nothing).
NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++17"]
LINK_FLAGS = ["-fopenmp"]
JIT_NAME = "eofd_kernels_jit"


def cxx_flags(cuda: bool) -> list[str]:
    flags = ["-O3", "-fopenmp", f"-march={os.environ.get('EOFD_CPU_ARCH', 'native')}"]
    return flags + ["-DEOFD_WITH_CUDA"] if cuda else flags


def sources(cuda: bool) -> list[str]:
    """Paths relative to the checkout's root."""
    cuda_dir = ROOT / "csrc" / "cuda"
    extra = sorted(cuda_dir.glob("*.cu")) + sorted(cuda_dir.glob("*.cpp")) if cuda else []
    return list(CPU_SOURCES) + [str(p.relative_to(ROOT)) for p in extra]


def want_cuda() -> bool:
    """Whether to build the CUDA kernels (EOFD_BUILD_CUDA); says why when it does not."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    choice = os.environ.get("EOFD_BUILD_CUDA", "auto")
    if choice not in ("auto", "0", "1"):
        raise SystemExit(f"EOFD_BUILD_CUDA must be auto, 0 or 1, got {choice!r}")
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None:
        reasons.append("nvcc / CUDA_HOME not found")
    if choice == "1" and reasons:
        raise SystemExit("EOFD_BUILD_CUDA=1 but " + "; ".join(reasons))
    if choice == "0" or reasons:
        print("eofd-kernels: building the CPU extension only (CUDA skipped: "
              + ("EOFD_BUILD_CUDA=0" if choice == "0" else "; ".join(reasons)) + ")")
        return False
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return True


def jit_load(verbose: bool = False) -> str:
    """Builds csrc/ with ``torch.utils.cpp_extension.load`` (cached in TORCH_EXTENSIONS_DIR,
    rebuilt when a source changes) and loads it, registering the ``eofd_ext`` ops.

    For development in a checkout: edit a kernel, rerun, no reinstall. Used instead of the
    installed ``_C`` when ``EOFD_JIT=1``. Returns the loaded library's path.
    """
    from torch.utils.cpp_extension import load

    if not (ROOT / CPU_SOURCES[0]).is_file():
        raise RuntimeError(f"EOFD_JIT=1 needs the sources: {ROOT / 'csrc'} is missing "
                           "(a source checkout, installed with -e)")
    cuda = want_cuda()
    return load(name=JIT_NAME, sources=[str(ROOT / s) for s in sources(cuda)],
                extra_cflags=cxx_flags(cuda), extra_cuda_cflags=NVCC_FLAGS,
                extra_ldflags=LINK_FLAGS, with_cuda=cuda, is_python_module=False,
                verbose=verbose)
