"""Degenerate data follows one rule on every backend and every entry point (docs/design.md,
"Degenerate data"; eofd_kernels/moments.py):

* a wholly constant teacher layer at eps = 0 has sbar = 0: its weights are 0 / 0 = NaN, so its
  loss and its gradients are NaN, as in the paper's code; with eps > 0 every weight is 0;
* a NaN or Inf in a valid teacher value shows in the loss, the weights and the gradients;
* a layer, micro-batch or shard without valid tokens: NaN like the paper's code on its own
  (n' < 2), but nothing at all with given weights or inside a split batch;
* NaN in padding never matters, also in the fused projection's dW;
* given weights that require grad get their gradient.

Values are float64; equalities 1e-10 relative (summation order only, test_backends.py).
"""

from __future__ import annotations

import math

import pytest
import torch

import eofd_kernels as ek

from .helpers import BACKEND_DEVICES, BACKEND_IDS, rel_err

ENTRIES = ["functional", "module", "process_group", "projected"]
backend_device = pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICES, ids=BACKEND_IDS)
entry_param = pytest.mark.parametrize("entry", ENTRIES)


@pytest.fixture
def group(one_rank_group):
    return one_rank_group


def _losses_and_grads(entry, backend, students, teachers, masks, group, *, power=0.5, eps=0.0,
                      teacher_grad=False):
    """Per-layer losses and (dS..., dT...) through one entry point."""
    ss = [s.detach().requires_grad_() for s in students]
    ts = [t.detach().requires_grad_(teacher_grad) for t in teachers]
    kwargs = dict(mask=masks, power=power, eps=eps, backend=backend)
    if entry == "functional":
        losses = ek.eofd_loss(ss, ts, reduction="none", **kwargs)
    elif entry == "module":
        losses = ek.EOFDLoss(power=power, eps=eps, reduction="none", backend=backend)(ss, ts,
                                                                                     masks)
    elif entry == "process_group":
        losses = ek.eofd_loss(ss, ts, reduction="none", process_group=group, **kwargs)
    else:
        eyes = [torch.eye(t.shape[-1], dtype=t.dtype, device=t.device) for t in ts]
        losses = ek.eofd_projected_loss(ss, eyes, None, ts, reduction="none", **kwargs)
    grads = torch.autograd.grad(losses.sum(), ss + (ts if teacher_grad else []))
    return losses.detach(), grads


def _layers(device, *, constant_first=False, nan_padding=False, bad_value=None):
    """Two float64 layers (2, 6, 5) with a mask; the first teacher optionally wholly constant
    on its valid tokens, NaN in its padding, or holding ``bad_value`` in one valid token."""
    g = torch.Generator().manual_seed(0)
    teachers = [torch.randn(2, 6, 5, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    students = [t + 0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64)
                for t in teachers]
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    if constant_first:
        teachers[0][:] = torch.arange(5, dtype=torch.float64) - 2.0
    if nan_padding:
        teachers[0][~mask] = torch.nan
        students[0][~mask] = torch.nan
    if bad_value is not None:
        teachers[0][0, 1, 3] = bad_value
    return ([x.to(device) for x in students], [x.to(device) for x in teachers],
            [mask.to(device)] * 2)


def _valid_rows(x, mask):
    return x.reshape(-1, x.shape[-1])[mask.reshape(-1)]


@backend_device
@entry_param
@pytest.mark.parametrize("nan_padding", [False, True], ids=["", "nan-padding"])
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["frozen", "teacher-grad"])
def test_constant_teacher_layer_is_nan_at_eps_zero(backend, device, entry, nan_padding,
                                                   teacher_grad, group):
    if entry == "module" and teacher_grad:
        pytest.skip("the same path as the functional call")
    students, teachers, masks = _layers(device, constant_first=True, nan_padding=nan_padding)
    losses, grads = _losses_and_grads(entry, backend, students, teachers, masks, group,
                                      teacher_grad=teacher_grad)
    assert math.isnan(losses[0]) and math.isfinite(losses[1])
    assert torch.isnan(_valid_rows(grads[0], masks[0])).all()  # dS of the constant layer
    assert torch.isfinite(grads[1]).all()
    paper = ek.eofd_loss(students, teachers, mask=masks, reduction="none", backend="reference")
    assert math.isnan(paper[0]) and rel_err(losses[1], paper[1]) <= 1e-10


