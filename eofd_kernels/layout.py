"""Memory layouts shared by the Triton kernels, the compiled extension and the op glue.

Mirrors ``csrc/include/eofd_params.h``; a test checks that the two agree.
"""

# Per-dim statistics the forward returns and the backward reads: (L, DIM_FIELDS, max d) fp64.
# Dims past a layer's own d are zero.
D_COUNT, D_PIVOT, D_MEAN, D_SIGMA, D_SQERR, D_WEIGHT, D_COEF_S, D_COEF_T = range(8)
DIM_FIELDS = 8
