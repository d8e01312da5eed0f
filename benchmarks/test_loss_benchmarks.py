"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

Every provider (eager and compiled paper code, plain MSE eager and compiled, our backends)
on a few of the paper's shapes, forward and forward+backward. GPU work is synchronised inside
the timed function; compilation happens in the warm-up rounds. For the full sweep with tables,
JSON and plots use ``eofd-kernels bench``.
"""

from __future__ import annotations

import pytest
import torch

from eofd_kernels.bench.providers import MODES, make_inputs, make_step, providers
from eofd_kernels.bench.shapes import model_shape

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# BERT-base at the CPU shape; on a GPU the BERT-base training shape and Flan-T5-XXL.
if DEVICE.type == "cuda":
    SHAPES = [model_shape("bert-base", 32, 128), model_shape("flan-t5-xxl", 32, 128)]
    DTYPES = [torch.bfloat16]
else:
    SHAPES = [model_shape("bert-base", 8, 128)]
    DTYPES = [torch.float32]


@pytest.fixture(scope="module", params=[(s, d) for s in SHAPES for d in DTYPES],
                ids=lambda p: f"{p[0].model}-B{p[0].batch}-{str(p[1]).removeprefix('torch.')}")
def inputs(request):
    shape, dtype = request.param
    return make_inputs(shape, dtype, DEVICE)


def _synchronised(step):
    if DEVICE.type != "cuda":
        return step

    def run():
        step()
        torch.cuda.synchronize(DEVICE)

    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", providers(DEVICE))
def test_eofd_loss(benchmark, inputs, provider, mode):
    benchmark.group = f"{mode}"
    step = _synchronised(make_step(provider, mode, *inputs))
    result = benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=3)
    students = inputs[0]
    if mode == "fwd":  # the timed step returned the loss, or the gradients of the students
        assert result.dim() == 0 and torch.isfinite(result) and result > 0
    else:
        assert [g.shape for g in result] == [s.shape for s in students]
        assert all(torch.isfinite(g).all() for g in result)
