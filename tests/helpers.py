"""Shared helpers: which backends run here, running one with gradients, error measures."""

from __future__ import annotations

import torch

import eofd_kernels as ek

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Every backend that can run here, on every device here, except the oracle itself.
BACKEND_DEVICES = [(b, d) for d in DEVICES for b in ek.available_backends(d) if b != "reference"]
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKEND_DEVICES]


def run_backend(backend, students, teachers, masks, *, power=0.5, eps=0.0, grad_outputs=None,
                teacher_grad=True):
    """Per-layer losses and (dS, dT) of ``backend``; dT is [] unless ``teacher_grad``."""
    ss = [s.detach().requires_grad_() for s in students]
    ts = [t.detach().requires_grad_(teacher_grad) for t in teachers]
    losses = ek.eofd_loss(ss, ts, mask=masks, power=power, eps=eps, reduction="none",
                          backend=backend)
    go = torch.ones_like(losses) if grad_outputs is None else grad_outputs.to(losses)
    grads = torch.autograd.grad(losses, ss + (ts if teacher_grad else []), go)
    return losses.detach(), list(grads[:len(ss)]), list(grads[len(ss):])


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise relative error max|x - ref| / max|ref| in float64."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()
