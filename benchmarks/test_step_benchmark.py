"""pytest-benchmark twin of ``eofd-kernels bench --step``: ``pytest benchmarks/ --benchmark-only``.

Whole distillation training steps of every way of computing the loss in each setting (teacher
forward, student forward, loss, backward + AdamW; eofd_kernels.bench.step). pytest-benchmark
times one test after another, so the ways are not interleaved here: for ratios on a noisy
machine use the command. Each round's parts (medians) go to ``extra_info``; the step ends with
a synchronize on a GPU (the loss is read back).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from eofd_kernels.bench.step import PARTS, SETTINGS, WAYS, StepBench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
ROUNDS = 20 if DEVICE.type == "cuda" else 3


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def bench(request):
    return StepBench(SETTINGS[request.param], DEVICE, DTYPE)


@pytest.mark.parametrize("way_name", WAYS)
def test_training_step(benchmark, bench, way_name):
    benchmark.group = f"step {bench.setting.key}"
    way = bench.ways([way_name], power=0.5)[0]
    parts = []

    def step():
        step_parts, loss = bench.step(way)
        parts.append(step_parts)
        return loss

    loss = benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info["parts_ms"] = {
        part: statistics.median(p[i] for p in parts[1:]) for i, part in enumerate(PARTS)}
    assert loss > 0 and loss == loss
