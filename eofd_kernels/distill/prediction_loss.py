"""``L_pred``: the soft cross-entropy between a teacher's and a student's logits.

``mean_rows(-softmax(z_t / tau) . log_softmax(z_s / tau))`` over the last dim (TinyBERT's
prediction-layer loss, averaged over rows: examples, or valid tokens for per-token logits).

Over an LM vocabulary the logits are the largest tensors of a step (GPT-2: 50,257 per token),
and the plain formula (:func:`soft_cross_entropy_eager`) keeps several row-by-vocabulary
tensors alive for its backward: the student's and the teacher's float32 copies, both
distributions, their product. :class:`_ChunkedSoftCrossEntropy` instead walks the rows in
chunks and, in the forward, writes the gradient with respect to the student's logits,

    d L / d z_s[r] = w_r (softmax(z_s[r] / tau) - q_r) / tau,   sum_c q_rc = 1,

(``w_r``: 1 / rows, or the row's mask over the valid-row count) into one preallocated tensor in
the student's dtype; its backward scales that tensor in place by the incoming gradient. A step holds
one row-by-vocabulary tensor beyond the logits and reads the logits once; the chunk's
temporaries stay small (:func:`_rows_per_chunk`). docs/performance.md, "Whole training step",
has what this does to a GPT-2 step.

Double backward follows the loss's one rule: a second derivative (``create_graph=True``), or
a second backward through a graph kept with ``retain_graph=True`` (the first scaled the
saved gradient in place), recomputes with the plain formula from the saved inputs. A teacher
whose logits require grad takes the plain formula from the start. Masked rows read as zeros
in both: a NaN there reaches no gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["TopKLogits", "soft_cross_entropy", "soft_cross_entropy_eager"]


class TopKLogits(NamedTuple):
    """A teacher's ``k`` largest logits per row, as a teacher cache stores them for LM
    vocabularies: values ``(..., k)`` and their class indices ``(..., k)`` (int64)."""

    values: torch.Tensor
    indices: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """The rows' shape ``(...)`` plus ``k``, so mask checks see the leading shape."""
        return self.values.shape


