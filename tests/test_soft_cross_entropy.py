"""L_pred's soft cross-entropy: the chunked path (gradient formed in the forward) against the
plain formula in float64, its masks, NaNs, memory and autograd rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import eofd_kernels.distill.prediction_loss as sce_module
from eofd_kernels.distill import TopKLogits, soft_cross_entropy
from eofd_kernels.distill.prediction_loss import soft_cross_entropy_eager

# Student dtype -> (rtol, atol) of the loss and the gradient against float64. float32: the
# log-softmax and the row sums over C <= 97 classes carry a few ulps (1.2e-7 each); bf16: the
# gradient is rounded to bf16 (half an ulp: 2**-9 relative) once, as the plain formula's is;
# the loss is float32 in both.
TOLERANCES = {torch.float64: (1e-12, 1e-15), torch.float32: (2e-6, 1e-8),
              torch.bfloat16: (2**-8, 1e-6)}


# float32 gradients (p - q) / rows of a few rows: p and q ~ 0.1-0.5 cancel, so a few ulps of
# 0.5 / rows (1.2e-7 x 0.5 / 3) remain in absolute terms.
FP32_GRAD_ATOL = 2e-8


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows: every case crosses chunk boundaries and ends on a partial chunk."""
    monkeypatch.setattr(sce_module, "_rows_per_chunk", lambda rows: 3)


def _logits(g, shape, scale=3.0):
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def _rounded(x, dtype):
    if isinstance(x, TopKLogits):
        return TopKLogits(x.values.to(dtype).double(), x.indices)
    return x.to(dtype).double()


