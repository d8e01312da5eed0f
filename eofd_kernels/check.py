"""``eofd-kernels check``: every backend here against the float64 reference on built-in cases."""

from __future__ import annotations

import functools

import torch

from .backends import available_backends
from .loss import eofd_loss
from .reference import masked_reference_losses
from .synthetic import student_near, teacher_states
from .timing import median, time_ms

__all__ = ["CHECK_CASES", "run_check"]

# name -> (layer shapes (B, N, d), masked)
CHECK_CASES = {
    "one layer (8x128x768)": ([(8, 128, 768)], False),
    "12 BERT-base layers": ([(8, 128, 768)] * 12, False),
    "masked (8x128x768, padding)": ([(8, 128, 768)], True),
    "3 shapes (T5 enc/dec + wide)": ([(8, 128, 512), (8, 32, 512), (4, 64, 1024)], True),
}


def _make_case(shapes, masked: bool, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    students, teachers, masks = [], [], []
    for b, n, d in shapes:
        t = teacher_states((b, n, d), g)
        students.append(student_near(t, g).to(device))
        teachers.append(t.to(device))
        lengths = torch.randint(n // 2, n + 1, (b, 1), generator=g)
        masks.append((torch.arange(n) < lengths).to(device) if masked else None)
    return students, teachers, masks


def _loss_and_grads(students, teachers, masks, backend):
    ss = [s.detach().requires_grad_() for s in students]
    if backend == "reference":
        loss = masked_reference_losses(ss, teachers, masks).sum()
    else:
        loss = eofd_loss(ss, teachers, mask=masks, backend=backend)
    return loss, torch.autograd.grad(loss, ss)


def _max_rel(got, want) -> float:
    return max(((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))


def run_check(device: torch.device | str | None = None, reps: int = 5, print_fn=print) -> bool:
    """Print one table row per (case, backend); return False if any backend misses 1e-5."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = available_backends(device)
    print_fn(f"device: {device}; backends: {', '.join(backends)}")
    print_fn(f"{'case':32} {'backend':10} {'loss rel err':>12} {'dS rel err':>11} "
             f"{'fwd+bwd ms':>11} {'vs eager ref':>12}")
    ok = True
    for name, (shapes, masked) in CHECK_CASES.items():
        students, teachers, masks = _make_case(shapes, masked, device)
        exact_loss, exact_ds = _loss_and_grads([s.double() for s in students],
                                               [t.double() for t in teachers], masks, "reference")
        base_ms = None
        for backend in ["reference"] + [b for b in backends if b != "reference"]:
            loss, ds = _loss_and_grads(students, teachers, masks, backend)
            loss_err = _max_rel([loss], [exact_loss])
            ds_err = _max_rel(ds, exact_ds)
            step = functools.partial(_loss_and_grads, students, teachers, masks, backend)
            ms = median(time_ms(step, device, reps=reps))
            base_ms = base_ms or ms
            if backend != "reference":
                ok &= max(loss_err, ds_err) <= 1e-5
            print_fn(f"{name:32} {backend:10} {loss_err:12.2e} {ds_err:11.2e} {ms:11.2f} "
                     f"{base_ms / ms:11.2f}x")
    return ok
