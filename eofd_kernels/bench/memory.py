"""Peak memory of one call: allocated memory on a GPU, the resident set of a fresh process on
a CPU.

glibc keeps freed blocks and reuses them unseen, so the resident set of a process that has run
other work says little about one call's needs. A fresh process started with
:data:`MALLOC_ENV` maps every allocation over 64 KB on its own and unmaps it when freed: its
resident set then follows live memory, and :func:`peak_extra_mb` reads a call's peak beyond
what was live before it (VmHWM, reset through /proc/self/clear_refs). The forced mappings make
every allocation fault its pages in, so timings are never taken in such a process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["MALLOC_ENV", "cuda_peak_extra_mb", "in_fresh_process", "peak_extra_mb"]

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
              "MALLOC_TOP_PAD_": "0"}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra_mb(fn: Callable[[], object]) -> float:
    """MB of resident memory ``fn()`` needs at its peak beyond what is resident before it,
    its result included (held until the peak is read). The CPU extension's freed-buffer cache
    is emptied first, so the buffers it would hand out count as the call's own."""
    from .. import cpu_cache

    cpu_cache.empty_cpu_cache()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before_kb = _status_kb("VmRSS")
    result = fn()
    peak_kb = _status_kb("VmHWM")
    del result
    return (peak_kb - before_kb) / 1024


def in_fresh_process(module: str, *args: str, timeout: float = 1800) -> str:
    """Run ``python -m module *args`` under :data:`MALLOC_ENV`; its last line of output."""
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                            text=True, check=False, timeout=timeout,
                            env=dict(os.environ, **MALLOC_ENV))
    if result.returncode:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout.strip().splitlines()[-1]


def cuda_peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float:
    """MB of CUDA memory ``fn()`` allocates at its peak beyond what is allocated before it, its
    result included."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - base) / 2**20
