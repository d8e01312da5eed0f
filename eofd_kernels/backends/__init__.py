"""The backends, one module per ``backend=`` value, and the one registry that maps names to
backend objects (:class:`~eofd_kernels.backends.base.Backend`).

    torch_backend      plain PyTorch ops (always available)
    reference_backend  the paper's code per layer (the oracle)
    triton_backend     the fused Triton kernels (triton_kernels) as torch.library custom ops
    ext_backend        the compiled extension's ops (csrc/), loaded by ext_loader

Adding a backend: a module with a ``Backend`` subclass, a line in ``_REGISTRY`` and, when it
needs more than torch, a line in ``availability._MISSING``.
"""

from __future__ import annotations

import importlib

import torch

from .availability import missing_reason
from .base import Backend

__all__ = ["BACKENDS", "Backend", "available_backends", "check_backend", "get_backend",
           "pick_backend"]

# name -> (module, class), best first: "auto" takes the first that can run on the device.
_REGISTRY = {
    "triton": ("triton_backend", "TritonBackend"),
    "ext": ("ext_backend", "ExtBackend"),
    "torch": ("torch_backend", "TorchBackend"),
    "reference": ("reference_backend", "ReferenceBackend"),
}
BACKENDS = tuple(_REGISTRY)
_AUTO_EXCLUDED = ("reference",)  # the oracle is never picked for the user
_AUTO_CPU_EXCLUDED = ("triton",)  # Triton's CPU interpreter is a test tool


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
        excluded = _AUTO_EXCLUDED + (() if device.type == "cuda" else _AUTO_CPU_EXCLUDED)
        return next(n for n in BACKENDS
                    if n not in excluded and missing_reason(n, device.type) is None)
    missing = missing_reason(name, device.type)
    if missing is not None:
        raise RuntimeError(f"backend={name!r} cannot run on {device} tensors: {missing}")
    return name


_INSTANCES: dict[str, Backend] = {}


@torch.compiler.assume_constant_result  # runs eagerly under torch.compile: the import is
def _loaded(name: str) -> str:          # not traced, and the name is a constant of the graph
    """``name``, after importing its module and keeping its object."""
    if name not in _INSTANCES:
        module, cls = _REGISTRY[name]
        _INSTANCES[name] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
    return name


def get_backend(name: str, device: torch.device) -> Backend:
    """The backend object ``name`` means for tensors on ``device`` (stateless, shared)."""
    return _INSTANCES[_loaded(pick_backend(name, device))]
