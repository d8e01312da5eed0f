"""Finds the compiled extension (``backend="ext"``); the package works without it."""

from __future__ import annotations

import torch

__all__ = ["missing_reason"]


def missing_reason(device: torch.device) -> str | None:
    """Why the compiled extension cannot run on ``device``, or None when it can."""
    return "the compiled extension eofd_kernels._C is not built in this version"
