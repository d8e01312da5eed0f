"""Builds the compiled extension eofd_kernels._C (CPU always; CUDA when it can).

  EOFD_BUILD_CUDA=auto|0|1   auto (default): CUDA when torch has CUDA and nvcc is found
  TORCH_CUDA_ARCH_LIST       CUDA archs (default "8.0;9.0")
  EOFD_CPU_ARCH              -march for the CPU kernels (default "native": built where it runs)

Install with ``pip install --no-build-isolation -e .`` so the build uses the installed torch.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    import torch

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
    return True


def _extension():
    cxx = ["-O3", "-fopenmp", f"-march={os.environ.get('EOFD_CPU_ARCH', 'native')}"]
    sources = ["csrc/eofd_ops.cpp", "csrc/cpu/eofd_cpu.cpp"]
    if not _want_cuda():
        return CppExtension("eofd_kernels._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-std=c++17"]
    return CUDAExtension("eofd_kernels._C", sources,
                         extra_compile_args={"cxx": cxx + ["-DEOFD_WITH_CUDA"], "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
