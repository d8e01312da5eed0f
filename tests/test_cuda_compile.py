"""Every .cu under csrc compiles with plain nvcc and the build's own flags for sm_80 and sm_90,
warnings as errors, with no register spills and no local memory (``-Xptxas -v``: a stack frame
means an array indexed at run time, a silent slowdown). Runs without a GPU and without a CUDA
torch; prints each kernel's registers and the occupancy they allow."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from eofd_kernels.ext_build import NVCC_FLAGS

ROOT = Path(__file__).parents[1]
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))
NVCC = shutil.which("nvcc")
REGISTERS_PER_SM = 65536  # sm_80 and sm_90
THREADS_PER_BLOCK = 256  # kDimThreads x kRowGroups of the hot kernels


def _ptxas_report(source: Path, arch: str, out: Path) -> list[dict]:
    """One entry per kernel: name, registers, stack frame and spill bytes."""
    result = subprocess.run(
        [NVCC, *NVCC_FLAGS, f"-arch={arch}", "-Xptxas", "-v", "-Werror", "all-warnings", "-c",
         str(source), "-o", str(out)],
        capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    kernels = []
    for block in re.split(r"ptxas info\s*: Compiling entry function ", report)[1:]:
        name = re.match(r"'(\w+)'", block).group(1)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                          r"loads", block)
        registers = re.search(r"Used (\d+) registers", block)
        kernels.append({"name": name, "registers": int(registers.group(1)),
                        "stack": int(frame.group(1)), "spills": int(frame.group(2))})
    assert kernels, report
    return kernels


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_without_spills_or_local_memory(source, arch, tmp_path):
    kernels = _ptxas_report(source, arch, tmp_path / "out.o")
    for k in kernels:
        blocks = REGISTERS_PER_SM // (k["registers"] * THREADS_PER_BLOCK)
        print(f"{source.name} {arch} {k['name'][:60]}: {k['registers']} registers, "
              f"{blocks} blocks of {THREADS_PER_BLOCK} threads per SM")
    assert [k["name"] for k in kernels if k["spills"] or k["stack"]] == []


def test_cuda_sources_are_torch_free():
    """The .cu files include only CUDA headers and ours (docs/design.md, "Layout")."""
    assert CU_FILES
    for path in CU_FILES:
        includes = re.findall(r'#include [<"]([^>"]+)[>"]', path.read_text())
        for inc in includes:
            assert not inc.startswith(("torch", "ATen", "c10")), f"{path.name}: {inc}"