def _check(student_logits, teacher_logits, temperature, mask) -> None:
    top_k = isinstance(teacher_logits, TopKLogits)
    same_rows = (student_logits.shape[:-1] == teacher_logits.shape[:-1] if top_k
                 else student_logits.shape == teacher_logits.shape)
    if not same_rows:
        what = "rows of the teacher's top-k shape" if top_k else "the teacher's shape"
        raise ValueError(f"student_logits: expected {what} {tuple(teacher_logits.shape)}, "
                         f"got {tuple(student_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    rows = tuple(student_logits.shape[:-1])
    if mask is not None and tuple(mask.shape) != rows:
        raise ValueError(f"mask: expected the logits' leading shape {rows}, "
                         f"got {tuple(mask.shape)}")


def _accumulation_dtype(student_logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(student_logits.dtype, torch.float32)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor | TopKLogits,
                       *, temperature: float = 1.0,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_rows(-softmax(z_t / tau) . log_softmax(z_s / tau))`` over the last dim.

    student_logits, teacher_logits: ``(..., C)``; or teacher_logits a :class:`TopKLogits`,
    whose distribution is the softmax over its k values (zero elsewhere: the teacher's top-k
    distribution renormalised), so only the student's log-probabilities at those k classes
    count. mask: None or the leading shape ``(...)`` (bool or 0/1) selecting the rows that
    count (no valid row: NaN). Returns a float32 (float64) 0-dim tensor.
    """
    _check(student_logits, teacher_logits, temperature, mask)
    top_k = isinstance(teacher_logits, TopKLogits)
    values = teacher_logits.values if top_k else teacher_logits
    if torch.is_grad_enabled() and values.requires_grad:
        return soft_cross_entropy_eager(student_logits, teacher_logits,
                                        temperature=temperature, mask=mask)
    count = math.prod(student_logits.shape[:-1])  # not -1: C may be 0

    def as_rows(x):
        return x.reshape(count, x.shape[-1])

    keep = None if mask is None else mask.reshape(count).to(torch.bool)
    # Evaluation (no grad, or a student without grad) forms no gradient.
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedSoftCrossEntropy.apply(
        as_rows(student_logits), as_rows(values),
        as_rows(teacher_logits.indices) if top_k else None, keep, float(temperature), want_grad)


def soft_cross_entropy_eager(student_logits: torch.Tensor,
                             teacher_logits: torch.Tensor | TopKLogits, *,
                             temperature: float = 1.0,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
    """The plain formula of :func:`soft_cross_entropy` (what a user writes; differentiable
    to any order and in the teacher's logits)."""
    _check(student_logits, teacher_logits, temperature, mask)
    top_k = isinstance(teacher_logits, TopKLogits)
    return _plain_formula(student_logits, teacher_logits.values if top_k else teacher_logits,
                          teacher_logits.indices if top_k else None,
                          None if mask is None else mask.to(torch.bool), temperature)


def _plain_formula(student, values, indices, keep, temperature: float) -> torch.Tensor:
    """student ``(..., C)``; values ``(..., C)`` or top-k ``(..., k)`` with ``indices``; keep
    the leading shape (bool) or None."""
    if keep is not None:  # masked rows read as zeros: a NaN there reaches no gradient
        student = student.where(keep.unsqueeze(-1), 0.0)
        values = values.where(keep.unsqueeze(-1), 0.0)
    acc = _accumulation_dtype(student)
    log_p = torch.log_softmax(student.to(acc) / temperature, dim=-1)
    if indices is not None:
        log_p = log_p.gather(-1, indices)
    q = torch.softmax(values.to(acc) / temperature, dim=-1)
    per_row = -(q * log_p).sum(-1)
    if keep is None:
        return per_row.mean()
    return per_row.where(keep, 0.0).sum() / keep.sum()


def _rows_per_chunk(rows: torch.Tensor) -> int:
    """Rows a chunk takes. CPU: about 2**18 values per temporary (1 MiB of float32), so a
    chunk's few temporaries stay in L2 between their passes (the sweep behind this choice is
    in docs/performance.md, "Whole training step").
    GPU: 2**25 values, because each chunk costs a handful of launches and larger chunks
    amortise them while staying a small share of memory beside the logits."""
    budget = 2**25 if rows.is_cuda else 2**18
    return max(1, budget // max(1, rows.shape[-1]))


class _ChunkedSoftCrossEntropy(torch.autograd.Function):
    """rows ``(R, C)``; teacher ``(R, C)`` or top-k values ``(R, k)`` with ``indices``;
    keep ``(R,)`` bool or None; want_grad: form dL/drows (in the forward); returns the
    0-dim loss."""

    @staticmethod
    def forward(ctx, rows, teacher, indices, keep, temperature, want_grad):
        acc = _accumulation_dtype(rows)
        # The valid-row count stays a tensor: nothing is read back to the host.
        count = rows.shape[0] if keep is None else keep.sum()
        # Each row's share of the mean, times the 1/tau of the softmax's derivative (no rows:
        # no gradient to scale, and the mean below is NaN).
        grad_scale = (1.0 / (max(rows.shape[0], 1) * temperature) if keep is None
                      else (keep.to(acc) / (count * temperature)).unsqueeze(-1))
        per_row = torch.empty(rows.shape[0], dtype=acc, device=rows.device)
        grad = torch.empty_like(rows) if want_grad else None
        step = _rows_per_chunk(rows)
        for start in range(0, rows.shape[0], step):
            span = slice(start, start + step)
            log_p = torch.log_softmax(rows[span].to(acc) / temperature, dim=-1)
            q = torch.softmax(teacher[span].to(acc) / temperature, dim=-1)
            picked = log_p if indices is None else log_p.gather(-1, indices[span])
            per_row[span] = -(q * picked).sum(-1)
            if not want_grad:
                continue
            g = log_p.exp_()  # the student's softmax; log_p is not needed any more
            if indices is None:
                g.sub_(q)
            else:
                g.scatter_add_(-1, indices[span], q.neg_())
            g.mul_(grad_scale if keep is None else grad_scale[span])
            if keep is not None:  # a masked row contributes 0, even where its logits are NaN
                g.masked_fill_(~keep[span].unsqueeze(-1), 0.0)
            grad[span] = g
        # The gradient is an intermediate, kept on ctx (its backward scales it in place). The
        # inputs are saved (references, no copies): a second derivative, or a second backward
        # through a retained graph, recomputes with the plain formula.
        ctx.save_for_backward(rows, teacher, indices, keep)
        ctx.grad, ctx.temperature, ctx.scaled = grad, temperature, False
        if keep is None:
            return per_row.mean()
        return per_row.where(keep, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled() or ctx.scaled:
            rows, teacher, indices, keep = ctx.saved_tensors
            # create_graph=True needs a gradient with a graph of its own; a retained graph's
            # second backward finds the saved gradient already scaled by the first.
            create_graph = torch.is_grad_enabled()
            with torch.enable_grad():
                loss = _plain_formula(rows, teacher, indices, keep, ctx.temperature)
                (recomputed,) = torch.autograd.grad(loss, rows, grad_loss,
                                                    create_graph=create_graph)
            return recomputed, None, None, None, None, None
        if torch.compiler.is_compiling():
            # A traced backward is traced once, its branch on ctx.scaled with it: out of place
            # (AOT functionalises this anyway, at no extra memory).
            return ctx.grad * grad_loss, None, None, None, None, None
        # In place: a fresh logits-sized tensor per step is what this path avoids. The node
        # lets go of it: a later backward recomputes.
        grad, ctx.grad, ctx.scaled = ctx.grad, None, True
        return grad.mul_(grad_loss), None, None, None, None, None
