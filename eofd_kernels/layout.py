"""Memory layouts shared by the Triton kernels, the compiled extension and the op glue.

Mirrors ``csrc/include/eofd_params.h`` and ``chunk_policy.h``; a test checks that they agree.
"""

from torch import Tensor

# Per-dim moments of some tokens (one layer: (MOMENT_FIELDS, d)), before a finalize: the GPU
# kernels' chunk partials and the split-batch summaries. PIVOT_OFFSET is mean - pivot, the
# pivot being one actual valid value (docs/design.md, "Pivoted moments"); SQUARED_ERROR is
# E_d = sum over valid tokens of (S - T)^2.
M_COUNT, M_PIVOT, M_PIVOT_OFFSET, M_M2, M_SQUARED_ERROR = range(5)
MOMENT_FIELDS = 5

# Per-dim statistics the forward returns and the backward reads: (L, DIM_FIELDS, max d) fp64.
# Dims past a layer's own d are zero; PIVOT_OFFSET and SQUARED_ERROR as in the moments.
D_COUNT, D_PIVOT, D_PIVOT_OFFSET, D_SIGMA, D_SQUARED_ERROR, D_WEIGHT, D_COEF_S, D_COEF_T = range(8)
DIM_FIELDS = 8

# The most token rows one chunk's fp32 partials may hold (kMaxChunkRows, chunk_policy.h).
MAX_CHUNK_ROWS = 1024


def as_rows(x: Tensor) -> Tensor:
    """``x`` ``(..., d)`` as ``(tokens, d)``: a view, or a copy when its leading dims have
    strides that no single row stride describes (a transposed ``(N, B, d)``, say)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
