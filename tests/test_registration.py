"""torch.library registration: opcheck, torch.compile(fullgraph=True) without graph breaks."""

import pytest
import torch

import eofd_kernels as ek

from .cases import CASES, build
from .helpers import BACKEND_DEVICES, BACKEND_IDS, rel_err, run_backend

needs_triton = pytest.mark.skipif("triton" not in ek.available_backends("cpu"),
                                  reason="triton is not installed")
needs_ext = pytest.mark.skipif("ext" not in ek.available_backends("cpu"),
                               reason="the compiled extension is not built")


def _op_args(device, dtype=torch.float32, teacher_grad=True):
    """A masked 2-D layer, a 3-D one, and a transposed 3-D one whose tokens no single row
    stride describes (the ops copy that one into rows themselves)."""
    g = torch.Generator().manual_seed(0)
    shapes = ((6, 8), (2, 5, 12), (4, 3, 10))
    students = [torch.randn(*sh, generator=g, dtype=dtype).to(device) for sh in shapes]
    teachers = [torch.randn(s.shape, generator=g, dtype=dtype).to(device) for s in students]
    for x in students + (teachers if teacher_grad else []):
        x.requires_grad_()
    students[2], teachers[2] = students[2].transpose(0, 1), teachers[2].transpose(0, 1)
    masks = [torch.tensor([True, True, False, True, True, True], device=device), None, None]
    return students, teachers, masks


@needs_triton
def test_opcheck_triton_forward():
    from eofd_kernels.backends.triton_backend import triton_forward

    students, teachers, masks = _op_args("cpu", teacher_grad=False)
    students = [s.detach() for s in students]  # the ops are not differentiable themselves
    torch.library.opcheck(triton_forward, (students, teachers, masks, 0.5, 0.0))


@needs_triton
@pytest.mark.parametrize("need_teacher_grad", [True, False])
def test_opcheck_triton_backward(need_teacher_grad):
    from eofd_kernels.backends.triton_backend import triton_backward, triton_forward

    students, teachers, masks = _op_args("cpu")
    _, dim_stats = triton_forward(students, teachers, masks, 0.5, 0.0)
    grad = torch.tensor([1.0, -2.0, 0.5])
    # No double backward: the backward op is checked on inputs that need no grad.
    students, teachers = [s.detach() for s in students], [t.detach() for t in teachers]
    torch.library.opcheck(triton_backward, (grad, students, teachers, masks, dim_stats.detach(),
                                            need_teacher_grad))


# The backends that are a registered op pair (forward, backward).
OP_BACKEND_DEVICES = [bd for bd in BACKEND_DEVICES if bd[0] in ("ext", "triton")]
OP_BACKEND_IDS = [i for bd, i in zip(BACKEND_DEVICES, BACKEND_IDS) if bd[0] in ("ext", "triton")]


def _registered_ops(backend):
    if backend == "ext":
        from eofd_kernels.backends import ext_backend  # noqa: F401  (registers the fake impls)

        return torch.ops.eofd_ext.forward, torch.ops.eofd_ext.backward
    from eofd_kernels.backends.triton_backend import triton_backward, triton_forward

    return triton_forward, triton_backward


@pytest.mark.parametrize(("backend", "device"), OP_BACKEND_DEVICES, ids=OP_BACKEND_IDS)
@pytest.mark.parametrize("teacher_grad", [True, False])
def test_double_backward_matches_torch_backend(backend, device, teacher_grad):
    """A gradient penalty through the fused ops: backward(create_graph=True) gives a graph of
    the gradient (the torch backend's formula), never a graph-less grad; the first-order
    grads keep the kernels' values."""
    students, teachers, masks = _op_args(device, dtype=torch.float64, teacher_grad=teacher_grad)
    weights = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64, device=device)

    def penalty_grads(name):
        losses = ek.eofd_loss(students, teachers, mask=masks, reduction="none", backend=name)
        inputs = students + [t for t in teachers if t.requires_grad]
        grads = torch.autograd.grad(losses, inputs, weights, create_graph=True)
        penalty = sum((g ** 2).sum() for g in grads)
        return grads, torch.autograd.grad(penalty, inputs)

    (grads, second), (want_grads, want_second) = penalty_grads(backend), penalty_grads("torch")
    for got, want in zip(grads + second, want_grads + want_second, strict=True):
        assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICES, ids=BACKEND_IDS)
