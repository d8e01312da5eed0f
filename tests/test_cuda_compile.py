"""Every .cu under csrc compiles with plain nvcc and the build's own flags for sm_80 and sm_90,
warnings as errors, with no register spills (``-Xptxas -v``). Runs without a GPU and without
a CUDA torch."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from eofd_kernels.ext_build import NVCC_FLAGS

ROOT = Path(__file__).parents[1]
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_without_spills(source, arch, tmp_path):
    result = subprocess.run(
        [NVCC, *NVCC_FLAGS, f"-arch={arch}", "-Xptxas", "-v", "-Werror", "all-warnings", "-c",
         str(source), "-o", str(tmp_path / "out.o")],
        capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    registers = re.findall(r"Used (\d+) registers", report)
    print(f"{source.name} {arch}: {len(kernels)} kernels, registers {sorted(set(registers))}")
    assert kernels, report
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    assert spills and max(spills) == 0, report


def test_cuda_sources_are_torch_free():
    """The .cu files include only CUDA headers and ours (docs/design.md, "Layout")."""
    assert CU_FILES
    for path in CU_FILES:
        includes = re.findall(r'#include [<"]([^>"]+)[>"]', path.read_text())
        for inc in includes:
            assert not inc.startswith(("torch", "ATen", "c10")), f"{path.name}: {inc}"
