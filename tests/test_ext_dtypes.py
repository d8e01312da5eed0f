"""The extension keeps each side's dtype (docs/design.md, "Numerics"): its kernels read the
students and the teachers in their own dtypes and write dS in the student's, dT in the
teacher's, with no promoted copies; a mixed pair computes in the accumulation type of the
promoted pair, so every output has the bits the old promote-then-cast-back path gave.

"Old path" below is the extension run on copies of both sides promoted to their common dtype,
its gradients cast back to each input's dtype (``_promoted_sides``, what ext_backend did
before). Tolerances against the float64 oracle: TOL of the accumulation type (as in
test_backends.py: fp64 1e-10, fp32 1e-6), plus half an ulp of an output narrower than it (the
one rounding of dS or dT to its side's dtype).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import eofd_kernels as ek
from eofd_kernels.backends import ext_backend, get_backend
from eofd_kernels.inputs import prepare_layers

from .cases import CASES, build, oracle
from .helpers import DEVICES, rel_err, run_backend

pytestmark = pytest.mark.skipif("ext" not in ek.available_backends("cpu"),
                                reason="the extension is not built")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
PAIRS = list(itertools.product(DTYPES, DTYPES))
PAIR_IDS = [f"{str(s)[6:]}-{str(t)[6:]}" for s, t in PAIRS]
EXT_DEVICES = [d for d in DEVICES if "ext" in ek.available_backends(d)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-6}


def _promoted_sides(batch):
    """The old ext path's inputs: both sides in their common dtype (copies where it differs)."""
    dtype = batch.students[0].dtype
    for x in batch.students + batch.teachers:
        dtype = torch.promote_types(dtype, x.dtype)
    return [s.to(dtype) for s in batch.students], [t.to(dtype) for t in batch.teachers]


@pytest.fixture
def old_path(monkeypatch):
    """Makes the ext backend promote across sides again (its gradients are cast back to each
    input's dtype by the backend, as before)."""
    monkeypatch.setattr(ext_backend, "kernel_sides", _promoted_sides)


def _layers(case, student_dtype, teacher_dtype, device):
    """The case's layers with the student in one dtype and the teacher in another."""
    students, _, masks = build(case, student_dtype, device)
    _, teachers, _ = build(case, teacher_dtype, device)
    return students, teachers, masks


def _accumulator(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _tol(output_dtype, acc):
    rounding = torch.finfo(output_dtype).eps / 2 if output_dtype.itemsize < acc.itemsize else 0
    return TOL[acc] + rounding


def _bitwise(got, want):
    """Same dtypes, shapes and bits (NaN in the same places with the same payload)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("device", EXT_DEVICES)
@pytest.mark.parametrize(("student_dtype", "teacher_dtype"), PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pair_has_the_promoted_paths_bits(device, student_dtype, teacher_dtype, case,
                                          monkeypatch):
    layers = _layers(case, student_dtype, teacher_dtype, device)
    backend = get_backend("ext", torch.device(device))
    batch = prepare_layers(*layers)
    go = torch.linspace(-1.5, 2.0, batch.num_layers, dtype=torch.float64)
    new = (run_backend("ext", *layers, grad_outputs=go), backend.forward(batch, 0.5, 0.0)[1])
    monkeypatch.setattr(ext_backend, "kernel_sides", _promoted_sides)
    old = (run_backend("ext", *layers, grad_outputs=go), backend.forward(batch, 0.5, 0.0)[1])
    (loss, ds, dt), dim_stats = new
    (old_loss, old_ds, old_dt), old_dim_stats = old
    _bitwise(loss, old_loss)
    _bitwise(dim_stats, old_dim_stats)
    assert [g.dtype for g in ds] == [student_dtype] * len(ds)
    assert [g.dtype for g in dt] == [teacher_dtype] * len(dt)
    for g, old_g in zip(ds + dt, old_ds + old_dt):
        _bitwise(g, old_g)

    acc = _accumulator(student_dtype, teacher_dtype)
    assert loss.dtype == acc
    want_loss, want_ds, want_dt = oracle(*layers, grad_outputs=go)
    assert rel_err(loss, want_loss) <= TOL[acc]
    for i, (g, w) in enumerate(zip(ds, want_ds)):
        assert rel_err(g, w) <= _tol(student_dtype, acc), f"dS of layer {i}"
    for i, (g, w) in enumerate(zip(dt, want_dt)):
        # A 16-bit teacher makes the outlier case's dims (1e4 + 0.1 x) constant, where the
        # reference's dT is NaN and ours finite (docs/design.md, "Degenerate data"): compared
        # where the reference is finite.
        finite = w.isfinite()
        assert rel_err(g[finite], w[finite]) <= _tol(teacher_dtype, acc), f"dT of layer {i}"


class _InputCopies(TorchDispatchMode):
    """Records every op that copies or converts a tensor of one of ``inputs``' sizes."""

    COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default,
              torch.ops.aten.clone.default, torch.ops.aten.to.dtype}

    def __init__(self, inputs):
        super().__init__()
        self.sizes = {x.numel() for x in inputs}
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.COPIES:
            self.seen += [(str(func), a.dtype, a.numel()) for a in args
                          if isinstance(a, torch.Tensor) and a.numel() in self.sizes]
        return func(*args, **(kwargs or {}))


