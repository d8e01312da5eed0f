"""The case matrix every backend is checked on, and the float64 oracle it is checked against.

A case builds float64 layers (students, teachers, masks); tests cast them to the dtype under
test, so the oracle sees exactly the values the backend sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from eofd_kernels.reference import masked_reference_losses
from eofd_kernels.synthetic import student_near, teacher_states


@dataclass
class Case:
    name: str
    build: Callable[[torch.Generator], tuple[list, list, list]]


def _rand(g, *shape, scale=None):
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if scale is not None:
        x = x * scale
    return x


def _pair(g, *shape):
    """A teacher with per-dim spreads over two decades (no extra outliers: cases plant their
    own) and a student near it, in float64."""
    t = teacher_states(shape, g, log_spread=4.6, outlier_every=0, dtype=torch.float64)
    return student_near(t, g, noise=0.3), t


def _mask(g, *lead, keep=0.7):
    m = torch.rand(*lead, generator=g) < keep
    m.view(-1)[:2] = True  # at least two valid tokens
    return m


def _single(g):
    s, t = _pair(g, 2, 8, 40)
    return [s], [t], [None]


def _multi(g):
    pairs = [_pair(g, 2, 6, 32) for _ in range(3)]
    return [p[0] for p in pairs], [p[1] for p in pairs], [None] * 3


def _masked(g):
    s, t = _pair(g, 3, 7, 24)
    m = _mask(g, 3, 7)
    m[1, 4:] = False  # a padded tail
    t[~m] = 1e6  # padding may hold anything; it must not leak into the stats
    return [s], [t], [m]


def _mixed(g):
    shapes = [(2, 9, 20), (1, 70, 33), (3, 5, 64)]
    pairs = [_pair(g, *sh) for sh in shapes]
    masks = [_mask(g, 2, 9), None, _mask(g, 3, 5)]
    return [p[0] for p in pairs], [p[1] for p in pairs], masks


def _tiny(g):
    s, t = _pair(g, 1, 2, 5)
    s3, t3 = _pair(g, 3, 1, 7)
    return [s, s3], [t, t3], [None, None]


def _noncontiguous(g):
    s, t = _pair(g, 6, 3, 48)
    s_t = s.transpose(0, 1)  # (3, 6, 48) view: leading dims do not flatten
    t_cols = torch.cat([t, t], dim=-1)[..., ::2]  # (6, 3, 48) view with column stride 2
    return [s_t, s], [t.transpose(0, 1).contiguous(), t_cols], [None, None]


def _outliers(g):
    """A few dims with |mean| 1e4 and std 0.1: E[x^2] - E[x]^2 loses every digit there."""
    s, t = _pair(g, 4, 64, 32)
    t[..., [3, 17]] = 1e4 + 0.1 * _rand(g, 4, 64, 2)
    t[..., 25] = -2e4 + 0.1 * _rand(g, 4, 64)
    s = t + 0.05 * _rand(g, 4, 64, 32)
    return [s], [t], [None]


def _long(g):
    """More rows than one tile, so tiles and chunks are merged."""
    s, t = _pair(g, 2, 150, 40)
    t[..., 5] += 3e3
    return [s], [t], [_mask(g, 2, 150, keep=0.9)]


def _wide(g):
    """Rows wider than the kernels' dim blocks with a ragged end (d = 150), and more rows than
    one 256-row chunk of the CPU kernels."""
    s, t = _pair(g, 3, 100, 150)
    return [s], [t], [_mask(g, 3, 100, keep=0.8)]


CASES = [Case(f.__name__.lstrip("_"), f) for f in
         (_single, _multi, _masked, _mixed, _tiny, _noncontiguous, _outliers, _long, _wide)]


def build(case: Case, dtype: torch.dtype, device, seed: int = 0):
    """The case's layers in ``dtype`` on ``device`` (views kept as views)."""
    g = torch.Generator().manual_seed(seed)
    students, teachers, masks = case.build(g)

    def move(x):
        return None if x is None else x.to(device=device, dtype=x.dtype if x.dtype == torch.bool
                                          else dtype)

    return ([move(x) for x in students], [move(x) for x in teachers], [move(m) for m in masks])


def _eps_loss(s, t, m, power, eps):
    """docs/design.md's loss with eps > 0, transcribed in float64 (the paper has no eps)."""
    if m is not None:
        s, t = s[m.reshape(s.shape[:-1])], t[m.reshape(t.shape[:-1])]
    t2 = t.reshape(-1, t.shape[-1])
    mu = t2.sum(0) / t2.shape[0]
    sigma = (((t2 - mu) ** 2).sum(0) / (t2.shape[0] - 1)).sqrt()
    w = (sigma / (sigma.mean() + eps)) ** power
    return (w * ((s - t) ** 2).reshape(-1, t.shape[-1]).sum(0)).sum() / t.numel()


def oracle(students, teachers, masks, power=0.5, eps=0.0, grad_outputs=None):
    """Per-layer losses and (dS, dT) in float64 through autograd of the paper's code.

    eps = 0 runs the reference itself; eps > 0 an explicit float64 transcription of
    docs/design.md, "The math".
    """
    ss = [s.detach().double().requires_grad_() for s in students]
    ts = [t.detach().double().requires_grad_() for t in teachers]
    if eps == 0.0:
        losses = masked_reference_losses(ss, ts, masks, power)
    else:
        losses = torch.stack([_eps_loss(s, t, m, power, eps) for s, t, m in zip(ss, ts, masks)])
    go = torch.ones_like(losses) if grad_outputs is None else grad_outputs.double()
    grads = torch.autograd.grad(losses, ss + ts, go)
    return losses.detach(), list(grads[:len(ss)]), list(grads[len(ss):])
