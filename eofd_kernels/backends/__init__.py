"""The backends, one module per ``backend=`` value, and how a call picks one.

A backend is a function ``(LayerBatch, power, eps, grad_ahead) -> (L,) per-layer losses``;
reductions and layer weights are applied on top of it, the same for all. ``grad_ahead`` (a
:class:`~eofd_kernels.backends.grad_ahead.GradAhead` or None) is the caller's forecast of the
next backward's incoming grads; only the extension's CPU training step uses it.

    torch_backend      plain PyTorch ops, differentiated by autograd (always available)
    reference_backend  the paper's code per layer (the oracle)
    triton_backend     the fused Triton kernels (triton_kernels) as torch.library custom ops
    ext_backend        the compiled extension's ops (csrc/), loaded by ext_loader
    op_autograd        the fake impls and the autograd formula both op pairs share
    grad_ahead         the CPU training step that writes dS in the forward (ext on CPU)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .availability import missing_reason

__all__ = ["BACKENDS", "available_backends", "op_pair", "pick_backend", "resolve_backend"]

BACKENDS = ("triton", "ext", "torch", "reference")
LayerLossFn = Callable[..., torch.Tensor]  # (LayerBatch, power, eps, grad_ahead) -> (L,)


def _as_device(device) -> torch.device:
    if isinstance(device, (str, torch.device)):
        try:
            return torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"device: {error}") from None
    raise TypeError(f"device: expected None, a str or a torch.device, got "
                    f"{type(device).__name__} ({device!r})")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA if present, else CPU), best first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = _as_device(device)
    return [name for name in BACKENDS if missing_reason(name, device.type) is None]


def _load(name: str) -> LayerLossFn:
    if name == "triton":
        from .triton_backend import layer_losses_triton

        return layer_losses_triton
    if name == "ext":
        from .ext_backend import layer_losses_ext

        return layer_losses_ext
    if name == "torch":
        from .torch_backend import layer_losses_torch

        return layer_losses_torch
    from .reference_backend import layer_losses_reference

    return layer_losses_reference


def op_pair(name: str):
    """The ``(forward, backward)`` op pair of backend ``name`` (a ``pick_backend`` result)
    for callers that run the passes themselves; ``(None, backward_torch)`` for the torch and
    reference backends, which have no forward op (the backward in torch ops)."""
    if name == "ext":
        from . import ext_backend  # noqa: F401  (registers the ops' fake impls and autograd)

        return torch.ops.eofd_ext.forward, torch.ops.eofd_ext.backward
    if name == "triton":
        from .triton_backend import triton_backward, triton_forward

        return triton_forward, triton_backward
    from .torch_backend import backward_torch

    return None, backward_torch


def check_backend(name) -> str:
    """``name`` if it is ``"auto"`` or a backend, else a ValueError naming the argument."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {name!r}")
    return name


def pick_backend(name: str, device: torch.device) -> str:
    """The backend that ``name`` means for tensors on ``device``.

    ``"auto"``: CUDA tensors take triton, else ext, else torch; other tensors ext, else torch.
    """
    if check_backend(name) == "auto":
        order = ("triton", "ext", "torch") if device.type == "cuda" else ("ext", "torch")
        return next(n for n in order if missing_reason(n, device.type) is None)
    missing = missing_reason(name, device.type)
    if missing is not None:
        raise RuntimeError(f"backend={name!r} cannot run on {device} tensors: {missing}")
    return name


def resolve_backend(name: str, device: torch.device) -> LayerLossFn:
    """The per-layer loss function of backend ``name`` for tensors on ``device``."""
    return _load(pick_backend(name, device))
