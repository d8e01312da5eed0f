"""Synthetic hidden states shaped like a transformer's, for checks, benchmarks and tests.

A teacher's per-dimension spreads vary over orders of magnitude, a few dimensions carry far
more variance than the rest (the outlier dimensions EOFD weights up), and every dimension has
its own offset; the student is the teacher plus noise.
"""

from __future__ import annotations

import torch

__all__ = ["student_near", "teacher_states"]


def teacher_states(shape, generator: torch.Generator, *, log_spread: float = 4.0,
                   outlier_every: int = 256, outlier_scale: float = 30.0, offset: bool = True,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(..., d)`` states on the generator's device: per-dim std ``exp(U(-1, 1) * log_spread
    / 2)``, the first ``max(1, d // outlier_every)`` dims (none when ``outlier_every`` is 0)
    ``outlier_scale`` times wider, plus a standard-normal per-dim offset when ``offset``."""
    d = shape[-1]
    device = generator.device
    spread = torch.exp((torch.rand(d, generator=generator, device=device) * 2 - 1)
                       * (log_spread / 2))
    if outlier_every:
        spread[: max(1, d // outlier_every)] *= outlier_scale
    states = torch.randn(shape, generator=generator, device=device) * spread
    if offset:
        states += torch.randn(d, generator=generator, device=device)
    return states.to(dtype)


def student_near(teacher: torch.Tensor, generator: torch.Generator,
                 noise: float = 0.5) -> torch.Tensor:
    """``teacher + noise * N(0, 1)``, in the teacher's dtype."""
    return teacher + noise * torch.randn(teacher.shape, generator=generator,
                                         device=teacher.device).to(teacher.dtype)
