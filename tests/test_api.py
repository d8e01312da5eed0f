"""The public API: reductions, layer weights, masks broadcast, the module, teacher_weights,
backend selection, and a clear error for every bad input (docs/design.md, "API")."""

import pytest
import torch

import eofd_kernels as ek

from .cases import oracle


def _layers(shapes=((2, 5, 8), (2, 5, 8), (3, 4, 6)), seed=0):
    g = torch.Generator().manual_seed(seed)
    students = [torch.randn(*sh, generator=g, dtype=torch.float64) for sh in shapes]
    teachers = [torch.randn(*sh, generator=g, dtype=torch.float64) * 3 for sh in shapes]
    return students, teachers


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_reductions_and_layer_weights(reduction):
    students, teachers = _layers()
    lam = [0.5, 2.0, 1.5]
    per_layer = oracle(students, teachers, [None] * 3)[0] * torch.tensor(lam, dtype=torch.float64)
    want = {"sum": per_layer.sum(), "mean": per_layer.mean(), "none": per_layer}[reduction]
    got = ek.eofd_loss(students, teachers, layer_weights=lam, reduction=reduction,
                       backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_single_mask_applies_to_layers_of_its_shape():
    students, teachers = _layers()
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]])
    got = ek.eofd_loss(students, teachers, mask=mask, reduction="none", backend="torch")
    want = oracle(students, teachers, [mask.bool(), mask.bool(), None])[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_module_and_hf_tuple_input():
    students, teachers = _layers(((2, 5, 8),) * 3)
    module = ek.EOFDLoss(power=1.0, reduction="mean", backend="torch")
    got = module(tuple(students), tuple(teachers))
    want = oracle(students, teachers, [None] * 3, power=1.0)[0].mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert "power=1.0" in repr(module)


def test_teacher_weights_match_reference():
    _, (teacher, *_) = _layers()
    want = ek.reference.calculate_weight(teacher, power=0.5)[0, 0]
    torch.testing.assert_close(ek.teacher_weights(teacher), want, rtol=1e-12, atol=0)
    assert not ek.teacher_weights(teacher.requires_grad_()).requires_grad
    assert len(ek.teacher_weights([teacher, teacher])) == 2


def test_reference_backend_matches_reference_function():
    (s, *_), (t, *_) = _layers()
    got = ek.eofd_loss(s, t, backend="reference")
    torch.testing.assert_close(got, ek.reference.eofd_loss_reference(s, t), rtol=0, atol=0)


def test_auto_picks_the_fastest_available_backend():
    """auto means ext, else torch, for CPU tensors (triton, else ext, else torch on CUDA), and
    computes exactly what the backend it picked computes."""
    from eofd_kernels.backends import pick_backend

    names = ek.available_backends("cpu")
    assert names[-2:] == ["torch", "reference"]
    picked = pick_backend("auto", torch.device("cpu"))
    assert picked == ("ext" if "ext" in names else "torch")
    (s, *_), (t, *_) = _layers()
    assert torch.equal(ek.eofd_loss(s, t), ek.eofd_loss(s, t, backend=picked))
    if torch.cuda.is_available():
        cuda_names = ek.available_backends("cuda")
        assert pick_backend("auto", torch.device("cuda")) == cuda_names[0]


def test_float32_and_mixed_dtypes_give_float32():
    (s, *_), (t, *_) = _layers()
    loss = ek.eofd_loss(s.float(), t.to(torch.bfloat16), backend="torch")
    assert loss.dtype == torch.float32


s64, t64 = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
BAD = [
    (dict(student=torch.randn(2, 3, 5), teacher=torch.randn(2, 3, 4)), ValueError,
     "hidden size 5 != teacher hidden size 4"),
    (dict(student=torch.randn(2, 4, 4), teacher=torch.randn(2, 3, 4)), ValueError,
     "student shape"),
    (dict(student=[s64, s64], teacher=[t64]), ValueError, "2 layers but teacher has 1"),
    (dict(student=[], teacher=[]), ValueError, "non-empty sequence"),
    (dict(student=torch.randn(0, 3, 4), teacher=torch.randn(0, 3, 4)), ValueError, "empty"),
    (dict(student=torch.randn(1, 1, 4), teacher=torch.randn(1, 1, 4)), ValueError,
     "at least 2 tokens"),
    (dict(student=torch.randn(4), teacher=torch.randn(4)), ValueError, "at least one token dim"),
    (dict(student=torch.ones(2, 3, 4, dtype=torch.int64), teacher=torch.ones(2, 3, 4)),
     TypeError, "torch.int64"),
    (dict(student=[s64, "x"], teacher=[t64, t64]), TypeError, "student[1]"),
    (dict(mask=torch.ones(3, 2, dtype=torch.bool)), ValueError, "matches the leading shape"),
    (dict(mask=[torch.ones(2, 3), torch.ones(2, 3)]), ValueError, "2 masks for 1 layers"),
    (dict(mask=[torch.ones(3, 2)]), ValueError, "mask[0]: shape (3, 2)"),
    (dict(reduction="max"), ValueError, "reduction"),
    (dict(backend="cuDNN"), ValueError, "backend"),
    (dict(power=float("nan")), ValueError, "power: must be finite"),
    (dict(power=torch.tensor(0.5)), TypeError, "power"),
    (dict(eps=-1.0), ValueError, "eps: must be >= 0"),
    (dict(layer_weights=[1.0, 2.0]), ValueError, "layer_weights: expected 1 weights"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD, ids=[b[2] for b in BAD])
def test_bad_input_names_the_argument(kwargs, error, message):
    kwargs = {"student": s64, "teacher": t64, "backend": "torch", **kwargs}
    with pytest.raises(error, match=None) as info:
        ek.eofd_loss(kwargs.pop("student"), kwargs.pop("teacher"), **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_unavailable_backend_says_what_is_missing(backend):
    from eofd_kernels.backends import pick_backend

    with pytest.raises(RuntimeError, match=f"backend='{backend}' cannot run on meta tensors: "):
        pick_backend(backend, torch.device("meta"))


def test_reference_backend_refuses_eps():
    with pytest.raises(ValueError, match="eps"):
        ek.eofd_loss(s64, t64, eps=0.1, backend="reference")
