"""Benchmark shapes: the paper's models over all their distilled layers (docs/design.md,
"Benchmarks"), and the sweeps (presets) the ``bench`` command runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MODELS", "PRESETS", "Preset", "Shape", "model_shape"]

# name -> (distilled layers, hidden width); encoder-decoder models distil both stacks.
MODELS = {
    "tinybert-4": (4, 312),
    "bert-6": (6, 768),
    "bert-base": (12, 768),
    "gpt2": (12, 768),
    "gpt2-medium": (24, 1024),
    "t5-small": (6 + 6, 512),
    "t5-large": (24 + 24, 1024),
    "flan-t5-xxl": (24 + 24, 4096),
}


@dataclass(frozen=True)
class Shape:
    model: str
    layers: int
    batch: int
    seq: int
    d: int

    @property
    def elements(self) -> int:
        """Elements of one side (student or teacher) over all layers."""
        return self.layers * self.batch * self.seq * self.d

    def label(self) -> str:
        return f"{self.model} L={self.layers} B={self.batch} N={self.seq} d={self.d}"


def model_shape(name: str, batch: int, seq: int) -> Shape:
    """All distilled layers of paper model ``name`` at batch ``batch``, sequence ``seq``."""
    layers, d = MODELS[name]
    return Shape(name, layers, batch, seq, d)


@dataclass(frozen=True)
class Preset:
    """What one ``bench`` run sweeps."""

    shapes: tuple[Shape, ...]
    dtypes: tuple[torch.dtype, ...]
    reps: int


def _sweeps(name: str, batches, seqs, base_batch: int, base_seq: int) -> list[Shape]:
    shapes = [model_shape(name, b, base_seq) for b in batches]
    return shapes + [model_shape(name, base_batch, n) for n in seqs if n != base_seq]


PRESETS = {
    # Minutes on a 2-core CPU: three widths, a batch sweep at BERT-base, fp32 and bf16.
    "cpu": Preset(
        shapes=tuple([model_shape("tinybert-4", 8, 128), model_shape("t5-small", 8, 128)]
                     + _sweeps("bert-base", (2, 8), (), 8, 128)),
        dtypes=(torch.float32, torch.bfloat16), reps=20),
    # The GPU sweep: every paper model at B=32, N=128, and batch / sequence sweeps at
    # BERT-base and at the Flan-T5-XXL width.
    "gpu": Preset(
        shapes=tuple(dict.fromkeys(
            [model_shape(m, 32, 128) for m in MODELS]
            + _sweeps("bert-base", (8, 16, 32, 64, 128), (64, 256, 512), 32, 128)
            + _sweeps("flan-t5-xxl", (8, 16, 32), (), 32, 128))),
        dtypes=(torch.float32, torch.bfloat16, torch.float16), reps=30),
    # The headline points, in a few minutes of GPU time (benchmarks/gpu_check.sh): BERT-base
    # at B=32, and 32 layers at the Flan-T5-XXL width.
    "gpu-headline": Preset(
        shapes=(model_shape("bert-base", 32, 128), Shape("flan-t5-xxl", 32, 8, 128, 4096)),
        dtypes=(torch.bfloat16,), reps=30),
}
