"""The shared case matrix through every entry point, on every backend, against float64.

Entry points: the module (several steps with changing incoming grads: the CPU forecast hits
and misses), ``process_group=`` of one rank, given ``weights=``, and the fused projection with
an identity projection (the functional ``eofd_loss`` is test_backends.py's). The reference
backend (the paper's code) runs the module path and refuses the others with a clear error.
float64 throughout: 1e-10 relative, summation-order rounding only (test_backends.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

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


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A gloo group of this process alone."""
    store = tmp_path_factory.mktemp("store") / "file"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


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
def test_process_group_of_one_rank(backend, device, case, one_rank_group):
    students, teachers, masks = build(case, torch.float64, device)
    ss, ts = _leaves(students, teachers)
    if backend == "reference":
        with pytest.raises(ValueError, match="backend='reference'.*no per-dim moments"):
            ek.eofd_loss(ss, ts, mask=masks, backend=backend, process_group=one_rank_group)
        return
    losses = ek.eofd_loss(ss, ts, mask=masks, reduction="none", backend=backend,
                          process_group=one_rank_group)
    grads = torch.autograd.grad(losses.sum(), ss + ts)
    want_losses, want_ds, want_dt = oracle(students, teachers, masks)
    _check(losses, grads, want_losses, want_ds + want_dt)


@backend_device
@case_param
def test_given_weights(backend, device, case):
    students, teachers, masks = build(case, torch.float64, device)
    weights = [w.to(device) for w in _whole_weights(teachers, masks)]
    ss, ts = _leaves(students, teachers)
    if backend == "reference":
        with pytest.raises(ValueError, match="backend='reference'"):
            ek.eofd_loss(ss, ts, mask=masks, backend=backend, weights=weights)
        return
    losses = ek.eofd_loss(ss, ts, mask=masks, reduction="none", backend=backend,
                          weights=weights)
    grads = torch.autograd.grad(losses.sum(), ss + ts)
    want_losses, want_grads = _given_weights_oracle(students, teachers, masks, weights)
    _check(losses, grads, want_losses, want_grads)
    # The same weights the call would compute itself: the plain loss, the same dS.
    plain = oracle(students, teachers, masks)
    _check(losses, grads[:len(ss)], plain[0], plain[1])


@backend_device
@case_param
def test_projected_loss_with_identity_projection(backend, device, case):
    students, teachers, masks = build(case, torch.float64, device)
    ss, ts = _leaves(students, teachers)
    eyes = [torch.eye(t.shape[-1], dtype=torch.float64, device=device).requires_grad_()
            for t in teachers]
    if backend == "reference":
        with pytest.raises(ValueError, match="backend='reference'.*fused projection"):
            ek.eofd_projected_loss(ss, eyes, None, ts, mask=masks, backend=backend)
        return
    losses = ek.eofd_projected_loss(ss, eyes, None, ts, mask=masks, reduction="none",
                                    backend=backend, chunk_rows=7)
    grads = torch.autograd.grad(losses.sum(), ss + ts + eyes)
    want_losses, want_ds, want_dt = oracle(students, teachers, masks)
    # dW of an identity projection: sum over valid rows of dS_r x_r^T.
    want_dw = [torch.einsum("nd,ne->de", g.reshape(-1, g.shape[-1]),
                            s.double().reshape(-1, s.shape[-1])) for g, s in zip(want_ds, students)]
    _check(losses, grads, want_losses, want_ds + want_dt + want_dw)