def _training_steps(make_loss, students, teachers, steps=2):
    """`steps` forward and backward calls of make_loss() on the layers; dS of the last one."""
    for _ in range(steps):
        ss = [s.detach().requires_grad_() for s in students]
        loss = make_loss(ss, teachers)
        grads = torch.autograd.grad(loss, ss)
    return loss.detach(), list(grads)


@pytest.mark.parametrize(("student_dtype", "teacher_dtype"),
                         [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                          (torch.float16, torch.float64)], ids=str)
@pytest.mark.parametrize("entry", ["function", "module"])
def test_mixed_pair_makes_no_input_copy(student_dtype, teacher_dtype, entry):
    """No input is converted or copied on the way to the kernels, nor a gradient on the way
    back: through the functional loss (forward and backward ops) and the module (the CPU
    training forward, which writes dS in the forward)."""
    students, teachers, masks = _layers(CASES[3], student_dtype, teacher_dtype, "cpu")
    module = ek.EOFDLoss(backend="ext")
    make_loss = {
        "function": lambda ss, ts: ek.eofd_loss(ss, ts, mask=masks, backend="ext"),
        "module": lambda ss, ts: module(ss, ts, mask=masks),
    }[entry]
    with _InputCopies(students + teachers) as copies:
        _, grads = _training_steps(make_loss, students, teachers)
    assert copies.seen == []
    assert [g.dtype for g in grads] == [student_dtype] * len(grads)


def test_no_copy_check_sees_the_old_paths_copies(old_path):
    """The check above can fail: the old path's promoted copies are seen."""
    students, teachers, masks = _layers(CASES[0], torch.bfloat16, torch.float32, "cpu")
    with _InputCopies(students + teachers) as copies:
        _training_steps(lambda ss, ts: ek.eofd_loss(ss, ts, mask=masks, backend="ext"),
                        students, teachers)
    assert any(dtype == torch.bfloat16 for _, dtype, _ in copies.seen)


@pytest.mark.parametrize(("student_dtype", "teacher_dtype"),
                         [(torch.bfloat16, torch.float32), (torch.float64, torch.float16)],
                         ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("mixed", "wide")],
                         ids=lambda c: c.name)
def test_module_training_steps_have_the_promoted_paths_bits(student_dtype, teacher_dtype, case,
                                                            monkeypatch):
    """EOFDLoss over two steps (the second through the CPU training forward's dS) and
    eofd_projected_loss, against the old path."""
    students, teachers, masks = _layers(case, student_dtype, teacher_dtype, "cpu")

    def run():
        module = ek.EOFDLoss(backend="ext")
        module_out = _training_steps(lambda ss, ts: module(ss, ts, mask=masks), students,
                                     teachers)
        xs = [s.detach().requires_grad_() for s in students]
        eyes = [torch.eye(s.shape[-1], dtype=student_dtype) for s in students]
        projected = ek.eofd_projected_loss(xs, eyes, None, teachers, mask=masks, backend="ext",
                                           chunk_rows=64)
        return module_out, (projected.detach(), list(torch.autograd.grad(projected, xs)))

    new = run()
    monkeypatch.setattr(ext_backend, "kernel_sides", _promoted_sides)
    old = run()
    for (loss, grads), (old_loss, old_grads) in zip(new, old):
        _bitwise(loss, old_loss)
        for g, old_g in zip(grads, old_grads):
            _bitwise(g, old_g)


