"""``eofd-kernels bench --fused-projection``: the projection fused into the loss against
projecting first, in time and peak memory of fwd+bwd.

Providers, all computing the loss of ``S = X Wᵀ + b`` over every mapped layer and the
gradients of X, W and b (frozen teacher; fp32, or ``--dtypes bf16`` on a GPU):

    linear + eager ref   nn.functional.linear, then the paper's code (eager)
    linear + eofd_loss   nn.functional.linear, then an ``EOFDLoss`` module
    fused                ``eofd_projected_loss``

Time: median of round-robin reps in one process. Peak extra memory: what a step needs beyond
its inputs and the gradients every path must return (dX, dW, db). On a GPU,
``torch.cuda.max_memory_allocated``; on a CPU, each provider runs in a fresh process whose
peak resident set (VmHWM, reset through /proc/self/clear_refs after a warm-up step) is read
after one step, minus the resident set before it and the returned gradients' bytes
(:mod:`eofd_kernels.bench.memory`); the CPU extension's buffer cache is off there (a cached
buffer is memory in use as well).
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..loss import EOFDLoss
from ..projected_loss import eofd_projected_loss
from ..reference import eofd_loss_reference
from ..synthetic import teacher_states
from ..timing import time_ms_interleaved
from . import memory

__all__ = ["PROVIDERS", "SHAPES", "run_fused_projection"]

PROVIDERS = ("linear + eager ref", "linear + eofd_loss", "fused")


@dataclass(frozen=True)
class ProjectionShape:
    name: str
    layers: int
    batch: int
    seq: int
    student_width: int
    teacher_width: int

    def label(self) -> str:
        return (f"{self.name} L={self.layers} B={self.batch} N={self.seq} "
                f"{self.student_width}->{self.teacher_width}")


SHAPES = {
    "tinybert": ProjectionShape("tinybert", 4, 8, 128, 312, 768),
    "bert-large": ProjectionShape("bert-base->bert-large", 12, 8, 128, 768, 1024),
    "flan-t5-xxl": ProjectionShape("flan-t5-xxl", 24, 4, 256, 1024, 4096),
}


def _inputs(shape: ProjectionShape, device: torch.device, dtype: torch.dtype = torch.float32):
    g = torch.Generator(device=device).manual_seed(0)
    lead = (shape.batch, shape.seq)
    xs, ws, bs, ts = [], [], [], []
    for _ in range(shape.layers):
        xs.append(torch.randn(*lead, shape.student_width, generator=g, device=device))
        ws.append(torch.randn(shape.teacher_width, shape.student_width, generator=g,
                              device=device) / shape.student_width ** 0.5)
        bs.append(torch.zeros(shape.teacher_width, device=device))
        ts.append(teacher_states((*lead, shape.teacher_width), g))
    xs, ws, bs, ts = ([x.to(dtype) for x in group] for group in (xs, ws, bs, ts))
    for x in xs + ws + bs:
        x.requires_grad_()
    return xs, ws, bs, ts


def _step(provider: str, xs, ws, bs, ts):
    """A no-argument fwd+bwd step returning (dX..., dW..., db...)."""
    leaves = xs + ws + bs
    if provider == "fused":
        def loss():
            return eofd_projected_loss(xs, ws, bs, ts)
    elif provider == "linear + eofd_loss":
        module = EOFDLoss()

        def loss():
            return module([F.linear(x, w, b) for x, w, b in zip(xs, ws, bs)], ts)
    else:
        def loss():
            return sum(eofd_loss_reference(F.linear(x, w, b), t)
                       for x, w, b, t in zip(xs, ws, bs, ts))
    return lambda: torch.autograd.grad(loss(), leaves)


def _grad_bytes(xs, ws, bs) -> int:
    return sum(x.numel() * x.element_size() for x in xs + ws + bs)


def _child_peak_mb(provider: str, shape_key: str) -> float:
    """In this (fresh) process: one warm-up step, then the peak extra memory of one step."""
    import eofd_kernels as ek

    ek.set_cpu_cache_limit(0)
    xs, ws, bs, ts = _inputs(SHAPES[shape_key], torch.device("cpu"))
    step = _step(provider, xs, ws, bs, ts)
    step()  # warm-up (its gradients are freed at once)
    return memory.peak_extra_mb(step) - _grad_bytes(xs, ws, bs) / 2**20


def _peak_mb(provider: str, shape_key: str, device: torch.device, dtype: torch.dtype) -> float:
    if device.type == "cuda":
        xs, ws, bs, ts = _inputs(SHAPES[shape_key], device, dtype)
        step = _step(provider, xs, ws, bs, ts)
        step()  # warm-up
        return memory.cuda_peak_extra_mb(step, device) - _grad_bytes(xs, ws, bs) / 2**20
    return float(memory.in_fresh_process("eofd_kernels.bench.projection", provider, shape_key))


def run_fused_projection(shape_keys, device: torch.device, reps: int,
                         dtype: torch.dtype = torch.float32, print_fn=print) -> list[dict]:
    """One record per (shape, provider): median/min ms, peak extra MB, ratios to fused.
    ``dtype``: of every input (bf16 on a GPU; the CPU memory runs are fp32)."""
    if device.type != "cuda" and dtype != torch.float32:
        raise ValueError(f"dtype: the CPU memory measurement runs fp32 only, got {dtype}")
    records = []
    for key in shape_keys:
        shape = SHAPES[key]
        xs, ws, bs, ts = _inputs(shape, device, dtype)
        steps = {p: _step(p, xs, ws, bs, ts) for p in PROVIDERS}
        times = time_ms_interleaved(steps, device, warmup=1, reps=reps)
        del steps, xs, ws, bs, ts
        peaks = {p: _peak_mb(p, key, device, dtype) for p in PROVIDERS}
        for p in PROVIDERS:
            records.append({"shape": shape.label(), "provider": p, "dtype": str(dtype),
                            "median_ms": statistics.median(times[p]), "min_ms": min(times[p]),
                            "peak_extra_mb": peaks[p]})
        fused = records[-1]
        for r in records[-len(PROVIDERS):]:
            r["time_vs_fused"] = r["median_ms"] / fused["median_ms"]
            r["memory_vs_fused"] = r["peak_extra_mb"] / max(fused["peak_extra_mb"], 1e-9)
            print_fn(f"{r['shape']:<48} {r['provider']:<20} {r['median_ms']:10.1f} ms "
                     f"{r['peak_extra_mb']:9.1f} MB")
    return records


def markdown(records: list[dict], meta: dict) -> str:
    dtype = records[0]["dtype"] if records else ""
    lines = [f"# Fused projection + EOFD loss: {meta['device']}", "",
             f"torch {meta['torch']}, commit {meta['commit']}, {meta['date']}. Command: "
             f"`{meta['command']}`", "",
             "fwd+bwd of the loss of S = X Wᵀ + b over all mapped layers, gradients of X, W "
             f"and b (frozen teacher, {dtype}). Median ms of round-robin reps in one process; "
             "peak extra memory beyond the inputs and the returned gradients (CPU: a fresh process "
             "per provider, VmHWM after a reset; CUDA: max_memory_allocated).", "",
             "| shape | provider | median ms | min ms | peak extra MB | time / fused | "
             "fused memory / this |", "|---|---|---|---|---|---|---|"]
    for r in records:
        share = 1 / r["memory_vs_fused"] if r["memory_vs_fused"] else float("nan")
        lines.append(f"| {r['shape']} | {r['provider']} | {r['median_ms']:.1f} | "
                     f"{r['min_ms']:.1f} | {r['peak_extra_mb']:.1f} | "
                     f"{r['time_vs_fused']:.2f} | {share:.1%} |")
    return "\n".join(lines) + "\n"


def write(records: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fused_projection.md").write_text(markdown(records, meta))
    (out / "fused_projection.json").write_text(json.dumps({"meta": meta, "records": records},
                                                          indent=1))


if __name__ == "__main__":  # the child of _peak_mb: provider, shape key
    print(_child_peak_mb(sys.argv[1], sys.argv[2]))
