"""Run a benchmark sweep: every (shape, dtype, mode, provider), timed side by side.

Method (DESIGN §6): warm-up calls first (torch.compile's compilation happens there and is not
timed); CUDA events with an L2 flush before every rep on a GPU, perf_counter on a CPU; medians
with p20/p80. Bandwidth is the ideal traffic of a fused kernel over the median time; a
device-to-device copy of one side's bytes, timed in the same run, is the yardstick.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

from ..progress import progress
from ..timing import time_ms
from .providers import MODES, make_inputs, make_step, providers
from .shapes import Preset, Shape

__all__ = ["Record", "device_name", "environment", "ideal_bytes", "records_as_dicts",
           "run_sweep"]


@dataclass
class Record:
    model: str
    layers: int
    batch: int
    seq: int
    d: int
    dtype: str
    mode: str
    provider: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gb_per_s: float | None = None
    copy_gb_per_s: float | None = None
    pct_of_copy: float | None = None
    peak_extra_mb: float | None = None
    error: str | None = None

    @property
    def shape(self) -> Shape:
        return Shape(self.model, self.layers, self.batch, self.seq, self.d)


def ideal_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """The traffic of a fused implementation: read S and T (fwd); again, and write dS (bwd)."""
    side = shape.elements * dtype.itemsize
    return (2 if mode == "fwd" else 5) * side


def _copy_gb_per_s(shape: Shape, dtype: torch.dtype, device, reps: int) -> float:
    src = torch.empty(shape.elements, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    ms = statistics.median(time_ms(lambda: dst.copy_(src), device, reps=reps))
    return 2 * src.numel() * dtype.itemsize / ms / 1e6  # read + write


def _peak_extra_mb(step, device) -> float | None:
    """Memory the step allocates beyond its inputs, at its peak (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _measure(record: Record, step, device, reps: int, copy_gbps: float, traffic: int) -> None:
    times = time_ms(step, device, warmup=3, reps=reps)
    p20, _, _, p80 = statistics.quantiles(times, n=5)
    record.median_ms, record.p20_ms, record.p80_ms = statistics.median(times), p20, p80
    record.gb_per_s = traffic / record.median_ms / 1e6
    record.copy_gb_per_s = copy_gbps
    record.pct_of_copy = 100 * record.gb_per_s / copy_gbps
    record.peak_extra_mb = _peak_extra_mb(step, device)


def run_sweep(preset: Preset, device: torch.device, *, provider_names=None, modes=MODES,
              reps: int | None = None) -> list[Record]:
    """Time every combination; a failure (e.g. out of memory) is recorded, not raised."""
    names = provider_names or providers(device)
    reps = reps or preset.reps
    jobs = [(shape, dtype, mode, p) for shape in preset.shapes for dtype in preset.dtypes
            for mode in modes for p in names]
    records, inputs, copy_gbps = [], {}, {}
    bar = progress(jobs, total=len(jobs), desc="benchmarking")
    for shape, dtype, mode, provider in bar:
        bar.set_postfix_str(f"{shape.model} B={shape.batch} N={shape.seq} {dtype} {mode} "
                            f"{provider}")
        key = (shape, dtype)
        if key not in inputs:
            inputs.clear()  # one shape's tensors alive at a time
            _release(device)
            inputs[key] = make_inputs(shape, dtype, device)
            copy_gbps[key] = _copy_gb_per_s(shape, dtype, device, reps)
        record = Record(shape.model, shape.layers, shape.batch, shape.seq, shape.d,
                        str(dtype).removeprefix("torch."), mode, provider)
        try:
            step = make_step(provider, mode, *inputs[key])
            _measure(record, step, device, reps, copy_gbps[key], ideal_bytes(shape, dtype, mode))
        except RuntimeError as err:  # out of memory, a compiler failure: recorded, go on
            record.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            _release(device)
        records.append(record)
    return records


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def environment(device: torch.device, preset_name: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["eofd-kernels"] + sys.argv[1:]),
        "preset": preset_name,
    }


def records_as_dicts(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records]