def test_compile_fullgraph_matches_eager(backend, device):
    layers = build(CASES[3], torch.float32, device)  # mixed shapes and masks
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(students, teachers, masks):
        return ek.eofd_loss(students, teachers, mask=masks, reduction="none", backend=backend)

    eager = run_backend(backend, *layers)
    ss = [s.detach().requires_grad_() for s in layers[0]]
    ts = [t.detach().requires_grad_() for t in layers[1]]
    losses = step(ss, ts, layers[2])
    grads = torch.autograd.grad(losses.sum(), ss + ts)
    assert rel_err(losses, eager[0]) <= 1e-6
    for g, e in zip(grads, eager[1] + eager[2]):
        assert rel_err(g, e) <= 1e-6


@needs_ext
@pytest.mark.parametrize("need_teacher_grad", [True, False])
def test_opcheck_ext_ops(need_teacher_grad):
    import eofd_kernels.backends.ext_backend  # noqa: F401  (registers the fake impls)

    students, teachers, masks = _op_args("cpu", teacher_grad=False)
    students = [s.detach() for s in students]  # the ops are not differentiable themselves
    torch.library.opcheck(torch.ops.eofd_ext.forward.default,
                          (students, teachers, masks, 0.5, 0.0))
    _, dim_stats = torch.ops.eofd_ext.forward(students, teachers, masks, 0.5, 0.0)
    students, teachers = [s.detach() for s in students], [t.detach() for t in teachers]
    torch.library.opcheck(torch.ops.eofd_ext.backward.default,
                          (torch.tensor([1.0, -2.0, 0.5]), students, teachers, masks,
                           dim_stats.detach(), need_teacher_grad))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ext_forward_and_grad_is_forward_then_backward(dtype):
    """The CPU training forward's dS has the bits of the backward op for the same grads, and
    its losses and dim_stats those of the plain forward; opcheck covers its fake impl."""
    import eofd_kernels.backends.ext_backend  # noqa: F401

    students, teachers, masks = _op_args("cpu", dtype, teacher_grad=False)
    students = [s.detach() for s in students]  # it runs inside an autograd.Function
    ops = torch.ops.eofd_ext
    grad = torch.tensor([1.5, -2.0, 0.3], dtype=torch.float64)
    # 2000 bytes of S and T per group: groups {0, 1} {2} in fp32, {0, 1, 2} in bf16, one layer
    # each in fp64.
    args = (students, teachers, masks, 0.5, 0.0, grad, 2000)
    losses, dim_stats, d_students = ops.forward_and_grad(*args)
    want_losses, want_stats = ops.forward(students, teachers, masks, 0.5, 0.0)
    want_grads, _ = ops.backward(grad, students, teachers, masks, want_stats, False)
    assert torch.equal(losses, want_losses) and torch.equal(dim_stats, want_stats)
    for got, want in zip(d_students, want_grads, strict=True):
        assert got.dtype == dtype and torch.equal(got, want)
    torch.library.opcheck(ops.forward_and_grad.default, args)


