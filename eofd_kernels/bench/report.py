"""Benchmark output: a markdown table, a JSON file with every record, PNG plots."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from .providers import BASELINES
from .sweep import Record, records_as_dicts

__all__ = ["device_slug", "markdown", "plot", "write_json"]

EAGER, COMPILED, MSE_COMPILED = "eager ref", "compiled ref", "mse compiled"


def device_slug(name: str) -> str:
    """A folder name for a device: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def _groups(records: list[Record]):
    """(shape, dtype, mode) -> {provider: record}, in sweep order."""
    groups = defaultdict(dict)
    for r in records:
        groups[(r.shape, r.dtype, r.mode)][r.provider] = r
    return groups


def _ms(r: Record | None) -> str:
    if r is None:
        return "-"
    return "fail" if r.error else f"{r.median_ms:.3f}"


def _ratio(base: Record | None, r: Record | None) -> str:
    if base is None or r is None or base.error or r.error:
        return "-"
    return f"{base.median_ms / r.median_ms:.2f}x"


def markdown(records: list[Record], meta: dict) -> str:
    """Per (shape, dtype, mode): median ms of every provider, then our fastest backend's
    speedups over eager, torch.compile and compiled MSE, its GB/s and % of copy bandwidth."""
    providers = list(dict.fromkeys(r.provider for r in records))
    ours = [p for p in providers if p not in BASELINES]
    lines = [
        f"# EOFD loss benchmarks: {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, "
        f"{meta['date']}. Command: `{meta['command']}`",
        "",
        "Median ms (CUDA events with an L2 flush / perf_counter). *best* is our fastest "
        "backend; its speedups are over the eager paper code, `torch.compile` of it, and "
        "compiled plain `F.mse_loss`. GB/s counts the ideal fused traffic (fwd: read S, T; "
        "fwd+bwd: 5 passes); % copy is against a device-to-device copy timed in the same run. "
        "The CPU extension's fwd+bwd moves 3 passes (dS in the forward, README), so it can "
        "exceed 100%.",
        "",
        "| shape | dtype | mode | " + " | ".join(providers)
        + " | best | vs eager | vs compile | vs mse compiled | GB/s | % copy |",
        "|" + "---|" * (len(providers) + 9),
    ]
    for (shape, dtype, mode), by_provider in _groups(records).items():
        timed = [by_provider[p] for p in ours if p in by_provider and not by_provider[p].error]
        best = min(timed, key=lambda r: r.median_ms, default=None)
        cells = [_ms(by_provider.get(p)) for p in providers]
        tail = ["-"] * 6 if best is None else [
            best.provider, _ratio(by_provider.get(EAGER), best),
            _ratio(by_provider.get(COMPILED), best), _ratio(by_provider.get(MSE_COMPILED), best),
            f"{best.gb_per_s:.1f}", f"{best.pct_of_copy:.0f}%"]
        lines.append(f"| {shape.label()} | {dtype} | {mode} | " + " | ".join(cells + tail) + " |")
    errors = [r for r in records if r.error]
    if errors:
        lines += ["", "Failures:", ""] + [
            f"- {r.shape.label()} {r.dtype} {r.mode} {r.provider}: {r.error}" for r in errors]
    return "\n".join(lines) + "\n"


def write_json(path: Path, records: list[Record], meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "records": records_as_dicts(records)}, indent=1))


def plot(records: list[Record], out_dir: Path, mode: str = "fwd+bwd") -> list[Path]:
    """speedup.png (ours over eager and over torch.compile vs bytes moved) and bandwidth.png
    (GB/s of every provider, and the copy, vs bytes moved). [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = [(k, v) for k, v in _groups(records).items() if k[2] == mode]
    ours = list(dict.fromkeys(r.provider for r in records if r.provider not in BASELINES))
    dtypes = list(dict.fromkeys(k[1] for k, _ in groups))

    def series(provider, dtype, value):
        pts = sorted((_mb(v[provider]), value(v))
                     for k, v in groups if k[1] == dtype and provider in v
                     and value(v) is not None)
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for ax, base in zip(axes, (EAGER, COMPILED)):
        for provider in ours:
            for dtype in dtypes:
                xs, ys = series(provider, dtype, lambda v, p=provider, b=base: _speedup(v, b, p))
                ax.plot(xs, ys, marker="o", label=f"{provider} {dtype}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xscale="log", xlabel="MB per side (S or T, all layers)",
               ylabel=f"speedup over {base}", title=f"{mode}: speedup over {base}")
        ax.legend(fontsize=8)
    paths = [out_dir / "speedup.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for provider in ours + [COMPILED, MSE_COMPILED]:
        for dtype in dtypes:
            xs, ys = series(provider, dtype, lambda v, p=provider: _field(v, p, "gb_per_s"))
            ax.plot(xs, ys, marker="o", label=f"{provider} {dtype}")
    for dtype in dtypes:
        xs, ys = series(ours[0] if ours else EAGER, dtype,
                        lambda v: _field(v, next(iter(v)), "copy_gb_per_s"))
        ax.plot(xs, ys, ls="--", color="black", label=f"copy {dtype}")
    ax.set(xscale="log", xlabel="MB per side (S or T, all layers)", ylabel="GB/s (ideal traffic)",
           title=f"{mode}: effective bandwidth")
    ax.legend(fontsize=7, ncol=2)
    paths.append(out_dir / "bandwidth.png")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def _mb(r: Record) -> float:
    return r.shape.elements * getattr(torch, r.dtype).itemsize / 2**20


def _field(group: dict, provider: str, name: str):
    r = group.get(provider)
    return None if r is None or r.error else getattr(r, name)


def _speedup(group: dict, base: str, provider: str):
    b, r = group.get(base), group.get(provider)
    if b is None or r is None or b.error or r.error:
        return None
    return b.median_ms / r.median_ms
