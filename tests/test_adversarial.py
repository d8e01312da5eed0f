"""Odd and hostile inputs: no silent wrong number, a clear error naming the argument otherwise.

Each test here checks a class of input that can go wrong (a NaN or a wrong value, a dropped
graph, a detached weight, an unclear or missing error), for every backend it concerns.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import eofd_kernels as ek

from .cases import oracle
from .helpers import BACKEND_DEVICES, BACKEND_IDS, rel_err

backend_device = pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICES, ids=BACKEND_IDS)
needs_ext = pytest.mark.skipif("ext" not in ek.available_backends("cpu"),
                               reason="the compiled extension is not built")
# The Triton interpreter computes the 0 / 0 of an empty layer with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _grads(backend, students, teachers, masks, go, teacher_grad=True, **kwargs):
    ss = [s.detach().clone().requires_grad_() for s in students]
    ts = [t.detach().clone().requires_grad_(teacher_grad) for t in teachers]
    losses = ek.eofd_loss(ss, ts, mask=masks, reduction="none", backend=backend, **kwargs)
    grads = torch.autograd.grad(losses, ss + (ts if teacher_grad else []), go.to(losses))
    return losses.detach(), list(grads)


@backend_device
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_nan_or_inf_in_padding_changes_nothing(backend, device, poison):
    """Masked tokens never influence anything: the same bits as with zeros in the padding."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    m = torch.ones(2, 4, dtype=torch.bool)
    m[1, 3] = m[0, 0] = False
    poisoned_s, poisoned_t = s.clone(), t.clone()
    poisoned_s[~m], poisoned_t[~m] = poison, poison
    s[~m], t[~m] = 0.0, 0.0
    go = torch.tensor([1.5])
    clean = _grads(backend, [s.to(device)], [t.to(device)], [m.to(device)], go)
    dirty = _grads(backend, [poisoned_s.to(device)], [poisoned_t.to(device)], [m.to(device)], go)
    assert torch.equal(clean[0], dirty[0])
    for a, b in zip(clean[1], dirty[1]):
        assert torch.equal(a, b)
    torch.testing.assert_close(ek.teacher_weights(poisoned_t, mask=m),
                               ek.teacher_weights(t, mask=m), rtol=0, atol=0)


@backend_device
def test_empty_and_one_token_layers_with_zero_grad_leave_other_rows_zero(backend, device):
    """A fully masked layer (n' = 0) and a one-token layer (n' = 1) have NaN losses (like the
    reference); with a zero incoming grad, their masked rows get dS = dT = 0, not NaN."""
    g = torch.Generator().manual_seed(1)
    students = [torch.randn(2, 3, 4, generator=g, device="cpu").to(device) for _ in range(3)]
    teachers = [torch.randn(2, 3, 4, generator=g, device="cpu").to(device) for _ in range(3)]
    none = torch.zeros(2, 3, dtype=torch.bool, device=device)
    one = none.clone()
    one[1, 2] = True
    go = torch.tensor([0.0, 0.0, 1.0])
    losses, grads = _grads(backend, students, teachers, [none, one, None], go)
    assert losses[:2].isnan().all() and losses[2].isfinite()
    d_s, d_t = grads[:3], grads[3:]
    assert torch.count_nonzero(d_s[0]) == 0 and torch.count_nonzero(d_t[0]) == 0
    for grad in (d_s[1], d_t[1]):
        assert torch.count_nonzero(grad[~one]) == 0
    assert d_s[2].isfinite().all() and d_t[2].isfinite().all()


@backend_device
@pytest.mark.parametrize("as_list", ["list", "ParameterList"])
def test_learned_layer_weights_get_their_gradient(backend, device, as_list):
    g = torch.Generator().manual_seed(2)
    students = [torch.randn(2, 5, 6, generator=g).to(device) for _ in range(3)]
    teachers = [torch.randn(2, 5, 6, generator=g).to(device) for _ in range(3)]
    values = [0.5, 2.0, -1.0]
    params = [torch.nn.Parameter(torch.tensor(v, device=device)) for v in values]
    lam = params if as_list == "list" else torch.nn.ParameterList(params)
    ek.eofd_loss(students, teachers, layer_weights=lam, backend=backend).backward()
    stacked = torch.tensor(values, device=device, requires_grad=True)
    ek.eofd_loss(students, teachers, layer_weights=stacked, backend=backend).backward()
    per_layer = ek.eofd_loss(students, teachers, reduction="none", backend=backend)
    got = torch.stack([p.grad for p in params])
    assert torch.equal(got, stacked.grad) and torch.equal(got, per_layer.to(got.dtype))


def _constant_dim_layers(device):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.randn(3, 4, 5, generator=g, dtype=torch.float64) * 2
    t[..., 2] = 1.5  # a constant dim: sigma_2 = 0
    return s.to(device), t.to(device)


