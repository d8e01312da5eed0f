"""The static performance model (eofd_kernels.static_model) and what it says about the CUDA
extension's hot kernels on sm_90: every instance a contiguous, aligned call runs keeps at
least 32 KB of global loads in flight per SM, spills nothing, fits 2 CTAs per SM, and its grid
at the headline shapes is one whole wave. The analyser is checked first on probe kernels whose
answer is known. Skips where nvcc or cuobjdump (PATH, CUDA_HOME, the triton wheel) is absent."""

import shutil
import subprocess
from pathlib import Path

import pytest

from eofd_kernels import static_model as sm

ROOT = Path(__file__).parents[1]
TOOLS = sm.find_tool("nvcc") and sm.find_tool("cuobjdump")
needs_tools = pytest.mark.skipif(not TOOLS, reason="needs nvcc and cuobjdump")
MIN_BYTES_PER_SM = 32 * 1024
# BERT-base bf16 (12 layers of 32 x 128 tokens, d = 768) and a Llama-like model (32 layers of
# 8 x 2048 tokens, d = 4096): (layers, tokens, d).
HEADLINE = {"bert-base": (12, 32 * 128, 768), "llama-like": (32, 8 * 2048, 4096)}

PROBES = r"""
// One 16-byte load per trip, used before the next is issued (unroll 1 keeps it so).
__global__ void __launch_bounds__(256) consumed_at_once(const float4* __restrict__ x, int n,
                                                        float* out) {
  float acc = 0;
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += 256) {
    const float4 v = __ldg(x + i);
    acc += v.x * v.y + v.z * v.w;
  }
  out[threadIdx.x] = acc;
}

// Eight 16-byte loads per trip, all issued before any is used: every product pairs an early
// load with a late one, so the compiler cannot use the first before issuing the last.
__global__ void __launch_bounds__(256) batched(const float4* __restrict__ x, int n, float* out) {
  float acc = 0;
#pragma unroll 1
  for (int i = threadIdx.x; i + 7 * 256 < n; i += 8 * 256) {
    float4 v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = __ldg(x + i + j * 256);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc += v[j].x * v[7 - j].y + v[j].z * v[7 - j].w;
  }
  out[threadIdx.x] = acc;
}

// A barrier in every trip.
__global__ void __launch_bounds__(128) with_barrier(const float* __restrict__ x, int n,
                                                    float* out) {
  __shared__ float s[128];
  float acc = 0;
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += 128) {
    s[threadIdx.x] = __ldg(x + i);
    __syncthreads();
    acc += s[127 - threadIdx.x];
    __syncthreads();
  }
  out[threadIdx.x] = acc;
}
"""


def test_occupancy_formula():
    """sm_90: 64K registers per SM in units of 256 per warp, 2048 threads, 32 CTAs, 228 KB of
    shared memory with 1 KB reserved per CTA."""
    assert sm.ctas_per_sm(128, 256, 0) == 2
    assert sm.ctas_per_sm(129, 256, 0) == 1  # 136 after rounding: 8 x 4352 > 32768
    assert sm.ctas_per_sm(169, 256, 0) == 1
    assert sm.ctas_per_sm(80, 256, 0) == 3
    assert sm.ctas_per_sm(16, 32, 0) == 32  # the CTA limit
    assert sm.ctas_per_sm(32, 1024, 0) == 2  # the thread limit
    assert sm.ctas_per_sm(32, 128, 100 * 1024) == 2  # shared memory: 2 x 101 KB
    assert sm.little_fraction(64 * 1024) == 1.0
    assert sm.little_fraction(4 * 1024) == pytest.approx(4 * 1024 * 132 / 3.01e6)


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    if not TOOLS:
        pytest.skip("needs nvcc and cuobjdump")
    folder = tmp_path_factory.mktemp("probes")
    source = folder / "probes.cu"
    source.write_text(PROBES)
    cubin = folder / "probes.cubin"
    subprocess.run([sm.find_tool("nvcc"), "-O3", "-arch=sm_90", "-cubin", "-o", str(cubin),
                    str(source)], check=True, capture_output=True, timeout=300)
    return sm.Cubin(cubin)


def _probe(cubin, name):
    (symbol,) = [k for k in cubin.kernels() if name in k]
    return sm.analyse(cubin, symbol)


@needs_tools
def test_analyser_tells_batched_loads_from_loads_consumed_at_once(probes):
    once, batched = _probe(probes, "consumed_at_once"), _probe(probes, "batched")
    assert once.bytes_in_flight_per_thread == 16
    assert batched.bytes_in_flight_per_thread == 128
    assert once.threads == batched.threads == 256  # read from __launch_bounds__
    assert batched.bytes_in_flight_per_sm == 128 * 256 * batched.ctas_per_sm
    # At one CTA per SM the first would reach under a fifth of the bandwidth, the second all.
    assert sm.little_fraction(16 * 256) < 0.2 and sm.little_fraction(128 * 256) == 1.0


@needs_tools
def test_analyser_counts_barriers_per_iteration(probes):
    assert _probe(probes, "with_barrier").barriers_per_iteration == 2
    assert _probe(probes, "batched").barriers_per_iteration == 0


@needs_tools
def test_analyser_reads_cubin_bytes(probes, tmp_path):
    """A Triton kernel's cubin comes as bytes (compiled.asm["cubin"])."""
    path = tmp_path / "probes.cubin"
    subprocess.run([sm.find_tool("nvcc"), "-O3", "-arch=sm_90", "-cubin", "-o", str(path),
                    "-x", "cu", "-"], input=PROBES, text=True, check=True, capture_output=True,
                   timeout=300)
    (symbol,) = [k for k in probes.kernels() if "batched" in k]
    assert sm.analyse(path.read_bytes(), symbol) == sm.analyse(probes, symbol)