@needs_ext
# bf16 takes the gradient pass a tile of rows at a time, fp32 row by row.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
# S and T bytes of the fp32 layers below: 115 200, 192 000, 115 200, 49 344 (half in bf16).
@pytest.mark.parametrize("group_bytes", [1, 320_000, 2**40], ids=["layer", "pairs", "all"])
def test_ext_forward_and_grad_schedule_keeps_the_bits(group_bytes, threads, dtype):
    """Layers of several 256-row chunks (one with a chunk of masked rows only): whatever the
    grouping (one layer, two or more, all) and thread count, the forward's gradient chunks,
    which run beside the next group's statistics and wait for their layer's finalize, give
    the bits of the forward then the backward op."""
    import eofd_kernels.backends.ext_backend  # noqa: F401

    g = torch.Generator().manual_seed(1)
    shapes = ((600, 24), (2, 300, 40), (900, 16), (257, 24))
    students = [torch.randn(*sh, generator=g).to(dtype) for sh in shapes]
    teachers = [(torch.randn(*sh, generator=g) * 3).to(dtype) for sh in shapes]
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[0, :290] = False  # rows 0-255, the layer's first chunk, are all masked
    masks = [None, mask.reshape(-1), None, None]
    # Grads of their own per case: a pooled dS buffer left by another case never has the bits.
    case_scale = threads * {1: 1.0, 320_000: 3.0, 2**40: 5.0}[group_bytes]
    grad = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=torch.float64) * case_scale
    ops = torch.ops.eofd_ext
    saved_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        losses, dim_stats, d_students = ops.forward_and_grad(students, teachers, masks, 0.5,
                                                             0.0, grad, group_bytes)
    finally:
        torch.set_num_threads(saved_threads)
    want_losses, want_stats = ops.forward(students, teachers, masks, 0.5, 0.0)
    want_grads, _ = ops.backward(grad, students, teachers, masks, want_stats, False)
    assert torch.equal(losses, want_losses) and torch.equal(dim_stats, want_stats)
    for got, want in zip(d_students, want_grads, strict=True):
        assert torch.equal(got, want)


@needs_ext
def test_grad_ahead_hands_out_the_forwards_grads_when_forecast():
    """With a GradAhead, CPU training calls compute dS in the forward for the grads the last
    backward brought (1 at first) and hand it out when the same grads come; other grads, and
    a second backward through a retained graph, recompute it. Every path gives the plain
    backward's bits, and the forecast lives in the GradAhead alone."""
    from eofd_kernels.backends.ext_backend import ExtBackend
    from eofd_kernels.inputs import LayerBatch
    from eofd_kernels.layer_losses import GradAhead, layer_losses

    calls = []

    class Recording(ExtBackend):
        def forward_and_grad(self, batch, power, eps, grads):
            calls.append(grads.tolist())
            return super().forward_and_grad(batch, power, eps, grads)

        def backward(self, *args):
            calls.append("backward")
            return super().backward(*args)

    backend = Recording()
    students, teachers, masks = _op_args("cpu", teacher_grad=False)
    batch = LayerBatch(students, teachers, masks)

    def grads(grad_ahead, grad, retained=None):
        losses = retained if retained is not None else layer_losses(
            batch, backend, 0.5, 0.0, grad_ahead=grad_ahead)
        got = torch.autograd.grad(losses, students, grad, retain_graph=retained is None)
        plain = ek.eofd_loss(students, teachers, mask=masks, reduction="none", backend="ext")
        want = torch.autograd.grad(plain, students, grad)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        return losses

    ahead, other = GradAhead(), GradAhead()
    ones, weighted = torch.ones(3), torch.tensor([1.5, -2.0, 0.3])
    grads(ahead, ones)
    assert calls == [[1.0, 1.0, 1.0]]  # expected and taken: no backward
    grads(ahead, weighted)
    assert calls[1:] == [[1.0, 1.0, 1.0], "backward"]  # a miss: recomputed, now expected
    retained = grads(ahead, weighted)
    assert calls[3:] == [[1.5, -2.0, 0.30000001192092896]]
    grads(ahead, weighted, retained)
    assert calls[4:] == ["backward"]  # taken once: the retained graph recomputes
    grads(other, ones)  # another owner's forecast is its own
    assert calls[5:] == [[1.0, 1.0, 1.0]]


