"""eofd_projected_loss: the projection fused into the loss equals projecting first and calling
eofd_loss, for the loss and every gradient (X, W, b, and the teacher), at any chunk size.

fp32 bound 1e-6 relative (the issue's): both paths run the same fp32 matmuls row by row, and
differ only in how dW sums over chunks of rows and how E_d is summed (fp64 per chunk here).
"""

import pytest
import torch
import torch.nn.functional as F

import eofd_kernels as ek

from .helpers import BACKEND_DEVICES, BACKEND_IDS, rel_err

backend_device = pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICES, ids=BACKEND_IDS)
WIDTHS = [(12, 40), (20, 24), (8, 33)]  # (student width, teacher width) per layer


def _layers(device, dtype=torch.float32, teacher_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ws, bs, ts = [], [], [], []
    for d_s, d_t in WIDTHS:
        xs.append(torch.randn(3, 17, d_s, generator=g, dtype=dtype))
        ws.append(torch.randn(d_t, d_s, generator=g, dtype=dtype) / d_s ** 0.5)
        bs.append(torch.randn(d_t, generator=g, dtype=dtype))
        spread = torch.exp(torch.rand(d_t, generator=g, dtype=dtype) * 3 - 1.5)
        ts.append(torch.randn(3, 17, d_t, generator=g, dtype=dtype) * spread + 1)
    mask = torch.rand(3, 17, generator=g) < 0.75
    leaves = [x.to(device).requires_grad_() for x in xs + ws + bs]
    ts = [t.to(device).requires_grad_(teacher_grad) for t in ts]
    return leaves, ts, mask.to(device)


def _grads(loss, leaves, ts):
    return torch.autograd.grad(loss, leaves + [t for t in ts if t.requires_grad])


@backend_device
@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("teacher_grad", [True, False], ids=["teacher-grad", "frozen"])
def test_matches_projecting_first(backend, device, power, teacher_grad):
    leaves, ts, mask = _layers(device, teacher_grad=teacher_grad)
    xs, ws, bs = leaves[:3], leaves[3:6], leaves[6:]
    lam = torch.tensor([1.0, 0.5, 2.0], device=device)
    fused = ek.eofd_projected_loss(xs, ws, bs, ts, power=power, mask=mask, layer_weights=lam,
                                   backend=backend, chunk_rows=10)
    unfused = ek.eofd_loss([F.linear(x, w, b) for x, w, b in zip(xs, ws, bs)], ts,
                           power=power, mask=mask, layer_weights=lam, backend=backend)
    assert rel_err(fused, unfused) <= 1e-6
    for got, want in zip(_grads(fused, leaves, ts), _grads(unfused, leaves, ts), strict=True):
        assert rel_err(got, want) <= 1e-6


def test_float64_is_exact_and_chunking_changes_nothing_but_rounding():
    leaves, ts, mask = _layers("cpu", torch.float64)
    xs, ws, bs = leaves[:3], leaves[3:6], leaves[6:]
    unfused = ek.eofd_loss([F.linear(x, w, b) for x, w, b in zip(xs, ws, bs)], ts, mask=mask,
                           reduction="none", backend="torch")
    want = _grads(unfused.sum(), leaves, ts)
    for chunk_rows in (1, 7, 1000):
        fused = ek.eofd_projected_loss(xs, ws, bs, ts, mask=mask, reduction="none",
                                       backend="torch", chunk_rows=chunk_rows)
        assert rel_err(fused, unfused) <= 1e-13
        for got, ref in zip(_grads(fused.sum(), leaves, ts), want, strict=True):
            assert rel_err(got, ref) <= 1e-13


def test_shared_weight_and_no_bias():
    """One W for every layer (HiddenProjection(shared=True)) and no bias: W's gradient sums
    the layers' contributions."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
          for _ in range(2)]
    ts = [torch.randn(2, 9, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    fused = ek.eofd_projected_loss(xs, w, None, ts, backend="torch")
    unfused = ek.eofd_loss([x @ w.t() for x in xs], ts, backend="torch")
    assert rel_err(fused, unfused) <= 1e-13
    for got, want in zip(torch.autograd.grad(fused, xs + [w]),
                         torch.autograd.grad(unfused, xs + [w]), strict=True):
        assert rel_err(got, want) <= 1e-13


def test_bf16_autocast_close_to_the_unfused_autocast_path():
    """Under autocast the chunks' matmuls run in bf16 (fp32 accumulation): within bf16
    rounding (2^-8) of projecting under autocast and calling eofd_loss."""
    leaves, ts, mask = _layers("cpu", teacher_grad=False)
    xs, ws, bs = leaves[:3], leaves[3:6], leaves[6:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = ek.eofd_projected_loss(xs, ws, bs, ts, mask=mask, chunk_rows=16)
        unfused = ek.eofd_loss([F.linear(x, w, b) for x, w, b in zip(xs, ws, bs)], ts,
                               mask=mask)
    assert rel_err(fused, unfused) <= 2 ** -8
    for got, want in zip(_grads(fused, leaves, ts), _grads(unfused, leaves, ts), strict=True):
        assert got.dtype == want.dtype and rel_err(got, want) <= 2 ** -7


def test_no_grad_computes_no_gradients():
    leaves, ts, mask = _layers("cpu")
    xs, ws, bs = leaves[:3], leaves[3:6], leaves[6:]
    with torch.no_grad():
        loss = ek.eofd_projected_loss(xs, ws, bs, ts, mask=mask)
    assert not loss.requires_grad


@backend_device
def test_double_backward_and_retained_graph_match_projecting_first(backend, device):
    """The package's one double-backward rule: a backward that builds a graph (and a second
    backward of a retained graph) recomputes through the projection with the differentiable
    formula; a gradient penalty equals the unfused path's (fp64, 1e-10)."""
    leaves, ts, mask = _layers(device, torch.float64)
    xs, ws, bs = leaves[:3], leaves[3:6], leaves[6:]
    inputs = leaves + ts

    def penalty_grads(fused):
        if fused:
            loss = ek.eofd_projected_loss(xs, ws, bs, ts, mask=mask, backend=backend,
                                          chunk_rows=5)
        else:
            students = [F.linear(x, w, b) for x, w, b in zip(xs, ws, bs)]
            loss = ek.eofd_loss(students, ts, mask=mask, backend="torch")
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        penalty = sum((g ** 2).sum() for g in grads)
        return grads + torch.autograd.grad(penalty, inputs)

    for got, want in zip(penalty_grads(True), penalty_grads(False), strict=True):
        assert rel_err(got, want) <= 1e-10
    loss = ek.eofd_projected_loss(xs, ws, bs, ts, mask=mask, backend=backend)
    first = torch.autograd.grad(loss, inputs, retain_graph=True)
    for a, b in zip(first, torch.autograd.grad(loss, inputs), strict=True):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(weight=torch.randn(5, 4)), "layer 0: weight must be (teacher width 6, student width 4)"),
    (dict(bias=torch.randn(5)), "layer 0: bias must be (6,)"),
    (dict(student_hidden=torch.randn(2, 4, 4)), "same leading (token) shape"),
    (dict(weight=[torch.randn(6, 4)] * 2), "weight: expected a tensor or a sequence of 1"),
    (dict(chunk_rows=0), "chunk_rows: expected an int >= 1"),
    (dict(student_hidden=torch.randn(2, 3, 4, dtype=torch.float64)),
     "layer 0: student_hidden (torch.float64), weight (torch.float32) and bias (None) must "
     "share one dtype"),
])
def test_bad_input_names_the_argument(kwargs, message):
    args = dict(student_hidden=torch.randn(2, 3, 4), weight=torch.randn(6, 4), bias=None,
                teacher=torch.randn(2, 3, 6))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError)) as info:
        ek.eofd_projected_loss(args.pop("student_hidden"), args.pop("weight"), args.pop("bias"),
                               args.pop("teacher"), **args)
    assert message in str(info.value)


