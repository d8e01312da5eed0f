"""Whether each backend can run on a device, and why not: a leaf module (no package imports at
load time), so the registry and the Triton launcher can both use it without an import circle."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["interpreting", "missing_reason"]


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _no_cuda_device(device_type: str) -> str | None:
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    return None


def _triton_missing(device_type: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed"
    if device_type == "cuda":
        return _no_cuda_device(device_type)
    if device_type == "cpu":
        if interpreting():
            return None
        return ("Triton needs CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                "importing eofd_kernels (the Triton interpreter: slow, for tests)")
    return f"Triton does not support {device_type} tensors"


def _ext_missing(device_type: str) -> str | None:
    from .ext_loader import load_error

    error = load_error()
    if error is not None:
        return error
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key("eofd_ext::forward",
                                                                        key):
        return f"the extension was built without {device_type} kernels"
    return _no_cuda_device(device_type)


_MISSING = {
    "triton": _triton_missing,
    "ext": _ext_missing,
    "torch": lambda device_type: None,
    "reference": lambda device_type: None,
}


@functools.cache  # fixed for the process, and asking the dispatcher on every call adds up
def _missing_cached(name: str, device_type: str) -> str | None:
    return _MISSING[name](device_type)


@torch.compiler.assume_constant_result
def missing_reason(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot run on ``device_type`` tensors, or None when it can; a
    constant to ``torch.compile``."""
    return _missing_cached(name, device_type)