@needs_ext
def test_only_the_module_takes_ds_from_the_forward(monkeypatch):
    """EOFDLoss's eager CPU training calls with a frozen teacher compute dS in the forward;
    the functional eofd_loss (stateless), a teacher that needs a gradient, or no grad mode
    run the plain forward."""
    from eofd_kernels.backends.ext_backend import ExtBackend

    calls = []
    forward_and_grad = ExtBackend.forward_and_grad

    def counted(self, batch, *args):
        calls.append(batch.num_layers)
        return forward_and_grad(self, batch, *args)

    monkeypatch.setattr(ExtBackend, "forward_and_grad", counted)
    g = torch.Generator().manual_seed(3)
    students = [torch.randn(2, 40, 24, generator=g, requires_grad=True) for _ in range(3)]
    teachers = [torch.randn(2, 40, 24, generator=g) for _ in range(3)]
    module = ek.EOFDLoss(backend="ext")
    module(students, teachers).backward()
    assert calls == [3]
    ek.eofd_loss(students, teachers, backend="ext").backward()
    with torch.no_grad():
        module(students, teachers)
    module(students, [t.requires_grad_() for t in teachers]).backward()
    assert calls == [3]


@needs_ext
def test_ext_backward_rejects_mismatched_inputs():
    import eofd_kernels.backends.ext_backend  # noqa: F401

    students, teachers, masks = _op_args("cpu")
    _, dim_stats = torch.ops.eofd_ext.forward(students, teachers, masks, 0.5, 0.0)
    with pytest.raises(RuntimeError, match="grad_losses has 4 values for 3 layers"):
        torch.ops.eofd_ext.backward(torch.ones(4), students, teachers, masks, dim_stats, False)
    with pytest.raises(RuntimeError, match="dim_stats must be the forward's"):
        torch.ops.eofd_ext.backward(torch.ones(3), students, teachers, masks,
                                    dim_stats[:1], False)


@needs_ext
def test_ext_cpu_gradients_reuse_freed_buffers():
    """The CPU op's dS comes from a size-keyed pool: a step's freed buffers (already faulted
    in) serve the next step, and pooled tensors behave like any other (in place, resize)."""
    students, teachers, masks = build(CASES[1], torch.float32, "cpu")

    def grads():
        _, ds, _ = run_backend("ext", students, teachers, masks, teacher_grad=False)
        return ds

    first = grads()
    pointers = sorted(g.data_ptr() for g in first)
    want = [g.clone() for g in first]
    del first
    second = grads()
    assert sorted(g.data_ptr() for g in second) == pointers
    for g, w in zip(second, want):
        assert torch.equal(g, w)
    g = second[0]
    g.mul_(2).resize_(g.numel() * 2)
    assert torch.equal(g[: want[0].numel()].view_as(want[0]), 2 * want[0])


@pytest.mark.parametrize(("backend", "device"), OP_BACKEND_DEVICES, ids=OP_BACKEND_IDS)
@pytest.mark.parametrize("power", [0.5, 0.7])
def test_forward_dim_stats_match_float64(backend, device, power):
    """The per-dim statistics the backward reads: count, sigma and weights against float64
    torch, and zeros past each layer's d even in a recycled buffer (the CPU extension takes it
    from its pool, so a first call of the same size leaves non-zero values there)."""
    from eofd_kernels import layout

    forward_op, _ = _registered_ops(backend)
    students, teachers, masks = build(CASES[3], torch.float64, device)  # d = 20, 33, 64
    students = [s.reshape(-1, s.shape[-1]) for s in students]
    teachers = [t.reshape(-1, t.shape[-1]) for t in teachers]
    masks = [None if m is None else m.reshape(-1) for m in masks]
    full_width = [torch.randn(7, 64, dtype=torch.float64, device=device) for _ in students]
    forward_op(full_width, full_width, [None] * 3, power, 0.0)  # same-size stats, then freed
    _, dim_stats = forward_op(students, teachers, masks, power, 0.0)
    for i, (t, m) in enumerate(zip(teachers, masks)):
        valid = t if m is None else t[m]
        d = valid.shape[1]
        sigma = valid.std(dim=0)
        stats = dim_stats[i]
        assert torch.equal(stats[layout.D_COUNT, :d], torch.full_like(sigma, valid.shape[0]))
        torch.testing.assert_close(stats[layout.D_SIGMA, :d], sigma, rtol=1e-12, atol=0)
        torch.testing.assert_close(stats[layout.D_WEIGHT, :d], (sigma / sigma.mean()) ** power,
                                   rtol=1e-12, atol=0)
        assert torch.count_nonzero(stats[:, d:]) == 0
