"""Wall-clock times of callables: CUDA events on a GPU, perf_counter on the CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["median", "time_ms", "time_ms_interleaved"]


def time_ms_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *,
                        warmup: int = 2, reps: int = 10) -> dict[str, list[float]]:
    """Milliseconds of ``reps`` calls of each of ``fns``, after ``warmup`` untimed calls each.

    Reps go round-robin (every function once, then again), so slow drift of the machine (a
    neighbour's load on a shared CPU, clocks) hits all functions alike and their ratios hold.
    On CUDA each call is bracketed by events and a fresh 256 MB write flushes L2 before it, so
    every call reads its inputs from HBM, as a training step does.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    flush = (torch.empty(64 * 2**20, dtype=torch.int32, device=device)
             if device.type == "cuda" else None)
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_time_one(fn, device, flush))
    return times


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 2,
            reps: int = 10) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` (see :func:`time_ms_interleaved`)."""
    return time_ms_interleaved({"fn": fn}, device, warmup=warmup, reps=reps)["fn"]


def _time_one(fn: Callable[[], object], device: torch.device, flush) -> float:
    if flush is None:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    flush.zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def median(times: list[float]) -> float:
    return statistics.median(times)
