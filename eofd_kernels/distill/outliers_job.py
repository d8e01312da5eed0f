"""``eofd-kernels outliers``: a teacher's outlier dimensions over a text, as the paper's
Appendix H lists them, with the EOFD weights they get; JSON and plots under ``--out``.

Offline: the teacher comes from an installed package, a local folder or is random (and says
so); the text is Python's bundled documentation or a file of sentences, one per line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..outliers import CRITERIA, OutlierReport, OutlierScan
from ..progress import progress
from .corpus import file_sentences, stdlib_sentences
from .models import Teacher, load_teacher

__all__ = ["OutliersConfig", "plot_report", "run_outliers"]


@dataclass
class OutliersConfig:
    teacher: str = "minilm"
    text: str = "stdlib"
    batches: int = 20
    batch_size: int = 32
    max_length: int = 64
    power: float = 0.5
    criterion: str = "variance"
    threshold: float | None = None
    top: int = 5
    backend: str = "auto"
    out: Path | None = None
    device: str | torch.device | None = None


def _sentences(text: str) -> list[str]:
    if text == "stdlib":
        train, held_out = stdlib_sentences()
        return train + held_out
    return file_sentences(text)


def scan_teacher(model, tokenizer, sentences: list[str], cfg: OutliersConfig,
                 device: torch.device) -> OutlierScan:
    """Per-dim summaries of every layer's output (hidden states 1..L) over the sentences."""
    scan = OutlierScan(cfg.backend)
    starts = range(0, min(len(sentences), cfg.batches * cfg.batch_size), cfg.batch_size)
    for start in progress(starts, total=len(starts), desc="scanning"):
        enc = tokenizer(sentences[start:start + cfg.batch_size], max_length=cfg.max_length,
                        padding=True, truncation=True, return_tensors="pt")
        batch = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
        scan.update(list(out.hidden_states[1:]), batch["attention_mask"])
    return scan


def plot_report(report: OutlierReport, out: Path, title: str, top: int = 8) -> list[Path]:
    """``sigma_ratio_heatmap.png`` (layers x dims, sigma_d / sbar on a log colour scale) and
    ``top_dims.png`` (per layer, the top dims' sigma_d / sbar); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError:
        return []
    out.mkdir(parents=True, exist_ok=True)
    ratios = torch.tensor([[s / layer.sbar for s in layer.sigma] for layer in report.layers])
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(report.layers) + 1.6))
    image = ax.imshow(ratios.clamp_min(1e-3).numpy(), aspect="auto", interpolation="nearest",
                      cmap="magma", norm=LogNorm(vmin=max(ratios.min().item(), 1e-2),
                                                 vmax=ratios.max().item()))
    ax.set_xlabel("hidden dimension d")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(report.layers)), [str(i + 1) for i in range(len(report.layers))])
    for dims in report.recognized().values():
        for d in dims:
            ax.annotate(str(d), (d, -0.5), xytext=(0, 4), textcoords="offset points",
                        ha="center", fontsize=7, annotation_clip=False)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("sigma_d / mean_d sigma_d (log scale; 1 = a typical dim)")
    ax.set_title(f"{title}: per-dim std relative to the layer's mean std "
                 f"(outlier dims labelled on top)", fontsize=9, pad=14)
    fig.tight_layout()
    heatmap = out / "sigma_ratio_heatmap.png"
    fig.savefig(heatmap, dpi=130)
    plt.close(fig)

    cols = min(4, len(report.layers))
    rows = -(-len(report.layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for i, layer in enumerate(report.layers):
        ax = axes[i // cols][i % cols]
        dims = layer.top(top)
        values = [layer.sigma[d] / layer.sbar for d in dims]
        colours = ["tab:red" if d in layer.dims else "tab:gray" for d in dims]
        ax.bar(range(len(dims)), values, color=colours)
        ax.set_xticks(range(len(dims)), [str(d) for d in dims], fontsize=7, rotation=45)
        ax.set_title(f"layer {i + 1}", fontsize=8)
        ax.set_ylabel("sigma_d / sbar", fontsize=7)
    for j in range(len(report.layers), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(f"{title}: top {top} dims per layer (red: outlier, {report.criterion} "
                 f"criterion)", fontsize=9)
    fig.tight_layout()
    bars = out / "top_dims.png"
    fig.savefig(bars, dpi=130)
    plt.close(fig)
    return [heatmap, bars]


def run_outliers(cfg: OutliersConfig, print_fn=print,
                 teacher: Teacher | None = None) -> OutlierReport:
    """Scan, print the report, write it under ``cfg.out``; ``teacher``: one already loaded
    (the CLI loads it to check the flags against it), else ``cfg.teacher`` is loaded."""
    if cfg.criterion not in CRITERIA:
        raise ValueError(f"criterion: expected one of {sorted(CRITERIA)}, got {cfg.criterion!r}")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = teacher if teacher is not None else load_teacher(cfg.teacher)
    model = teacher.model.to(device)
    sentences = _sentences(cfg.text)
    print_fn(f"teacher: {teacher.description}; text: {cfg.text} "
             f"({min(len(sentences), cfg.batches * cfg.batch_size)} sentences)")
    scan = scan_teacher(model, teacher.tokenizer, sentences, cfg, device)
    report = scan.report(criterion=cfg.criterion, threshold=cfg.threshold, power=cfg.power)
    print_fn(report.text(cfg.top))
    if cfg.out is not None:
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "outliers.json").write_text(report.to_json())
        plots = plot_report(report, cfg.out, teacher.description.split(";")[0].split(" (")[0])
        print_fn(f"wrote {cfg.out / 'outliers.json'}"
                 + "".join(f", {p}" for p in plots))
    return report
