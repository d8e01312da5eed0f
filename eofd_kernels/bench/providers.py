"""What the benchmarks time: the eager and compiled paper code, plain MSE (the "no weighting"
baseline, eager and compiled) and our backends, as forward or forward+backward steps."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..backends import available_backends
from ..backends.availability import interpreting
from ..loss import EOFDLoss
from ..reference import eofd_loss_reference
from ..synthetic import student_near, teacher_states
from .shapes import Shape

__all__ = ["BASELINES", "MODES", "make_inputs", "make_step", "providers"]

MODES = ("fwd", "fwd+bwd")
BASELINES = ("eager ref", "compiled ref", "mse eager", "mse compiled")


def _reference_sum(students, teachers, power: float):
    return sum(eofd_loss_reference(s, t, power) for s, t in zip(students, teachers))


def _mse_sum(students, teachers):
    return sum(F.mse_loss(s, t) for s, t in zip(students, teachers))


def providers(device: torch.device) -> list[str]:
    """The baselines, then every backend of ours that runs natively on ``device``."""
    ours = [b for b in available_backends(device) if b != "reference"]
    if device.type == "cpu" and interpreting():
        ours = [b for b in ours if b != "triton"]  # the interpreter is a test tool, not a backend
    return list(BASELINES) + ours


def _loss_fn(provider: str, power: float) -> Callable:
    if provider in ("eager ref", "compiled ref"):
        fn = functools.partial(_reference_sum, power=power)
    elif provider in ("mse eager", "mse compiled"):
        fn = _mse_sum
    else:  # the module a training loop holds (on CPU its forward can write dS: GradAhead)
        fn = EOFDLoss(power=power, backend=provider)
    # Specialised to the point's shapes; the sweep resets dynamo's caches at every point.
    return torch.compile(fn, dynamic=False) if "compiled" in provider else fn


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """``shape.layers`` (student, teacher) pairs ``(B, N, d)``; teachers carry outlier dims."""
    g = torch.Generator(device=device).manual_seed(seed)
    students, teachers = [], []
    for _ in range(shape.layers):
        t = teacher_states((shape.batch, shape.seq, shape.d), g)
        students.append(student_near(t, g).to(dtype))
        teachers.append(t.to(dtype))
    return students, teachers


def make_step(provider: str, mode: str, students, teachers, power: float = 0.5) -> Callable:
    """A no-argument step: the loss (``fwd``) or the loss and dS (``fwd+bwd``, frozen teacher,
    the training case). Student leaves are made once, outside the timed call."""
    loss_fn = _loss_fn(provider, power)
    if mode == "fwd":
        return functools.partial(loss_fn, students, teachers)
    leaves = [s.detach().requires_grad_() for s in students]

    def step():
        return torch.autograd.grad(loss_fn(leaves, teachers), leaves)

    return step