def test_mixed_dtypes_within_a_side_are_promoted_within_that_side():
    """Students of two dtypes run as their common dtype (teachers keep theirs); each gradient
    comes back in its own layer's dtype, with the bits of the old path."""
    case = next(c for c in CASES if c.name == "multi")
    students, teachers, masks = build(case, torch.float32, "cpu")
    students[0] = students[0].to(torch.bfloat16)
    teachers = [t.to(torch.float16) for t in teachers]
    loss, ds, dt = run_backend("ext", students, teachers, masks)
    assert [g.dtype for g in ds] == [torch.bfloat16, torch.float32, torch.float32]
    assert [g.dtype for g in dt] == [torch.float16] * 3
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ext_backend, "kernel_sides", _promoted_sides)
        old_loss, old_ds, old_dt = run_backend("ext", students, teachers, masks)
    for g, old_g in zip([loss, *ds, *dt], [old_loss, *old_ds, *old_dt]):
        _bitwise(g, old_g)


@pytest.mark.parametrize("side", ["students", "teachers"])
def test_op_refuses_mixed_dtypes_within_a_side(side):
    """The op itself reads one dtype per side: a clear error naming the layer and the dtypes."""
    batch = prepare_layers(*build(CASES[1], torch.float32, "cpu"))  # three layers
    students, teachers = batch.students, batch.teachers
    mixed = {"students": students, "teachers": teachers}[side]
    mixed[2] = mixed[2].to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"layer 2: every student must be Float and every "
                                           r"teacher Float \(layer 0's\), got "
                                           + ("BFloat16 and Float" if side == "students"
                                              else "Float and BFloat16")):
        torch.ops.eofd_ext.forward(students, teachers, batch.masks, 0.5, 0.0)


def test_op_refuses_a_dtype_the_kernels_lack():
    batch = prepare_layers(*build(CASES[0], torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match="teachers must be float16/bfloat16/float32/float64, "
                                           "got Int"):
        torch.ops.eofd_ext.forward(batch.students, [t.int() for t in batch.teachers],
                                   batch.masks, 0.5, 0.0)


def test_ops_pass_opcheck_with_a_mixed_pair():
    """The fake impls agree with the kernels on every output's dtype for a mixed pair."""
    batch = prepare_layers(*_layers(CASES[3], torch.bfloat16, torch.float32, "cpu"))
    args = (batch.students, batch.teachers, batch.masks, 0.5, 0.0)
    grads = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    ops = torch.ops.eofd_ext
    torch.library.opcheck(ops.forward.default, args)
    torch.library.opcheck(ops.forward_and_grad.default, (*args, grads, 1 << 20))
    dim_stats = ops.forward(*args)[1]
    torch.library.opcheck(ops.backward.default, (grads, *args[:3], dim_stats, True))


def test_compiled_mixed_pair_matches_eager():
    """torch.compile(fullgraph=True) traces a mixed pair (the fakes' dtypes) to the eager bits."""
    students, teachers, masks = _layers(CASES[3], torch.bfloat16, torch.float32, "cpu")
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(ss, ts):
        return ek.eofd_loss(ss, ts, mask=masks, reduction="none", backend="ext")

    ss = [s.detach().requires_grad_() for s in students]
    ts = [t.detach().requires_grad_() for t in teachers]
    losses = step(ss, ts)
    grads = torch.autograd.grad(losses, ss + ts, torch.ones_like(losses))
    want_loss, want_ds, want_dt = run_backend("ext", students, teachers, masks)
    for g, w in zip([losses.detach(), *grads], [want_loss, *want_ds, *want_dt]):
        _bitwise(g, w)
