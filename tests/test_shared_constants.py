"""What the C++/CUDA headers, the Triton kernels and the Python glue must agree on, checked
against each other (not against copies of the numbers), and the shared chunk policy and the
GPU table memo, unit-tested on the CPU."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from eofd_kernels import layout
from eofd_kernels.backends.device_tables import DeviceTables

ROOT = Path(__file__).parents[1]


def _header(name: str) -> str:
    return (ROOT / "csrc" / name).read_text()


def _constant(header: str, name: str) -> int:
    return int(re.search(rf"constexpr int(?:64_t)? {name} = (\d+);", header).group(1))


def test_dim_stats_fields_agree():
    """eofd_params.h's DimField enum and layout.py's D_* name the same fields in one order."""
    body = re.search(r"enum DimField : int \{(.*?)\};", _header("include/eofd_params.h"),
                     re.S).group(1)
    names = [n.strip().split("=")[0].strip() for n in body.split(",") if n.strip()]
    assert names[-1] == "kDimFields" and len(names) - 1 == layout.DIM_FIELDS
    for index, name in enumerate(names[:-1]):
        python_name = "D_" + re.sub(r"(?<!^)(?=[A-Z])", "_", name[1:]).upper()  # kSqErr: D_SQ_ERR
        assert getattr(layout, python_name) == index, name


def test_chunk_and_partial_constants_agree():
    from eofd_kernels.backends import triton_kernels

    assert _constant(_header("include/chunk_policy.h"), "kMaxChunkRows") == layout.MAX_CHUNK_ROWS
    assert (_constant(_header("cuda/launch_params.h"), "kPartialFields")
            == triton_kernels.PARTIAL_FIELDS.value)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_chunk_policy(tmp_path):
    binary = tmp_path / "chunk_policy_test"
    source = ROOT / "tests/cpp/chunk_policy_test.cpp"
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", str(source), "-o", str(binary)],
                   check=True, capture_output=True, timeout=120)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout


def test_device_tables_memoize_and_keep_what_a_capture_used():
    """A hit returns the same table (no copy); the oldest of `capacity` recent tables goes;
    a table made or used during capture is never evicted (a graph replay reads it)."""
    capturing = [False]
    tables = DeviceTables(capacity=2, capturing=lambda device: capturing[0])
    cpu = torch.device("cpu")
    first = tables.get((1, 2, 3), cpu)
    assert torch.equal(first, torch.tensor([1, 2, 3])) and tables.get((1, 2, 3), cpu) is first
    capturing[0] = True
    assert tables.get((1, 2, 3), cpu) is first  # used by a capture: now kept
    captured = tables.get((7, 8), cpu)
    capturing[0] = False
    for i in range(5):
        tables.get((i, i), cpu)
    assert len(tables) == 4  # 2 recent + 2 kept
    assert tables.get((1, 2, 3), cpu) is first and tables.get((7, 8), cpu) is captured
    assert tables.get((0, 0), cpu) is not None and len(tables) == 4
