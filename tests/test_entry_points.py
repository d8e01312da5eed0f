"""The shared case matrix through every entry point, on every backend, against float64.

Entry points: the module (several steps with changing incoming grads: the CPU forecast hits
and misses), ``process_group=`` of one rank, given ``weights=``, and the fused projection with
an identity projection (the functional ``eofd_loss`` is test_backends.py's). The reference
backend (the paper's code) runs the module path and refuses the others with a clear error.
float64 throughout: 1e-10 relative, summation-order rounding only (test_backends.py).
"""

from __future__ import annotations

import functools

import pytest
import torch

import eofd_kernels as ek
from eofd_kernels.reference import calculate_weight

from .cases import CASES, build, oracle
from .helpers import BACKEND_DEVICES, BACKEND_IDS, rel_err

TOL = 1e-10
ALL = BACKEND_DEVICES + [("reference", "cpu")]
ALL_IDS = BACKEND_IDS + ["reference-cpu"]
backend_device = pytest.mark.parametrize(("backend", "device"), ALL, ids=ALL_IDS)
case_param = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


def _leaves(students, teachers, teacher_grad=True):
    return ([s.detach().requires_grad_() for s in students],
            [t.detach().requires_grad_(teacher_grad) for t in teachers])


def _check(losses, grads, want_losses, want_grads):
    assert rel_err(losses, want_losses) <= TOL, (losses, want_losses)
    for i, (g, w) in enumerate(zip(grads, want_grads, strict=True)):
        assert rel_err(g, w) <= TOL, f"grad {i}: {rel_err(g, w):.3g}"


@backend_device
@case_param
def test_module_over_steps(backend, device, case):
    """One module, four steps, incoming grads 1, 1, g, g: the forecast's hit and miss both
    give the oracle's dS."""
    students, teachers, masks = build(case, torch.float64, device)
    module = ek.EOFDLoss(reduction="none", backend=backend)
    num_layers = len(students)
    scaled = torch.linspace(0.5, -1.5, num_layers, dtype=torch.float64)
    for go in (torch.ones(num_layers, dtype=torch.float64),) * 2 + (scaled,) * 2:
        ss, ts = _leaves(students, teachers, teacher_grad=False)
        losses = module(ss, ts, mask=masks)
        grads = torch.autograd.grad(losses, ss, go.to(losses.device))
        want_losses, want_ds, _ = oracle(students, teachers, masks, grad_outputs=go)
        _check(losses, grads, want_losses, want_ds)


def _refused_by_reference(backend, call, match) -> bool:
    """The reference refuses what the paper's code does not have, with a clear error."""
    if backend != "reference":
        return False
    with pytest.raises(ValueError, match=match):
        call()
    return True


def _given_weights_oracle(students, teachers, masks, weights):
    """float64 losses and (dS, dT) with the weights held fixed (no gradient through them)."""
    ss, ts = _leaves([s.double() for s in students], [t.double() for t in teachers])
    losses = []
    for s, t, m, w in zip(ss, ts, masks, weights):
        if m is not None:
            keep = m.reshape(-1)
            s, t = s.reshape(-1, s.shape[-1])[keep], t.reshape(-1, t.shape[-1])[keep]
        losses.append((w * (s - t) ** 2).mean())
    losses = torch.stack(losses)
    grads = torch.autograd.grad(losses, ss + ts, torch.ones_like(losses))
    return losses.detach(), list(grads)


def _whole_weights(teachers, masks):
    """The paper's weights of each layer over its valid tokens, float64, as constants."""
    weights = []
    for t, m in zip(teachers, masks):
        rows = t.detach().double().reshape(-1, t.shape[-1])
        rows = rows if m is None else rows[m.reshape(-1)]
        weights.append(calculate_weight(rows)[0])
    return weights


@backend_device
@case_param
@pytest.mark.parametrize("entry", ["process_group", "weights"])
def test_merged_statistics(backend, device, case, entry, one_rank_group):
    """``process_group=`` of one rank: the plain oracle. Given ``weights=`` (the paper's own
    weights of each layer, as constants): the oracle with the weights held fixed, and the
    plain oracle's losses and dS (the same weights, only dT differs)."""
    students, teachers, masks = build(case, torch.float64, device)
    ss, ts = _leaves(students, teachers)
    if entry == "process_group":
        kwargs = dict(process_group=one_rank_group)
        refusal = "backend='reference'.*no per-dim moments"
    else:
        kwargs = dict(weights=[w.to(device) for w in _whole_weights(teachers, masks)])
        refusal = "backend='reference'.*no per-dim moments"
    call = functools.partial(ek.eofd_loss, ss, ts, mask=masks, reduction="none",
                             backend=backend, **kwargs)
    if _refused_by_reference(backend, call, refusal):
        return
    losses = call()
    grads = torch.autograd.grad(losses.sum(), ss + ts)
    plain_losses, plain_ds, plain_dt = oracle(students, teachers, masks)
    if entry == "process_group":
        _check(losses, grads, plain_losses, plain_ds + plain_dt)
    else:
        _check(losses, grads, *_given_weights_oracle(students, teachers, masks,
                                                     kwargs["weights"]))
        _check(losses, grads[:len(ss)], plain_losses, plain_ds)


@backend_device
@case_param
def test_projected_loss_with_identity_projection(backend, device, case):
    students, teachers, masks = build(case, torch.float64, device)
    ss, ts = _leaves(students, teachers)
    eyes = [torch.eye(t.shape[-1], dtype=torch.float64, device=device).requires_grad_()
            for t in teachers]
    call = functools.partial(ek.eofd_projected_loss, ss, eyes, None, ts, mask=masks,
                             reduction="none", backend=backend, chunk_rows=7)
    if _refused_by_reference(backend, call, "backend='reference'.*fused projection"):
        return
    losses = call()
    grads = torch.autograd.grad(losses.sum(), ss + ts + eyes)
    want_losses, want_ds, want_dt = oracle(students, teachers, masks)
    # dW of an identity projection: sum over valid rows of dS_r x_r^T.
    want_dw = [torch.einsum("nd,ne->de", g.reshape(-1, g.shape[-1]),
                            s.double().reshape(-1, s.shape[-1])) for g, s in zip(want_ds, students)]
    _check(losses, grads, want_losses, want_ds + want_dt + want_dw)
