"""Learned maps ``W_h`` from the student's hidden width to the teacher's (TinyBERT's ``H^S W_h``).

The projections are trained with the student and belong to it: :func:`attach_projection`
registers them as a submodule of the student, so ``student.parameters()`` (the optimiser) and
``student.state_dict()`` / ``save_pretrained`` (the checkpoint) include them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["HiddenProjection", "attach_projection"]


class HiddenProjection(nn.Module):
    """``num_layers`` linear maps ``student_width -> teacher_width``, or one shared by all.

    forward(hidden): a sequence of ``num_layers`` tensors ``(..., student_width)`` -> a list of
    ``(..., teacher_width)`` tensors, the i-th through map i (or the shared map).
    """

    def __init__(self, student_width: int, teacher_width: int, num_layers: int, *,
                 shared: bool = False, bias: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers: expected >= 1, got {num_layers}")
        self.num_layers, self.shared = num_layers, shared
        count = 1 if shared else num_layers
        self.maps = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=bias)
                                  for _ in range(count))

    def layer_maps(self) -> list[nn.Linear]:
        """The map of each of the ``num_layers`` layers (the same one for all when shared)."""
        return [self.maps[0]] * self.num_layers if self.shared else list(self.maps)

    def forward(self, hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(hidden) != self.num_layers:
            raise ValueError(f"hidden: expected {self.num_layers} hidden states, got "
                             f"{len(hidden)}")
        return [proj(h) for proj, h in zip(self.layer_maps(), hidden)]


def attach_projection(student: nn.Module, projection: HiddenProjection,
                      name: str = "eofd_projection") -> HiddenProjection:
    """Register ``projection`` on ``student`` under ``name`` (trained and saved with it)."""
    if hasattr(student, name) and getattr(student, name) is not projection:
        raise ValueError(f"name: the student already has an attribute {name!r}")
    student.add_module(name, projection)
    return projection
