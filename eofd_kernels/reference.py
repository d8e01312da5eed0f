"""The paper's EOFD loss (Zhao et al., NAACL 2025, Appendix I, Figure 12), kept as printed.

It is the oracle every backend is tested against, so it stays a line-by-line transcription with
one fix: the printed code takes ``teacher.std(dim=(2, 1))``, which contradicts its own shape
comment ``# of shape (d_t)`` (the std over dims (2, 1) has shape (B,)) and then broadcasts the
weights along the wrong axis. The evident intent, a per-hidden-dimension std over every token,
is ``std`` over all leading dims, i.e. ``dim=(0, 1)`` for ``(B, N, d)`` inputs.
"""

import torch

from .layout import as_rows

__all__ = ["calculate_weight", "eofd_loss_reference", "masked_reference_losses"]


def calculate_weight(teacher: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """Per-dimension weights ``(std_d / mean_d std_d) ** power`` broadcast to ``teacher.shape``.

    teacher: ``(..., d)``; returns ``(..., d)``, differentiable with respect to ``teacher``.
    """
    token_dims = tuple(range(teacher.dim() - 1))
    std_hidden = teacher.std(dim=token_dims)  # (d,) -- the paper prints dim=(2, 1), see above
    mean_std = std_hidden.mean()
    std_scaled = (std_hidden / mean_std) ** power  # power == 0 gives plain MSE (0 ** 0 == 1)
    return std_scaled.expand(teacher.shape)


def eofd_loss_reference(
    student: torch.Tensor, teacher: torch.Tensor, power: float = 0.5
) -> torch.Tensor:
    """EOFD loss of one layer: ``mean(weights * (student - teacher) ** 2)``.

    student, teacher: ``(..., d)`` of the same shape (the student already projected to d).
    Returns a 0-dim tensor in the inputs' dtype.
    """
    weights = calculate_weight(teacher, power=power)
    squared_diff = (student - teacher) ** 2
    return (squared_diff * weights).mean()


def masked_reference_losses(students, teachers, masks, power: float = 0.5) -> torch.Tensor:
    """Per-layer losses ``(L,)`` of the paper's code over each layer's valid tokens.

    students, teachers: ``[(..., d_l)]``; masks: per layer None, or a bool/0-1 tensor of the
    layer's leading shape or of its flattened tokens (the paper's code knows no masks: the
    valid tokens are selected first). Differentiable; the losses' common dtype.
    """
    losses = []
    for s, t, m in zip(students, teachers, masks):
        if m is not None:
            keep = m.reshape(-1).to(torch.bool)
            s, t = as_rows(s)[keep], as_rows(t)[keep]
        losses.append(eofd_loss_reference(s, t, power))
    dtype = losses[0].dtype
    for loss in losses[1:]:
        dtype = torch.promote_types(dtype, loss.dtype)
    return torch.stack([loss.to(dtype) for loss in losses])
