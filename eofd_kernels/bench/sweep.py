"""Run a benchmark sweep: every (shape, dtype, mode, provider), timed side by side.

Method (docs/design.md, "Benchmarks"): warm-up calls first (torch.compile's compilation happens
there and is not timed); then the reps of all providers at a point go round-robin, so they
share the machine's conditions; CUDA events with an L2 flush before every rep on a GPU,
perf_counter on a CPU; medians with p20/p80. Bandwidth is the ideal traffic of a fused kernel
over the median time; a device-to-device copy of one side's bytes, timed round-robin with them,
is the yardstick.
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
from ..timing import time_ms_interleaved
from . import memory
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


def _copy_step(shape: Shape, dtype: torch.dtype, device):
    """A device copy of one side's bytes: the bandwidth yardstick, timed beside the providers."""
    src = torch.empty(shape.elements, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _peak_extra_mb(step, device) -> float | None:
    """Memory the step allocates beyond its inputs, at its peak (CUDA only)."""
    return memory.cuda_peak_extra_mb(step, device) if device.type == "cuda" else None


def _error(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def _fill(record: Record, times: list[float], traffic: int, copy_gbps: float) -> None:
    p20, _, _, p80 = statistics.quantiles(times, n=5)
    record.median_ms, record.p20_ms, record.p80_ms = statistics.median(times), p20, p80
    record.gb_per_s = traffic / record.median_ms / 1e6
    record.copy_gb_per_s = copy_gbps
    record.pct_of_copy = 100 * record.gb_per_s / copy_gbps


def _run_point(shape: Shape, dtype: torch.dtype, mode: str, names: list[str], inputs, device,
               reps: int) -> list[Record]:
    """Every provider at one (shape, dtype, mode), their reps interleaved with a device copy.

    Dynamo's caches are reset once per point: across a sweep the compiled providers would
    otherwise hit the recompile limit after a few shapes and silently run eagerly. Failures
    (out of memory, a compiler error) are recorded per provider and the others go on.
    """
    torch.compiler.reset()
    records = {p: Record(shape.model, shape.layers, shape.batch, shape.seq, shape.d,
                         str(dtype).removeprefix("torch."), mode, p) for p in names}
    steps = {}
    for p in names:
        try:
            steps[p] = make_step(p, mode, *inputs)
            for _ in range(3):  # compiles here, untimed
                steps[p]()
        except RuntimeError as err:
            records[p].error = _error(err)
            steps.pop(p, None)
            _release(device)
    copy = "device copy"
    try:
        times = time_ms_interleaved({**steps, copy: _copy_step(shape, dtype, device)}, device,
                                    warmup=1, reps=reps)
    except RuntimeError as err:
        for p in steps:
            records[p].error = _error(err)
        _release(device)
        return list(records.values())
    copy_gbps = 2 * shape.elements * dtype.itemsize / statistics.median(times[copy]) / 1e6
    for p, step in steps.items():
        _fill(records[p], times[p], ideal_bytes(shape, dtype, mode), copy_gbps)
        records[p].peak_extra_mb = _peak_extra_mb(step, device)
    return list(records.values())


def run_sweep(preset: Preset, device: torch.device, *, provider_names=None, modes=MODES,
              reps: int | None = None) -> list[Record]:
    """Time every combination; a failure (e.g. out of memory) is recorded, not raised."""
    names = provider_names or providers(device)
    reps = reps or preset.reps
    points = [(shape, dtype, mode) for shape in preset.shapes for dtype in preset.dtypes
              for mode in modes]
    records, inputs = [], {}
    bar = progress(points, total=len(points), desc="benchmarking")
    for shape, dtype, mode in bar:
        bar.set_postfix_str(f"{shape.model} B={shape.batch} N={shape.seq} {dtype} {mode}")
        key = (shape, dtype)
        if key not in inputs:
            inputs.clear()  # one shape's tensors alive at a time
            _release(device)
            inputs[key] = make_inputs(shape, dtype, device)
        records += _run_point(shape, dtype, mode, names, inputs[key], device, reps)
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
