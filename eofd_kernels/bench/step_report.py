"""``bench --step`` output: step.md (a table per setting), step.json (every record with its raw
step times), step.png (the parts of each way's step as stacked bars)."""

from __future__ import annotations

import json
from pathlib import Path

from .step import PARTS

__all__ = ["markdown", "plot", "write"]


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    """(setting, dtype, batch, seq) -> its records, in run order."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["setting"], r["dtype"], r["batch"], r["seq"]), []).append(r)
    return groups


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def markdown(records: list[dict], meta: dict) -> str:
    lines = [f"# Whole distillation training steps: {meta['device']}", "",
             f"torch {meta['torch']}, commit {meta['commit']}, {meta['date']}. Command: "
             f"`{meta['command']}`"
             + (", load average (1, 5, 15 min) at the end: "
                + ", ".join(f"{x:.1f}" for x in meta["load_average"])
                if "load_average" in meta else ""), "",
             "One step: teacher forward (no grad), student forward, the loss (projections, "
             "EOFD per mapped layer, L_pred where the setting has logits), backward + AdamW. "
             "Random weights from configs. Median ms of the timed steps (p20-p80), the ways' "
             "steps interleaved in one process; parts: their medians. Peak extra memory: one "
             "step's peak beyond what is allocated before it (CPU: resident set in a fresh "
             "process; CUDA: max_memory_allocated). *vs paper*: the paper's step (or loss "
             "part) time over this way's. *loss at step 0*: the same weights and dropout masks "
             "for every way (plain MSE is the p = 0 objective).", ""]
    for (_, dtype, batch, seq), group in _groups(records).items():
        lines += [f"## {group[0]['label']}, B={batch}, N={seq}, {dtype}, "
                  f"{group[0]['reps']} timed steps per way", "",
                  "| way | step ms (p20-p80) | " + " | ".join(PARTS)
                  + " | peak extra MB | step vs paper | loss part vs paper | loss at step 0 |",
                  "|" + "---|" * (len(PARTS) + 6)]
        for r in group:
            name = f"**{r['way']}**" if r["way"] == "eofd_kernels" else r["way"]
            peak = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"
            lines.append(
                f"| {name} | {r['step_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f}) | "
                + " | ".join(f"{r['parts'][p]:.1f}" for p in PARTS)
                + f" | {peak} | {_ratio(r['vs_paper'])} | {_ratio(r['loss_part_vs_paper'])} | "
                  f"{r['loss0']:.6g} |")
        lines += ["", *_cache_line(group)]
    return "\n".join(lines)


def _cache_line(group: list[dict]) -> list[str]:
    """The step from a teacher cache against the same loss with the live teacher."""
    ways = {r["way"]: r for r in group}
    cached, live = ways.get("eofd_kernels cached"), ways.get("eofd_kernels")
    if cached is None or live is None:
        return []
    return [f"From a teacher cache the step takes {cached['step_ms']:.1f} ms against "
            f"{live['step_ms']:.1f} ms with the live teacher: "
            f"{cached['step_ms'] / live['step_ms']:.3f}x (teacher part "
            f"{cached['parts']['teacher']:.1f} vs {live['parts']['teacher']:.1f} ms).", ""]


def plot(records: list[dict], path: Path) -> Path | None:
    """Stacked bars of the parts' medians per way, one panel per setting; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = _groups(records)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, ((key, dtype, batch, seq), group) in zip(axes[0], groups.items()):
        ways = [r["way"] for r in group]
        bottom = [0.0] * len(group)
        for part in PARTS:
            heights = [r["parts"][part] for r in group]
            ax.bar(ways, heights, bottom=bottom, label=part)
            bottom = [b + h for b, h in zip(bottom, heights)]
        for i, r in enumerate(group):
            ax.annotate(f"{r['step_ms']:.0f}", (i, bottom[i]), ha="center", va="bottom",
                        fontsize=8)
        # Headroom above the tallest bar for its label and the legend.
        ax.set(title=f"{key} B={batch} N={seq} {dtype}", ylabel="ms (medians)",
               ylim=(0, 1.3 * max(bottom)))
        ax.tick_params(axis="x", labelrotation=20)
    axes[0][0].legend(fontsize=8, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(records: list[dict], meta: dict, out: Path) -> list[Path]:
    """step.md, step.json and (with matplotlib) step.png under ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "step.md", out / "step.json"]
    paths[0].write_text(markdown(records, meta))
    paths[1].write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    png = plot(records, out / "step.png")
    return paths + ([png] if png else [])