@backend_device
@entry_param
def test_constant_teacher_layer_with_eps_has_zero_weights(backend, device, entry, group):
    students, teachers, masks = _layers(device, constant_first=True)
    losses, grads = _losses_and_grads(entry, backend, students, teachers, masks, group,
                                      eps=0.25, teacher_grad=True)
    assert losses[0] == 0 and (grads[0] == 0).all() and (grads[2] == 0).all()
    want, want_grads = _losses_and_grads("functional", "torch", students, teachers, masks,
                                         group, eps=0.25, teacher_grad=True)
    assert rel_err(losses, want) <= 1e-10
    for got, ref in zip(grads, want_grads, strict=True):
        assert rel_err(got, ref) <= 1e-10


@backend_device
@entry_param
def test_plain_mse_of_a_constant_teacher_at_p_zero(backend, device, entry, group):
    """p = 0 is plain MSE, exactly, even where sbar = 0 (NaN ** 0 = 1, as in torch)."""
    students, teachers, masks = _layers(device, constant_first=True)
    losses, _ = _losses_and_grads(entry, backend, students, teachers, masks, group, power=0.0)
    s, t = _valid_rows(students[0], masks[0]), _valid_rows(teachers[0], masks[0])
    assert rel_err(losses[0], ((s - t) ** 2).mean()) <= 1e-10


@backend_device
@entry_param
@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_in_a_valid_teacher_value_shows(backend, device, entry, bad_value, group):
    students, teachers, masks = _layers(device, bad_value=bad_value)
    losses, grads = _losses_and_grads(entry, backend, students, teachers, masks, group)
    assert math.isnan(losses[0]) and math.isfinite(losses[1])
    assert not torch.isfinite(_valid_rows(grads[0], masks[0])).any()
    assert torch.isfinite(grads[1]).all()


@backend_device
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_nan_in_a_valid_teacher_value_shows_in_weights_and_outlier_scan(backend, device,
                                                                        bad_value):
    _, teachers, masks = _layers(device, bad_value=bad_value)
    weights = ek.teacher_weights(teachers, mask=masks, backend=backend)
    assert torch.isnan(weights[0]).all() and torch.isfinite(weights[1]).all()
    scan = ek.OutlierScan(backend=backend).update(teachers, masks)
    report = scan.report()
    assert not math.isfinite(report.layers[0].sigma[3]) and math.isnan(report.layers[0].sbar)
    assert math.isfinite(report.layers[1].sbar)


@backend_device
def test_all_padding_micro_batch_with_given_weights_contributes_nothing(backend, device):
    students, teachers, masks = _layers(device)
    weights = ek.teacher_weights(teachers, mask=masks, backend=backend)
    empty = [torch.zeros_like(m) for m in masks]
    ss = [s.detach().requires_grad_() for s in students]
    losses = ek.eofd_loss(ss, teachers, mask=empty, weights=weights, reduction="none",
                          backend=backend)
    grads = torch.autograd.grad(losses.sum(), ss)
    assert (losses == 0).all() and all((g == 0).all() for g in grads)
    # Without given weights the statistics of zero tokens are undefined: NaN, as the paper's.
    plain = ek.eofd_loss(students, teachers, mask=empty, reduction="none", backend=backend)
    assert torch.isnan(plain).all()


@backend_device
def test_outlier_scan_after_an_all_padding_batch_is_unchanged(backend, device):
    _, teachers, masks = _layers(device)
    scan = ek.OutlierScan(backend=backend).update(teachers, masks)
    before = scan.report()
    scan.update([t * torch.nan for t in teachers], [torch.zeros_like(m) for m in masks])
    after = scan.report()
    assert after.tokens == before.tokens
    for a, b in zip(after.layers, before.layers, strict=True):
        assert a.sigma == b.sigma and a.weights == b.weights


