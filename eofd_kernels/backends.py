"""Which backends can run here, and the per-layer loss function of each.

A backend is a function ``(LayerBatch, power, eps) -> (L,) per-layer losses``; reductions and
layer weights are applied on top of it, the same for all.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from .inputs import LayerBatch

__all__ = ["BACKENDS", "available_backends", "interpreting", "resolve_backend"]

BACKENDS = ("triton", "ext", "torch", "reference")
LayerLossFn = Callable[[LayerBatch, float, float], torch.Tensor]


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_missing(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    if device.type == "cpu":
        return ("Triton needs CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                "importing eofd_kernels (the Triton interpreter: slow, for tests)")
    return f"Triton does not support {device.type} tensors"


def _ext_missing(device: torch.device) -> str | None:
    from . import ext_loader

    return ext_loader.missing_reason(device)


_MISSING = {
    "triton": _triton_missing,
    "ext": _ext_missing,
    "torch": lambda device: None,
    "reference": lambda device: None,
}


@torch.compiler.assume_constant_result
def _missing(name: str, device_type: str) -> str | None:
    """Why ``name`` cannot run on ``device_type`` tensors; a constant to ``torch.compile``."""
    return _MISSING[name](torch.device(device_type))


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA if present, else CPU), best first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [name for name in BACKENDS if _missing(name, device.type) is None]


def _load(name: str) -> LayerLossFn:
    if name == "triton":
        from .triton_op import layer_losses_triton

        return layer_losses_triton
    if name == "ext":
        from .ext_op import layer_losses_ext

        return layer_losses_ext
    if name == "torch":
        from .torch_backend import layer_losses_torch

        return layer_losses_torch
    from .reference import layer_losses_reference

    return layer_losses_reference


def resolve_backend(name: str, device: torch.device) -> LayerLossFn:
    """The per-layer loss function of backend ``name`` for tensors on ``device``.

    ``"auto"``: CUDA tensors take triton, else ext, else torch; other tensors ext, else torch.
    """
    if name == "auto":
        order = ("triton", "ext", "torch") if device.type == "cuda" else ("ext", "torch")
        name = next(n for n in order if _missing(n, device.type) is None)
    elif name not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {name!r}")
    missing = _missing(name, device.type)
    if missing is not None:
        raise RuntimeError(f"backend={name!r} cannot run on {device} tensors: {missing}")
    return _load(name)