@backend_device
@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_constant_teacher_dim_gives_finite_agreed_gradients(backend, device, power):
    """sigma_d = 0: w_d = 0 ** p and the weights' slope there is taken as 0 (the dim's
    deviations T - mu_d are all 0, so any finite slope gives this dT): dT = -dS in that dim.
    Every backend gives the torch backend's values; at p = 0 they are the reference's too
    (plain MSE), and the other dims match it at p = 0 exactly as MSE does."""
    s, t = _constant_dim_layers(device)
    go = torch.tensor([0.75])
    loss, (d_s, d_t) = _grads(backend, [s], [t], [None], go, power=power)
    want_loss, (want_s, want_t) = _grads("torch", [s.cpu()], [t.cpu()], [None], go, power=power)
    assert d_t.isfinite().all() and d_s.isfinite().all()
    assert torch.equal(d_t[..., 2], -d_s[..., 2])
    assert rel_err(loss, want_loss) <= 1e-12
    assert rel_err(d_s, want_s) <= 1e-12 and rel_err(d_t, want_t) <= 1e-12
    if power == 0.0:
        ref_loss, ref_s, ref_t = oracle([s], [t], [None], power=0.0, grad_outputs=go)
        assert rel_err(loss, ref_loss) <= 1e-12
        assert rel_err(d_s, ref_s[0]) <= 1e-12 and rel_err(d_t, ref_t[0]) <= 1e-12


@backend_device
@pytest.mark.parametrize(("power", "dtype", "tol"), [
    (1e-300, torch.float32, 1e-6), (1e-30, torch.float32, 1e-6), (40.0, torch.float64, 1e-12),
], ids=["1e-300", "1e-30", "40"])
def test_tiny_and_huge_powers_are_not_rounded(backend, device, power, dtype, tol):
    """p is carried in float64: with fp32 inputs 1e-300 keeps a zero-sigma dim's weight at
    0 ** p = 0 (p rounded to fp32 is 0: weight 1). p = 40 multiplies the ratio's relative
    error by 40, so it is checked in fp64, where any rounding of p would still show."""
    s, t = _constant_dim_layers(device)
    got = ek.eofd_loss(s.to(dtype), t.to(dtype), power=power, backend=backend)
    want = ek.reference.eofd_loss_reference(s.cpu(), t.cpu(), power)
    assert rel_err(got, want) <= tol