@pytest.mark.parametrize("backend",
                         [b for b in ("ext", "torch") if b in ek.available_backends("cpu")])
def test_compile_fullgraph_matches_eager(backend):
    leaves, ts, mask = _layers("cpu", teacher_grad=False)
    xs, ws, bs = leaves[:3], leaves[3:6], leaves[6:]
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(xs, ws, bs, ts, mask):
        return ek.eofd_projected_loss(xs, ws, bs, ts, mask=mask, backend=backend, chunk_rows=20)

    compiled = step(xs, ws, bs, ts, mask)
    eager = ek.eofd_projected_loss(xs, ws, bs, ts, mask=mask, backend=backend, chunk_rows=20)
    assert rel_err(compiled, eager) <= 1e-6
    for got, want in zip(_grads(compiled, leaves, ts), _grads(eager, leaves, ts), strict=True):
        assert rel_err(got, want) <= 1e-6


@backend_device
def test_a_bf16_teacher_is_read_as_is(backend, device):
    """A frozen bf16 teacher beside an fp32 student: the backend reads it in its own dtype,
    bitwise what the same teacher converted to fp32 first gives (its values are exact in fp32),
    and within the fp32 bound of the float64 computation on those values."""
    leaves, ts, mask = _layers(device, teacher_grad=False)
    xs, ws, bs = leaves[:3], leaves[3:6], leaves[6:]
    ts = [t.bfloat16() for t in ts]
    got = ek.eofd_projected_loss(xs, ws, bs, ts, power=0.5, mask=mask, backend=backend,
                                 chunk_rows=10)
    converted = ek.eofd_projected_loss(xs, ws, bs, [t.float() for t in ts], power=0.5,
                                       mask=mask, backend=backend, chunk_rows=10)
    assert torch.equal(got, converted)
    got_grads = _grads(got, leaves, [])
    for a, b in zip(got_grads, _grads(converted, leaves, []), strict=True):
        assert torch.equal(a, b)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    want = ek.eofd_loss([F.linear(x, w, b) for x, w, b in zip(leaves64[:3], leaves64[3:6],
                                                               leaves64[6:])],
                        [t.double() for t in ts], power=0.5, mask=mask, backend="torch")
    assert rel_err(got, want) <= 1e-6
    for a, b in zip(got_grads, _grads(want, leaves64, []), strict=True):
        assert rel_err(a, b) <= 1e-6
