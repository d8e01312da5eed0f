"""What a GPU would run, compiled here: the Triton launcher's plan for the headline shapes,
every planned kernel compiled ahead of time for sm_80 and sm_90 (triton_aot.py), with no
spills, no local memory, and 16-byte vector loads of S and T for contiguous aligned inputs."""

import json
import os
import subprocess
import sys

import pytest
import torch

import eofd_kernels as ek

pytestmark = pytest.mark.skipif("triton" not in ek.available_backends("cpu"),
                                reason="triton is not installed")
HOT_KERNELS = ("_stats_kernel", "_backward_kernel")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "eofd_kernels.backends.triton_aot",
                             "--arch", "80", "90"], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_planned_kernel_compiles_for_both_archs(compiled):
    from eofd_kernels.backends.triton_aot import CASES

    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"_stats_kernel", "_merge_chunks_kernel", "_finalize_layers_kernel",
                       "_backward_kernel"}
    assert {r["arch"] for r in compiled} == {80, 90}
    assert {(r["dtype"], r["masked"]) for r in compiled} == {(d, m) for _, d, m in CASES}
    for r in compiled:
        print(f"sm_{r['arch']} {r['kernel']:<24} {r['dtype']:<5} mask={r['masked']!s:<5} "
              f"{r['registers']:>3} registers, {r['blocks_per_sm']} blocks of {r['threads']} "
              f"threads per SM, 16-byte loads {r['loads_16B']}, other loads {r['loads_other']}")


def test_no_spills_or_local_memory(compiled):
    bad = [(r["kernel"], r["arch"], r["dtype"], r["spills"], r["stack"]) for r in compiled
           if r["spills"] or r["stack"]]
    assert bad == []


def test_contiguous_inputs_get_16_byte_loads(compiled):
    """The headline shapes are contiguous and aligned: the hot kernels take the ALIGNED path,
    and both S and T come in 16-byte vectors (at least one wide load each)."""
    hot = [r for r in compiled if r["kernel"] in HOT_KERNELS]
    assert hot and all(r["constexprs"]["ALIGNED"] == "True" for r in hot)
    assert [r for r in hot if r["loads_16B"] < 2] == []


def test_alignment_switch_follows_the_layout():
    """ALIGNED only where every layer is 16-byte aligned with a unit column stride and d a
    multiple of the dim block; the oracle tests run both paths (d = 32 and column strides)."""
    from eofd_kernels.backends.triton_kernels import Target, plan_forward

    def aligned(students):
        launches, _ = plan_forward(students, students, [None] * len(students), 0.5, 0.0,
                                   Target(132, interpreter=False))
        return launches[0].constexprs["ALIGNED"]

    rows = torch.randn(64, 256)
    assert aligned([rows])
    assert not aligned([rows[:, ::2]])  # column stride 2
    assert not aligned([rows[:, 1:129]])  # base 4 bytes past alignment
    assert not aligned([rows[:, :200]])  # d not a multiple of the 128-dim block
    assert not aligned([rows, torch.randn(64, 40)])  # one layer is enough to decide
