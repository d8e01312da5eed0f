"""What the C++/CUDA headers, the Triton kernels and the Python glue must agree on, checked
against each other (not against copies of the numbers), and the shared chunk policy and the
GPU table memo, unit-tested on the CPU."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from eofd_kernels import layout

ROOT = Path(__file__).parents[1]


def _header(name: str) -> str:
    return (ROOT / "csrc" / name).read_text()


def _constant(header: str, name: str) -> int:
    return int(re.search(rf"constexpr int(?:64_t)? {name} = (\d+);", header).group(1))


def _enum_names(enum: str) -> list[str]:
    body = re.search(rf"enum {enum} : int \{{(.*?)\}};", _header("include/eofd_params.h"),
                     re.S).group(1)
    return [n.strip().split("=")[0].strip() for n in body.split(",") if n.strip()]


def _python_name(prefix: str, cpp_name: str, cpp_prefix: str) -> str:
    """``kSquaredError`` -> ``D_SQUARED_ERROR``; ``kMomentPivotOffset`` -> ``M_PIVOT_OFFSET``."""
    words = cpp_name[len(cpp_prefix):]
    return prefix + re.sub(r"(?<!^)(?=[A-Z])", "_", words).upper()


@pytest.mark.parametrize("enum, cpp_prefix, prefix, total", [
    ("DimField", "k", "D_", "DIM_FIELDS"), ("MomentField", "kMoment", "M_", "MOMENT_FIELDS")])
def test_field_layouts_agree(enum, cpp_prefix, prefix, total):
    """eofd_params.h's DimField / MomentField enums and layout.py's D_* / M_* name the same
    fields in one order (the Triton partials are derived from M_*, the CUDA ones use the enum)."""
    names = _enum_names(enum)
    assert names[-1] == f"{cpp_prefix}{'Fields' if prefix == 'M_' else 'DimFields'}"
    assert len(names) - 1 == getattr(layout, total)
    for index, name in enumerate(names[:-1]):
        assert getattr(layout, _python_name(prefix, name, cpp_prefix)) == index, name


def test_chunk_and_partial_constants_agree():
    from eofd_kernels.backends import triton_kernels

    assert _constant(_header("include/chunk_policy.h"), "kMaxChunkRows") == layout.MAX_CHUNK_ROWS
    assert triton_kernels.PARTIAL_FIELDS.value == layout.MOMENT_FIELDS


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_chunk_policy(tmp_path):
    binary = tmp_path / "chunk_policy_test"
    source = ROOT / "tests/cpp/chunk_policy_test.cpp"
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", str(source), "-o", str(binary)],
                   check=True, capture_output=True, timeout=120)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout
