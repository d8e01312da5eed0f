"""Per-dim moments and the one float64 finalize written in Python.

A statistics pass reduces a layer's valid tokens to per-dim moments (``layout.M_*``: count,
pivot, pivot offset, M2, squared error); moments of disjoint token sets merge exactly (Chan's
formula on pivoted means), and :func:`finalize` turns them into the losses and the per-dim
statistics the backward reads (``layout.D_*``). The fused kernels finalize in their own code
(C++ ``csrc/cpu/finalize.h``, the Triton finalize kernel); everything that finalizes on the
host goes through here: the torch backend, split batches, given weights and the outlier
report. The degenerate cases follow one rule (docs/design.md, "Degenerate data"):

* a constant dim has sigma 0, weight ``0 ** p`` and a zero dT coefficient;
* a wholly constant layer at eps = 0 has sbar = 0, so every weight is 0 / 0 = NaN, as in the
  paper's code (at p = 0 the weights are ``NaN ** 0 = 1``: plain MSE, as there too);
* fewer than 2 valid tokens make sigma (and the loss) NaN, as in the paper's code; with given
  weights sigma is not needed and an empty layer contributes 0;
* a NaN or Inf in a valid teacher value makes its M2, hence sigma, sbar, every weight and the
  loss NaN: it is never mistaken for a constant dim;
* a part with no valid tokens changes nothing in a merge, whatever its other fields hold.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import layout

__all__ = ["dim_stats_to_moments", "finalize", "merge_moments"]


def merge_moments(parts: list[Tensor]) -> Tensor:
    """Merge ``(..., MOMENT_FIELDS, d)`` moments in list order; the pivot of the first
    non-empty part is kept, and an empty part (count 0) is skipped."""
    merged = parts[0]
    for part in parts[1:]:
        n_a, k_a, o_a, q_a, e_a = merged.unbind(-2)
        n_b, k_b, o_b, q_b, e_b = part.unbind(-2)
        n = n_a + n_b
        frac = n_b / torch.where(n > 0, n, 1.0)
        delta = (k_b - k_a) + (o_b - o_a)
        combined = torch.stack([n, k_a, o_a + delta * frac,
                                q_a + q_b + delta * delta * n_a * frac, e_a + e_b], dim=-2)
        a_empty, b_empty = (n_a == 0).unsqueeze(-2), (n_b == 0).unsqueeze(-2)
        merged = torch.where(b_empty, merged, torch.where(a_empty, part, combined))
    return merged


def dim_stats_to_moments(dim_stats: Tensor) -> Tensor:
    """The moments ``(L, MOMENT_FIELDS, max d)`` behind a forward's ``dim_stats`` (M2 from
    sigma; a single valid value has M2 = 0)."""
    count = dim_stats[:, layout.D_COUNT]
    sigma = dim_stats[:, layout.D_SIGMA]
    m2 = torch.where(count > 1, sigma.square() * (count - 1), 0.0)
    fields = {layout.M_COUNT: count, layout.M_PIVOT: dim_stats[:, layout.D_PIVOT],
              layout.M_PIVOT_OFFSET: dim_stats[:, layout.D_PIVOT_OFFSET], layout.M_M2: m2,
              layout.M_SQUARED_ERROR: dim_stats[:, layout.D_SQUARED_ERROR]}
    return torch.stack([fields[i] for i in range(layout.MOMENT_FIELDS)], dim=1)


def _teacher_coefficient(weight: Tensor, squared_error: Tensor, sigma: Tensor, n_valid: Tensor,
                         power: float, scale: Tensor) -> Tensor:
    """G_d / ((n' - 1) sigma_d), the dT coefficient through the weights (docs/design.md,
    "Gradients"); 0 for a constant dim, whose deviations are all 0."""
    d = sigma.shape[0]
    weighted = (weight * squared_error).sum()
    g_d = power / (n_valid * d) * (weight * squared_error / sigma - weighted / (d * scale))
    return torch.where(sigma == 0, 0.0, g_d / ((n_valid - 1) * sigma))


def finalize(moments: Tensor, dims: list[int], power: float, eps: float,
             weights: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``(losses (L,) float64, dim_stats (L, DIM_FIELDS, max d) float64)`` from moments.

    ``weights``: given ``w_d`` per layer (float64 ``(d,)``), used instead of the moments' own;
    they carry no teacher gradient (dT coefficient 0), and the loss divides by at least one
    token, so a layer without valid tokens contributes 0.
    """
    moments = moments.to(torch.float64)
    num_layers, _, max_d = moments.shape
    stats = moments.new_zeros(num_layers, layout.DIM_FIELDS, max_d)
    losses = []
    for i, d in enumerate(dims):
        count, pivot, offset, m2, squared_error = moments[i, :, :d].unbind(0)
        n_valid = count[0]
        sigma = (m2 / (n_valid - 1)).sqrt()
        if weights is None:
            scale = sigma.mean() + eps
            weight = (sigma / scale) ** power
            coef_t = _teacher_coefficient(weight, squared_error, sigma, n_valid, power, scale)
            divisor = n_valid * d
        else:
            weight = weights[i]
            coef_t = torch.zeros_like(weight)
            divisor = n_valid.clamp_min(1.0) * d
        weighted = (weight * squared_error).sum()
        for field, value in ((layout.D_COUNT, count), (layout.D_PIVOT, pivot),
                             (layout.D_PIVOT_OFFSET, offset), (layout.D_SIGMA, sigma),
                             (layout.D_SQUARED_ERROR, squared_error), (layout.D_WEIGHT, weight),
                             (layout.D_COEF_S, 2 * weight / divisor), (layout.D_COEF_T, coef_t)):
            stats[i, field, :d] = value
        losses.append(weighted / divisor)
    return torch.stack(losses), stats
