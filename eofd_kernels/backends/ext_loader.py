"""Finds the compiled extension (``backend="ext"``); the package works without it.

``EOFD_JIT=1`` builds and loads csrc/ through ``torch.utils.cpp_extension.load`` instead of
the installed ``eofd_kernels._C`` (development: kernel edits need no reinstall).
"""

from __future__ import annotations

import functools
import os

__all__ = ["load_error"]


@functools.cache
def load_error() -> str | None:
    """Loads the extension (registering the ``eofd_ext`` ops); the error, if any."""
    if os.environ.get("EOFD_JIT", "0") == "1":
        from ..ext_build import jit_load

        try:
            jit_load()
        except (RuntimeError, OSError, SystemExit) as error:
            return f"EOFD_JIT=1: the JIT build of csrc/ failed: {error}"
        return None
    try:
        from .. import _C  # noqa: F401
    except ImportError as error:
        return (f"the compiled extension eofd_kernels._C is not built ({error}); build it with "
                "`pip install --no-build-isolation -e .`")
    return None
