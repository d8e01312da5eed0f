"""What a GPU would run, compiled here: the Triton launcher's plan for the headline shapes
(BERT-base, and a Llama-like 32 x (8 * 2048, 4096)), every planned kernel specialised as the
JIT would and compiled ahead of time for sm_80 and sm_90 (triton_aot.py): no spills, no local
memory, 16-byte vector loads of S and T on contiguous aligned inputs, at most 4 barriers per
main-loop iteration (none in the stats kernel), and grids that fill whole waves of the
occupancy the compiled registers allow. Where the SASS model (eofd_kernels.static_model) can
run, every hot kernel keeps at least 32 KB of loads in flight per SM."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import eofd_kernels as ek
from eofd_kernels import layout

pytestmark = pytest.mark.skipif("triton" not in ek.available_backends("cpu"),
                                reason="triton is not installed")
HOT_KERNELS = ("_stats_kernel", "_backward_kernel")
MIN_WAVE_FILL = 0.9  # a grid's programs / the slots of the waves it takes
MIN_BYTES_PER_SM = 32 * 1024


def _compiler_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def compiled():
    result = subprocess.run([sys.executable, "-m", "eofd_kernels.backends.triton_aot",
                             "--arch", "80", "90"], capture_output=True, text=True,
                            env=_compiler_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_planned_kernel_compiles_for_both_archs(compiled):
    from eofd_kernels.backends.triton_aot import CASES

    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"_stats_kernel", "_merge_chunks_kernel", "_finalize_layers_kernel",
                       "_backward_kernel"}
    assert {r["arch"] for r in compiled} == {80, 90}
    assert {(r["shape"], r["dtype"], r["masked"]) for r in compiled} == set(CASES)
    for r in compiled:
        print(f"sm_{r['arch']} {r['shape']:<10} {r['kernel']:<24} {r['dtype']:<5} "
              f"mask={r['masked']!s:<5} {r['registers']:>3} registers, {r['programs_per_sm']} "
              f"programs of {r['threads']} threads per SM, {r['waves']:.2f} waves, loop: "
              f"{r['loop_loads_16B']} 16-byte loads, {r['loop_barriers']} barriers")


def test_no_spills_or_local_memory(compiled):
    bad = [(r["kernel"], r["arch"], r["dtype"], r["stack"], r["local"]) for r in compiled
           if r["stack"] or r["local"]]
    assert bad == []


def test_contiguous_inputs_get_16_byte_loads(compiled):
    """The headline shapes are contiguous and aligned: the hot kernels take the ALIGNED path,
    and both S and T come in 16-byte vectors in the main loop."""
    hot = [r for r in compiled if r["kernel"] in HOT_KERNELS]
    assert hot and all(r["constexprs"]["ALIGNED"] == "True" for r in hot)
    assert [r for r in hot if r["loop_loads_16B"] < 2] == []


def test_main_loops_have_at_most_four_barriers(compiled):
    """The stats kernel keeps its moments per element, so its loop has no cross-thread
    traffic at all; the backward's only barriers convert between the two sides' layouts
    when S and T have different element widths."""
    hot = [r for r in compiled if r["kernel"] in HOT_KERNELS]
    assert [r for r in hot if r["loop_barriers"] > 4] == []
    assert [r for r in hot if r["kernel"] == "_stats_kernel" and r["loop_barriers"]] == []
    same_width = [r for r in hot if r["dtype"] != "mixed"]
    assert [r for r in same_width if r["loop_barriers"]] == []


def test_grids_fill_whole_waves(compiled):
    """On sm_90 (the arch the plan is made for), every hot grid fills at least 90 % of the
    program slots of the waves it takes."""
    for r in compiled:
        if r["kernel"] in HOT_KERNELS and r["arch"] == 90:
            fill = r["waves"] / math.ceil(r["waves"])
            assert fill >= MIN_WAVE_FILL, (r["shape"], r["kernel"], r["dtype"], r["waves"])


def test_the_llama_like_plan_has_full_length_chunks(compiled):
    """16k tokens per layer: the stats kernel runs the longest chunks the fp32 partials allow
    (tiles per chunk is a run-time argument, so every chunk length runs the same compiled
    kernel, the one compiled here)."""
    stats = [r for r in compiled if r["shape"] == "llama-like" and r["kernel"] == "_stats_kernel"]
    assert stats
    for r in stats:
        block_n = int(r["constexprs"]["BLOCK_N"])
        _, num_chunks, tiles_per_chunk = r["args"]
        assert "tiles_per_chunk" not in r["constexprs"]
        assert tiles_per_chunk * block_n > layout.MAX_CHUNK_ROWS // 2
        assert tiles_per_chunk * block_n <= layout.MAX_CHUNK_ROWS
        assert num_chunks * tiles_per_chunk * block_n >= 8 * 2048


def _json_lines(code: str, timeout: int) -> list:
    """The JSON lines ``code`` prints, run in a subprocess without the interpreter."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=_compiler_env(), timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def _specialization(launch):
    """The AOT binder's attrs, in a subprocess without the interpreter."""
    code = (
        "import json, torch\n"
        "from eofd_kernels.backends import triton_aot as A\n"
        "from eofd_kernels.backends.triton_kernels import plan_forward\n"
        f"d = {launch}\n"
        "x = [torch.empty(256, d)]\n"
        "stats = plan_forward(x, x, [None], 0.5, 0.0, A.gpu_target())[0][0]\n"
        "src = A.specialize(stats, 90)[0]\n"
        "names = stats.kernel.arg_names\n"
        "print(json.dumps({names[k[0]]: v for k, v in src.attrs.items()}))\n")
    return _json_lines(code, timeout=300)[-1]


