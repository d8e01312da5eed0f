"""The CPU extension's buffer cache: what it holds, its limit, and a call that empties it.

Training asks for the same gradient sizes every step, so the CPU ops keep freed dS/dT and
workspace buffers (already faulted in) for reuse, up to a limit (1 GiB by default): the CPU
analogue of ``torch.cuda.empty_cache`` and the caching allocator (csrc/cpu/output_pool.h).
Without the compiled extension there is no cache: the calls report zeros and do nothing.
"""

from __future__ import annotations

import torch

from .backends.ext_loader import load_error

__all__ = ["cpu_cache_info", "empty_cpu_cache", "set_cpu_cache_limit"]


def _ops():
    return None if load_error() is not None else torch.ops.eofd_ext


def empty_cpu_cache() -> int:
    """Frees every cached buffer (tensors still in use keep theirs); returns the bytes freed."""
    ops = _ops()
    return 0 if ops is None else int(ops.empty_cpu_cache())


def cpu_cache_info() -> dict[str, int]:
    """``{"cached_bytes": ..., "limit_bytes": ...}`` of the cache now."""
    ops = _ops()
    cached, limit = (0, 0) if ops is None else ops.cpu_cache_info()
    return {"cached_bytes": int(cached), "limit_bytes": int(limit)}


def set_cpu_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` cached (0: no caching). Buffers above a lowered limit are freed
    as they come back; call :func:`empty_cpu_cache` to free the cache at once."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes < 2 ** 63:
        raise ValueError(f"nbytes: expected an int in [0, 2**63), got {nbytes!r}")
    ops = _ops()
    if ops is not None:
        ops.set_cpu_cache_limit(nbytes)