def test_functorch_transforms_use_the_torch_backend():
    """torch.func.grad / vmap work with backend='auto' (the torch backend's plain ops) and
    give autograd's values; the fused backends say they do not support them."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    got = torch.func.grad(lambda x: ek.eofd_loss(x, t))(s)
    x = s.clone().requires_grad_()
    (want,) = torch.autograd.grad(ek.eofd_loss(x, t, backend="torch"), x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    batched = torch.func.vmap(lambda a, b: ek.eofd_loss(a, b))(s, t)
    looped = torch.stack([ek.eofd_loss(a, b, backend="torch") for a, b in zip(s, t)])
    torch.testing.assert_close(batched, looped, rtol=1e-6, atol=0)
    for backend in [b for b in ("ext", "triton") if b in ek.available_backends("cpu")]:
        with pytest.raises(RuntimeError, match=f"backend='{backend}' does not support torch.func"):
            torch.func.grad(lambda x, b=backend: ek.eofd_loss(x, t, backend=b))(s)


@backend_device
def test_fake_tensor_trace_runs_like_eager(backend, device):
    """Traced with fake tensors (make_fx, tracing_mode="fake": no value is read, the module's
    CPU training path is skipped), forward and backward give a graph that, run on real
    tensors, returns the eager loss and dS to the bit; and fake outputs carry the real
    shapes, dtypes and devices."""
    from torch.fx.experimental.proxy_tensor import make_fx

    module = ek.EOFDLoss(backend=backend)

    def step(s, t, m):
        s = s.detach().requires_grad_()
        loss = module(s, t, m)
        return loss, torch.autograd.grad(loss, s)[0]

    g = torch.Generator().manual_seed(5)
    s, t = (torch.randn(2, 4, 6, generator=g).to(device) for _ in range(2))
    m = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool, device=device)
    graph = make_fx(step, tracing_mode="fake")(s, t, m)
    with FakeTensorMode() as fake:
        fake_loss, fake_grad = step(fake.from_tensor(s), fake.from_tensor(t), fake.from_tensor(m))
    loss, grad = step(s, t, m)
    traced_loss, traced_grad = graph(s, t, m)
    assert torch.equal(traced_loss, loss) and torch.equal(traced_grad, grad)
    for a, b in ((fake_loss, loss), (fake_grad, grad)):
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)


@pytest.mark.parametrize("backend", ["ext", "triton"])
@pytest.mark.parametrize("final", [[2.0, 1.0], [1.0, 3.0]], ids=["forecast hit", "miss"])
def test_in_place_change_before_backward_is_always_an_error(backend, final):
    """S changed in place after the forward: a version-counter error on every path (the
    module's forecast hit or missed), never a gradient of values it did not see."""
    if backend not in ek.available_backends("cpu"):
        pytest.skip(f"{backend} cannot run here")
    module = ek.EOFDLoss(backend=backend, reduction="none")
    s = [torch.randn(2, 4, 6, requires_grad=True) for _ in range(2)]
    t = [torch.randn(2, 4, 6) for _ in range(2)]
    torch.autograd.grad(module(s, t), s, torch.tensor([2.0, 1.0]))  # the forecast: [2, 1]
    s_scaled = [x * 1 for x in s]
    losses = module(s_scaled, t)
    s_scaled[0].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(losses, s, torch.tensor(final))


BAD = [
    (dict(student=torch.randn(2, 3, 4).to_sparse()), TypeError,
     "layer 0: student must be a dense (strided) tensor"),
    (dict(student=torch.randn(2, 3, 4, dtype=torch.complex64)), TypeError,
     "layer 0: student must be float16/bfloat16/float32/float64, got torch.complex64"),
    (dict(teacher=torch.randn(2, 3, 4, device="meta")), ValueError,
     "layer 0: teacher is a meta tensor"),
    (dict(layer_weights="ab"), TypeError, "layer_weights: expected a tensor or a sequence"),
    (dict(layer_weights=["a"]), TypeError, "layer_weights[0]: expected a number"),
    # Checked on the device (no host read): a RuntimeError, at once on a CPU.
    (dict(mask=torch.tensor([[1.0, 0.5, 1.0], [1.0, 1.0, 0.0]])), RuntimeError,
     "mask[0]: a torch.float32 mask must hold only 0 and 1"),
    (dict(mask=torch.ones(2, 3).to_sparse()), TypeError,
     "mask[0]: must be a dense (strided) tensor"),
    (dict(power=True), TypeError, "power: expected a Python float, got bool"),
    (dict(reduction=["sum"]), ValueError, "reduction: expected one of"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_names_the_argument(kwargs, error, message):
    kwargs = {"student": torch.randn(2, 3, 4), "teacher": torch.randn(2, 3, 4), **kwargs}
    with pytest.raises(error) as info:
        ek.eofd_loss(kwargs.pop("student"), kwargs.pop("teacher"), **kwargs)
    assert message in str(info.value)


def test_construction_and_helpers_check_their_arguments():
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        ek.EOFDLoss(backend="bogus")
    with pytest.raises(TypeError, match="power: expected a Python float, got bool"):
        ek.EOFDLoss(power=True)
    with pytest.raises(ValueError, match="teacher must have shape"):
        ek.teacher_weights(torch.randn(5))
    with pytest.raises(TypeError, match="device: expected None, a str or a torch.device"):
        ek.available_backends(3)
    for nbytes in (-1, 2 ** 63):  # 2 ** 63 does not fit the op's int64
        with pytest.raises(ValueError, match=r"nbytes: expected an int in \[0, 2\*\*63\)"):
            ek.set_cpu_cache_limit(nbytes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_no_gpu_no_cuda_backends():
    from eofd_kernels.backends import pick_backend

    assert ek.available_backends("cuda") == ["torch", "reference"]
    if "triton" in ek.available_backends("cpu"):  # installed: the reason is the missing GPU
        with pytest.raises(RuntimeError, match="no CUDA device is available"):
            pick_backend("triton", torch.device("cuda"))


@needs_ext
def test_cpu_cache_can_be_emptied_and_limited():
    """The CPU ops' buffer cache: freed gradients stay cached (faulted in) until
    empty_cpu_cache hands them back; a limit of 0 caches nothing."""
    s = torch.randn(8, 64, 256, requires_grad=True)
    t = torch.randn(8, 64, 256)
    limit = ek.cpu_cache_info()["limit_bytes"]
    try:
        ek.empty_cpu_cache()
        (grad,) = torch.autograd.grad(ek.eofd_loss(s, t, backend="ext"), s)
        del grad
        assert ek.cpu_cache_info()["cached_bytes"] >= s.numel() * 4
        assert ek.empty_cpu_cache() >= s.numel() * 4
        assert ek.cpu_cache_info()["cached_bytes"] == 0
        ek.set_cpu_cache_limit(0)
        (grad,) = torch.autograd.grad(ek.eofd_loss(s, t, backend="ext"), s)
        del grad
        assert ek.cpu_cache_info() == {"cached_bytes": 0, "limit_bytes": 0}
    finally:
        ek.set_cpu_cache_limit(limit)
