"""The protocol every backend implements: one object per ``backend=`` value.

A backend computes, for a :class:`~eofd_kernels.inputs.LayerBatch` of L layers:

* ``forward``: the per-layer losses ``(L,)`` (float32, float64 for float64 inputs) and the
  per-dim statistics ``dim_stats`` ``(L, DIM_FIELDS, max d)`` float64 (``layout.D_*``) that
  its backward reads;
* ``backward``: dS per layer and, when asked, dT per layer, from ``dim_stats`` and the
  incoming grads ``(L,)`` (0 on masked rows);
* ``moments``: the per-dim moments ``(L, MOMENT_FIELDS, max d)`` float64 (``layout.M_*``) that
  split batches, given weights and the outlier report merge and finalize
  (:func:`eofd_kernels.moments.finalize`);
* ``differentiable_losses``: the losses as differentiable torch ops, for what the kernels
  cannot do (``torch.func`` transforms, a backward that builds a graph);
* optionally ``forward_and_grad``: the forward that also writes dS for grads given in
  advance (``offers_forward_and_grad`` says when).

Autograd is not a backend's business: :mod:`eofd_kernels.layer_losses` wires any backend into
it the same way. Adding a backend is one module with a subclass and one line in the registry
(``backends/__init__.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import formula
from ..inputs import LayerBatch
from ..moments import dim_stats_to_moments

__all__ = ["Backend"]


class Backend:
    """Base class: the protocol above, with defaults derived from ``forward``."""

    name: str = ""

    def forward(self, batch: LayerBatch, power: float, eps: float) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, grad_losses: Tensor, batch: LayerBatch, dim_stats: Tensor,
                 need_teacher_grad: bool, power: float) -> tuple[list[Tensor], list[Tensor]]:
        """``(dS per layer, dT per layer or [])`` for ``grad_losses`` ``(L,)`` (``power``: the
        forward's, for a backend that differentiates its formula again)."""
        raise NotImplementedError

    def moments(self, batch: LayerBatch) -> Tensor:
        """The moments behind the forward's statistics (at p = 0, so no weight is needed)."""
        return dim_stats_to_moments(self.forward(batch, 0.0, 0.0)[1])

    def teacher_stats(self, teachers: LayerBatch, power: float, eps: float) -> Tensor:
        """``dim_stats`` of the teachers alone (their squared errors are 0): what needs no
        student, like the fused projection's weights."""
        return self.forward(LayerBatch(teachers.teachers, teachers.teachers, teachers.masks),
                            power, eps)[1]

    def differentiable_losses(self, batch: LayerBatch, power: float, eps: float,
                              weights: list[Tensor] | None = None) -> Tensor:
        """Per-layer losses as differentiable torch ops (the torch formula by default)."""
        return formula.layer_losses(batch, power, eps, weights)

    def offers_forward_and_grad(self, batch: LayerBatch) -> bool:
        """Whether :meth:`forward_and_grad` can serve this call."""
        return False

    def forward_and_grad(self, batch: LayerBatch, power: float, eps: float,
                         grads: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``forward`` plus dS for the incoming ``grads`` ``(L,)`` given in advance."""
        raise NotImplementedError(f"backend {self.name!r} has no forward_and_grad")

    def __repr__(self) -> str:
        return f"<eofd_kernels backend {self.name!r}>"


def promote_layers(layers: list[Tensor]) -> list[Tensor]:
    """One dtype for all ``layers`` (the kernels read one dtype per side); a no-op when they
    agree."""
    dtype = layers[0].dtype
    if all(x.dtype == dtype for x in layers):
        return layers
    for x in layers[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in layers]


def kernel_sides(batch) -> tuple[list[Tensor], list[Tensor]]:
    """Students and teachers as the fused kernels read them: each side in its own dtype (they
    write dS in the student's, dT in the teacher's), the layers of one side in one common
    dtype (a copy only where they differ)."""
    return promote_layers(batch.students), promote_layers(batch.teachers)


def in_own_dtypes(grads: list[Tensor], layers: list[Tensor]) -> list[Tensor]:
    """Each layer's gradient in its layer's dtype: a no-op (no copy) unless its side was
    promoted."""
    return [d.to(x.dtype) for d, x in zip(grads, layers)]