@backend_device
def test_learned_weights_get_their_gradient(backend, device):
    """weights= that require grad: d loss / d w_d = g E_d / (n' d), against autograd of the
    formula in float64; S's gradient is unchanged by the weights needing one."""
    students, teachers, masks = _layers(device)
    g = torch.Generator().manual_seed(1)
    weights = [torch.rand(5, generator=g, dtype=torch.float64).to(device).requires_grad_()
               for _ in range(2)]
    ss = [s.detach().requires_grad_() for s in students]
    scale = torch.tensor([0.5, -2.0], dtype=torch.float64, device=device)
    losses = ek.eofd_loss(ss, teachers, mask=masks, weights=weights, reduction="none",
                          backend=backend)
    got = torch.autograd.grad(losses, ss + weights, scale)
    want_losses = torch.stack([
        (w * ((_valid_rows(s, m) - _valid_rows(t, m)) ** 2)).mean()
        for s, t, m, w in zip(ss, teachers, masks, weights)])
    want = torch.autograd.grad(want_losses, ss + weights, scale)
    assert rel_err(losses, want_losses) <= 1e-10
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= 1e-10


@backend_device
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_projected_loss_nan_in_masked_rows_of_x_never_reaches_dw(backend, device, bad):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 4, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64).to(device)
    t = torch.randn(3, 7, 6, generator=g, dtype=torch.float64).to(device)
    mask = torch.ones(3, 7, dtype=torch.bool, device=device)
    mask[2, 3:] = False
    clean = x.clone()
    clean[~mask] = 0.0
    x[~mask] = bad

    def grads(hidden):
        leaves = [hidden.detach().requires_grad_(), w.detach().requires_grad_()]
        loss = ek.eofd_projected_loss(leaves[0], leaves[1], None, t, mask=mask,
                                      backend=backend, chunk_rows=4)
        return (loss, *torch.autograd.grad(loss, leaves))

    (loss, d_x, d_w), (want_loss, want_dx, want_dw) = grads(x), grads(clean)
    assert torch.isfinite(d_w).all() and torch.isfinite(d_x).all()
    assert rel_err(loss, want_loss) <= 1e-10 and rel_err(d_w, want_dw) <= 1e-10
    assert rel_err(d_x, want_dx) <= 1e-10


@backend_device
@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_given_weights_are_errors(backend, device, bad):
    students, teachers, masks = _layers(device)
    weights = [torch.ones(5, dtype=torch.float64, device=device) for _ in range(2)]
    weights[1][2] = bad
    with pytest.raises(RuntimeError, match=r"weights\[1\]: every weight must be finite"):
        ek.eofd_loss(students, teachers, mask=masks, weights=weights, backend=backend)
    with pytest.raises(TypeError, match=r"weights\[0\]: expected a real floating-point"):
        ek.eofd_loss(students, teachers, mask=masks, backend=backend,
                     weights=[torch.ones(5, dtype=torch.complex128, device=device)] * 2)
    with pytest.raises(ValueError, match=r"weights\[0\]: on meta"):
        ek.eofd_loss(students, teachers, mask=masks, backend=backend,
                     weights=[torch.ones(5, device="meta")] * 2)


@backend_device
@pytest.mark.parametrize("module", [False, True], ids=["functional", "module"])
def test_compile_dynamic_shapes_and_power(backend, device, module):
    """torch.compile(fullgraph=True, dynamic=True): shapes and power symbolic, the eager
    values (float32, 1e-6)."""
    torch._dynamo.reset()
    loss_module = ek.EOFDLoss(power=1.0, backend=backend)

    def call(s, t, m, power):
        if module:
            return loss_module(s, t, m)
        return ek.eofd_loss(s, t, mask=m, power=power, backend=backend)

    compiled = torch.compile(call, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(3)
    for batch, seq, power in ((2, 5, 1.0), (3, 9, 0.5)):
        t = torch.randn(batch, seq, 8, generator=g).to(device)
        s = (t + 0.1 * torch.randn(t.shape, generator=g).to(device)).requires_grad_()
        m = torch.rand(batch, seq, generator=g).to(device) < 0.8
        m[0, :2] = True
        got = compiled(s, t, m, power)
        want = call(s, t, m, power)
        assert rel_err(got, want) <= 1e-6
        assert rel_err(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0]) <= 1e-6
