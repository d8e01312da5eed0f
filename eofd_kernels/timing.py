"""Wall-clock medians of a callable: CUDA events on a GPU, perf_counter on the CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["median", "time_ms"]


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 2,
            reps: int = 10) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed calls.

    On CUDA each call is bracketed by events and a fresh 256 MB write flushes L2 between calls,
    so every rep reads its inputs from HBM, as a training step does.
    """
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        flush = torch.empty(64 * 2**20, dtype=torch.int32, device=device)
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(times: list[float]) -> float:
    return statistics.median(times)