def test_ahead_of_time_specialisation_is_the_jits():
    """Pointers and integers divisible by 16 get tt.divisibility = 16, as the JIT gives
    them; the grid's own arguments (chunks, tiles per chunk) are never specialised on."""
    divisible = _specialization(768)
    assert divisible["layers"] == divisible["partials"] == [["tt.divisibility", 16]]
    assert divisible["max_d"] == [["tt.divisibility", 16]]
    assert not divisible.get("num_chunks") and not divisible.get("tiles_per_chunk")
    assert _specialization(40)["max_d"] == []


def test_alignment_switch_follows_the_layout():
    """ALIGNED only where every layer is 16-byte aligned with a unit column stride and d a
    multiple of the dim block; the oracle tests run both paths (d = 32 and column strides)."""
    from eofd_kernels.backends.triton_grid import Target
    from eofd_kernels.backends.triton_kernels import plan_forward

    gpu = Target(132, False, lambda *args: 4)

    def aligned(students):
        launches, _ = plan_forward(students, students, [None] * len(students), 0.5, 0.0, gpu)
        return launches[0].constexprs["ALIGNED"]

    rows = torch.randn(64, 256)
    assert aligned([rows])
    assert not aligned([rows[:, ::2]])  # column stride 2
    assert not aligned([rows[:, 1:129]])  # base 4 bytes past alignment
    assert not aligned([rows[:, :200]])  # d not a multiple of the 128-dim block
    assert not aligned([rows, torch.randn(64, 40)])  # one layer is enough to decide


def test_chunking_fills_waves_and_prefers_long_chunks():
    from eofd_kernels.backends.triton_grid import chunking

    # BERT-base-like: 128 row tiles, 72 programs per chunk index, 396 resident programs.
    per_chunk, chunks = chunking(128, 72, 396, 32)
    assert chunks * 72 % 396 == 0 and chunks == -(-128 // per_chunk)
    assert chunking(8, 1, 1, 32) == (8, 1)  # one resident program: one chunk
    assert chunking(128, 1000, 10, 32) == (32, 4)  # many waves anyway: the longest chunks
    assert chunking(100, 1000, 10, 32) == (25, 4)  # as many chunks, balanced


def test_programs_per_sm_follow_registers_threads_and_shared_memory():
    from eofd_kernels.backends.triton_grid import programs_per_sm

    assert programs_per_sm(128, 4, 1024) == 4
    assert programs_per_sm(129, 4, 1024) == 3  # registers go per warp, in units of 256
    assert programs_per_sm(32, 4, 0) == 16  # 2048 threads
    assert programs_per_sm(32, 4, 100 * 1024) == 2  # shared memory


def _static_model_rows():
    code = (
        "import json\n"
        "from eofd_kernels import static_model as sm\n"
        "from eofd_kernels.backends import triton_aot as A\n"
        "for k in A.planned_kernels(90):\n"
        "    if k.launch.kernel.__name__ in ('_stats_kernel', '_backward_kernel'):\n"
        "        m = sm.analyse(k.cubin, k.symbol, threads=k.threads)\n"
        "        print(json.dumps([k.label, m.bytes_in_flight_per_sm, m.local_bytes,\n"
        "                          m.barriers_per_iteration, sm.table_row(k.label, m)]))\n")
    return _json_lines(code, timeout=900)


def test_hot_kernels_keep_32_kb_in_flight_per_sm():
    static_model = pytest.importorskip("eofd_kernels.static_model")
    if not static_model.find_tool("cuobjdump"):
        pytest.skip("cuobjdump not found")
    rows = _static_model_rows()
    assert rows
    for *_, row in rows:
        print(row)
    bad = [label for label, in_flight, local, barriers, _ in rows
           if in_flight < MIN_BYTES_PER_SM or local or barriers > 4]
    assert bad == []
