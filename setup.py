"""Builds the extension eofd_kernels._C (CPU always; CUDA when it can).

Settings (EOFD_BUILD_CUDA, TORCH_CUDA_ARCH_LIST, EOFD_CPU_ARCH) and sources: see
eofd_kernels/ext_build.py, which the JIT development build (EOFD_JIT=1) shares.

Install with ``pip install --no-build-isolation -e .`` so the build uses the installed torch.
"""

import importlib.util
from pathlib import Path

from setuptools import setup

_spec = importlib.util.spec_from_file_location(
    "ext_build", Path(__file__).parent / "eofd_kernels" / "ext_build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)
build.configure_cuda_home()  # before cpp_extension reads CUDA_HOME

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _extension():
    cuda = build.want_cuda()
    sources = build.sources(cuda)
    if not cuda:
        return CppExtension("eofd_kernels._C", sources,
                            extra_compile_args={"cxx": build.cxx_flags(False)},
                            extra_link_args=build.LINK_FLAGS)
    return CUDAExtension("eofd_kernels._C", sources,
                         extra_compile_args={"cxx": build.cxx_flags(True),
                                             "nvcc": build.NVCC_FLAGS},
                         extra_link_args=build.LINK_FLAGS)


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