@pytest.fixture(scope="module")
def cuda_models(tmp_path_factory):
    if not TOOLS:
        pytest.skip("needs nvcc and cuobjdump")
    cubin = sm.Cubin(sm.compile_cuda_kernels(tmp_path_factory.mktemp("cuda")))
    models = {}
    for name in cubin.kernels():
        instance = sm.cuda_instance(name)
        if instance is not None:
            models[instance] = sm.analyse(cubin, name)
    return models


@needs_tools
def test_every_instance_is_compiled_and_none_spills(cuda_models):
    """Every (student, teacher) pair of the four dtypes, and every flag combination."""
    pairs = {(s, t) for s in ("fp32", "fp64", "bf16", "fp16") for t in ("fp32", "fp64", "bf16",
                                                                         "fp16")}
    stats = {(i.student, i.teacher, i.mask, i.aligned) for i in cuda_models
             if i.kernel == "stats"}
    backward = {(i.student, i.teacher, i.mask, i.teacher_grad, i.aligned) for i in cuda_models
                if i.kernel == "backward"}
    assert {(i.student, i.teacher) for i in cuda_models} == pairs
    assert len(stats) == len(pairs) * 4 and len(backward) == len(pairs) * 8
    assert [i.label for i, m in cuda_models.items() if m.local_bytes] == []


def test_instance_names_are_parsed():
    """A teacher of the student's class type is a back-reference in the mangled name."""
    same = sm.cuda_instance("_ZN4eofd12_GLOBAL__N_112stats_kernelI13__nv_bfloat16S2_Lb0ELb1EEEvPK")
    mixed = sm.cuda_instance("_ZN4eofd12_GLOBAL__N_115backward_kernelI6__halffLb1ELb0ELb1EEEvPK")
    assert same == sm.CudaInstance("stats", "bf16", "bf16", False, False, True)
    assert mixed == sm.CudaInstance("backward", "fp16", "fp32", True, False, True)
    assert same.label == "stats bf16 no mask"
    assert mixed.label == "backward fp16 student fp32 teacher mask no dT"


@needs_tools
def test_hot_kernels_keep_32_kb_in_flight_per_sm_at_2_ctas(cuda_models):
    """Also the mixed pairs, whose narrower side reads 8 or 4 bytes a row (a vector of the
    promoted type's dims): bf16 with fp16 reads 8 + 8 bytes a row, the fewest."""
    hot = {i: m for i, m in cuda_models.items() if i.aligned}
    assert len(hot) == 16 * 6
    for instance, m in sorted(hot.items(), key=lambda kv: kv[0].label):
        print(sm.table_row(instance.label, m))
    bad = [i.label for i, m in hot.items()
           if m.bytes_in_flight_per_sm < MIN_BYTES_PER_SM or m.ctas_per_sm < 2
           or m.barriers_per_iteration]
    assert bad == []


def _plans(tmp_path, queries):
    """plan_launch of csrc/cuda/launch_params.h for each (layers, n, d, bytes, sms, per_sm)."""
    source = tmp_path / "plan.cpp"
    source.write_text(
        '#include <cstdio>\n#include <cstdlib>\n#include "launch_params.h"\n'
        "int main(int argc, char** argv) {\n"
        "  for (int i = 1; i + 5 < argc; i += 6) {\n"
        "    const auto s = eofd::plan_launch(atoll(argv[i + 1]), atoll(argv[i + 2]),\n"
        "        atoi(argv[i]), atoi(argv[i + 3]), atoll(argv[i + 4]), atoll(argv[i + 5]));\n"
        '    std::printf("%lld %lld %lld\\n", (long long)s.num_chunks,\n'
        "                (long long)s.tiles_per_chunk, (long long)s.grid);\n"
        "  }\n}\n")
    binary = tmp_path / "plan"
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", f"-I{ROOT / 'csrc' / 'cuda'}",
                    str(source), "-o", str(binary)], check=True, capture_output=True, timeout=120)
    args = [str(v) for q in queries for v in q]
    out = subprocess.run([str(binary), *args], capture_output=True, text=True, check=True,
                         timeout=60).stdout.split("\n")
    return [tuple(map(int, line.split())) for line in out if line]


@needs_tools
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_headline_grids_are_whole_waves(cuda_models, tmp_path):
    """bf16, every hot variant: the grid is the kernel's resident CTAs on 132 SMs exactly,
    and each chunk respects the 1024-row fp32 bound."""
    cases = [(shape, i, m) for shape in HEADLINE for i, m in cuda_models.items()
             if i.aligned and i.student == i.teacher == "bf16"]
    queries = [(*HEADLINE[shape], 2, sm.H200.sms, m.ctas_per_sm) for shape, _, m in cases]
    for (shape, instance, m), (chunks, tiles, grid) in zip(cases, _plans(tmp_path, queries)):
        layers, n, d = HEADLINE[shape]
        items = chunks * -(-d // 256) * layers
        print(f"{shape} {instance.label}: {chunks} chunks of {tiles * 32} rows, {items} items, "
              f"grid {grid} = {m.waves(grid):g} waves")
        assert grid == m.ctas_per_sm * sm.H200.sms and m.waves(grid) == 1
        assert tiles * 32 <= 1024 and chunks * tiles * 32 >= n


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_small_calls_launch_one_cta_per_item(tmp_path):
    """Fewer items than resident CTAs even in one-tile chunks: one CTA per item (no empty
    CTAs), chunks as short as they go."""
    ((chunks, tiles, grid),) = _plans(tmp_path, [(1, 64, 96, 4, 132, 2)])
    assert (chunks, tiles, grid) == (2, 1, 2)