def _case(kind, g):
    student, teacher = _logits(g, (2, 7, 97)), _logits(g, (2, 7, 97))
    if kind == "top-k":
        values, indices = teacher.topk(9, dim=-1)
        teacher = TopKLogits(values, indices)
    return student, teacher


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("kind", ["full", "top-k"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_matches_the_formula_in_float64(small_chunks, dtype, kind, masked, temperature):
    g = torch.Generator().manual_seed(hash((kind, masked, temperature)) % 2**31)
    # The inputs rounded to the dtype first: the reference sees what the chunked path reads.
    student64, teacher64 = (_rounded(x, dtype) for x in _case(kind, g))
    mask = (torch.rand(2, 7, generator=g) > 0.4) if masked else None
    leaf64 = student64.clone().requires_grad_()
    want = soft_cross_entropy_eager(leaf64, teacher64, temperature=temperature, mask=mask)
    (want_grad,) = torch.autograd.grad(want, leaf64)

    leaf = student64.to(dtype).requires_grad_()
    teacher = (TopKLogits(teacher64.values.to(dtype), teacher64.indices) if kind == "top-k"
               else teacher64.to(dtype))
    got = soft_cross_entropy(leaf, teacher, temperature=temperature, mask=mask)
    (got_grad,) = torch.autograd.grad(got, leaf)
    rtol, atol = TOLERANCES[dtype]
    assert got.dtype == torch.promote_types(dtype, torch.float32)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=rtol, atol=atol)
    if masked:
        assert torch.all(got_grad[~mask] == 0)


def test_it_is_torch_cross_entropy_with_probability_targets():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.4
    for tau in (1.0, 2.5):
        want = F.cross_entropy(s[mask] / tau, torch.softmax(t[mask] / tau, -1))
        got = soft_cross_entropy(s, t, temperature=tau, mask=mask)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("call", [soft_cross_entropy, soft_cross_entropy_eager])
def test_bad_arguments_name_the_argument(call):
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    with pytest.raises(ValueError, match="temperature"):
        call(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="mask"):
        call(s, t, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="student_logits"):
        call(s[:, :4], t)


@pytest.mark.parametrize("call", [soft_cross_entropy, soft_cross_entropy_eager])
def test_nans_and_empty_masks(small_chunks, call):
    """A NaN in a valid row makes the loss NaN; one in a masked row does not count; no valid
    row is a NaN loss with a zero gradient (the plain formula's mean of nothing)."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3] = False
    for poisoned, tensor in (("student", s), ("teacher", t)):
        bad = tensor.clone()
        bad[1, 3, 2] = math.nan
        args = (bad, t) if poisoned == "student" else (s, bad)
        leaf = args[0].clone().requires_grad_()
        masked_loss = call(leaf, args[1], mask=mask)
        (grad,) = torch.autograd.grad(masked_loss, leaf)
        assert torch.isfinite(masked_loss) and torch.isfinite(grad).all(), poisoned
        assert torch.isnan(call(*args)), poisoned
    leaf = s.clone().requires_grad_()
    empty = call(leaf, t, mask=torch.zeros(2, 5, dtype=torch.bool))
    (grad,) = torch.autograd.grad(empty, leaf)
    assert torch.isnan(empty) and torch.all(grad == 0)


def _saved_new_bytes(fn, *inputs) -> int:
    """Bytes the graph of ``fn()`` saves for backward beyond the inputs themselves (a saved
    input is a reference, not memory)."""
    held = {t.untyped_storage().data_ptr() for t in inputs}
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.untyped_storage().data_ptr() not in held:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_chunked_path_keeps_one_logits_sized_tensor_for_backward():
    """Beyond references to its inputs, the graph holds the gradient formed in the forward."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 16, 500, generator=g, dtype=torch.bfloat16).requires_grad_()
    t = torch.randn(4, 16, 500, generator=g, dtype=torch.bfloat16)
    logits_bytes = s.numel() * s.element_size()
    losses = []
    assert _saved_new_bytes(lambda: losses.append(soft_cross_entropy(s, t)), s, t) == 0
    # ... and the gradient it formed, the one tensor its graph node holds.
    held = [v for v in vars(losses[0].grad_fn).values() if torch.is_tensor(v)]
    assert sum(v.numel() * v.element_size() for v in held) == logits_bytes
    # The plain formula keeps float32 copies and both distributions (several times as much).
    assert _saved_new_bytes(lambda: soft_cross_entropy_eager(s, t), s, t) >= 4 * logits_bytes


def test_a_retained_graph_backpropagates_twice_alike(small_chunks):
    """The first backward scales the saved gradient in place; the second recomputes."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 11, generator=g).requires_grad_(), torch.randn(3, 11, generator=g)
    mask = torch.tensor([True, False, True])
    loss = soft_cross_entropy(s, t, mask=mask) * 3.0
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    # The node let go of the gradient it formed (the saved inputs are references).
    assert not [v for v in vars(loss.grad_fn.next_functions[0][0]).values()
                if torch.is_tensor(v)]
    leaf = s.detach().requires_grad_()
    (want,) = torch.autograd.grad(soft_cross_entropy_eager(leaf, t, mask=mask) * 3.0, leaf)
    torch.testing.assert_close(first, want, rtol=2e-6, atol=FP32_GRAD_ATOL)
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first, rtol=2e-6, atol=FP32_GRAD_ATOL)


@pytest.mark.parametrize("kind", ["full", "top-k"])
def test_teacher_with_grad_and_second_order(small_chunks, kind):
    """A teacher whose logits require grad gets its gradient (the plain formula); a second
    derivative through the chunked path is the plain formula's (recomputed), in float64."""
    g = torch.Generator().manual_seed(4)
    s64, t64 = _logits(g, (3, 11)), _logits(g, (3, 11))
    s, t = s64.float().requires_grad_(), t64.float().requires_grad_()
    got = torch.autograd.grad(soft_cross_entropy(s, t, temperature=2.0), (s, t))
    s64.requires_grad_(), t64.requires_grad_()
    want = torch.autograd.grad(soft_cross_entropy_eager(s64, t64, temperature=2.0), (s64, t64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-6, atol=1e-8)
    student, teacher = _case(kind, g)
    mask = torch.rand(2, 7, generator=g) > 0.3

    def grad_norm(call):
        leaf = student.clone().requires_grad_()
        (grad,) = torch.autograd.grad(call(leaf, teacher, temperature=1.5, mask=mask), leaf,
                                      create_graph=True)
        (second,) = torch.autograd.grad((grad**2).sum(), leaf)
        return second

    torch.testing.assert_close(grad_norm(soft_cross_entropy),
                               grad_norm(soft_cross_entropy_eager), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("call", [soft_cross_entropy, soft_cross_entropy_eager])
def test_no_rows_and_no_classes(call):
    """No rows: a NaN loss (the mean of nothing) with an empty gradient; no classes: 0."""
    for shape, check in (((0, 5), torch.isnan), ((2, 3, 0), lambda v: v == 0)):
        leaf = torch.randn(shape).requires_grad_()
        loss = call(leaf, torch.randn(shape))
        (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
        assert check(loss), shape
        assert grad is None or grad.shape == leaf.shape


def test_evaluation_forms_no_gradient():
    """Under no_grad (evaluation), the student's softmax gradient is not formed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    s, t = torch.randn(4, 9).requires_grad_(), torch.randn(4, 9)
    for grad_mode, formed in ((torch.no_grad, False), (torch.enable_grad, True)):
        with grad_mode(), Ops() as ops:
            soft_cross_entropy(s, t)
        assert ("exp_" in ops.names) == formed, grad_mode


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compiled_retained_graph_backpropagates_twice_alike(compiler):
    """A traced backward is traced once: its second run must not scale the gradient again."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 11, generator=g).requires_grad_(), torch.randn(3, 11, generator=g)
    torch._dynamo.reset()
    loss = torch.compile(lambda x, y: soft_cross_entropy(x, y) * 0.5, backend=compiler,
                         fullgraph=True)(s, t)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    s.grad = None
    loss.backward()
    torch.testing.assert_close(s.grad, first, rtol=2e-6, atol=FP32_GRAD_ATOL)
    leaf = s.detach().requires_grad_()
    (want,) = torch.autograd.grad(soft_cross_entropy_eager(leaf, t) * 0.5, leaf)
    torch.testing.assert_close(first, want, rtol=2e-6, atol=FP32_GRAD_ATOL)
