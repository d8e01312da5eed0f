"""What the compiled extension is built from and how: shared by setup.py (the installed
``eofd_kernels._C``) and :func:`jit_load`, the development build.

Imports nothing from the package, so setup.py can load this file on its own.

    EOFD_BUILD_CUDA=auto|0|1   auto (default): CUDA when torch has CUDA and nvcc is found
    TORCH_CUDA_ARCH_LIST       CUDA archs (default "8.0;9.0")
    EOFD_CPU_ARCH              -march for the CPU kernels (default "native": built where it runs)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
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


def _nvcc_reported_root(nvcc: str) -> str | None:
    """The toolkit root nvcc itself uses: its dry run prints ``TOP=<root>/bin/..``, through any
    wrapper script or symlink (torch guesses the nvcc's grandparent folder, which for a
    wrapper in /usr/local/bin is /usr/local)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "empty.cu"
        source.write_text("")
        try:
            result = subprocess.run([nvcc, "-dryrun", "-c", str(source), "-o",
                                     str(Path(tmp) / "empty.o")],
                                    capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", result.stdout + result.stderr, re.M)
    return str(Path(match.group(1).strip()).resolve()) if match else None


def find_cuda_home() -> str | None:
    """A CUDA toolkit root holding ``include/cuda_runtime_api.h``: CUDA_HOME or CUDA_PATH,
    else the root the nvcc on PATH reports, else /usr/local/cuda; None when there is none.
    Like flash-attention's setup, it insists on a real toolkit root."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(_nvcc_reported_root(nvcc))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return root
    return None


def configure_cuda_home() -> None:
    """Point torch.utils.cpp_extension at the real toolkit root; call it before importing
    that module, which reads CUDA_HOME once at import."""
    root = find_cuda_home()
    if root is not None:
        os.environ["CUDA_HOME"] = root


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
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "include" / "cuda_runtime_api.h").is_file():
        reasons.append(f"no CUDA toolkit (CUDA_HOME={CUDA_HOME!r} has no "
                       "include/cuda_runtime_api.h; set CUDA_HOME to the toolkit root)")
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
    configure_cuda_home()
    from torch.utils.cpp_extension import load

    if not (ROOT / CPU_SOURCES[0]).is_file():
        raise RuntimeError(f"EOFD_JIT=1 needs the sources: {ROOT / 'csrc'} is missing "
                           "(a source checkout, installed with -e)")
    cuda = want_cuda()
    return load(name=JIT_NAME, sources=[str(ROOT / s) for s in sources(cuda)],
                extra_cflags=cxx_flags(cuda), extra_cuda_cflags=NVCC_FLAGS,
                extra_ldflags=LINK_FLAGS, with_cuda=cuda, is_python_module=False,
                verbose=verbose)
