"""A training call reads nothing back to the host: on a GPU each read is a device sync (and
illegal during CUDA-graph capture). Counted on CPU tensors, where the same code runs: every
``item``, ``bool``, ``float``, ``int``, ``tolist``, ``numpy``, ``torch.equal``, and every
``torch.tensor`` / ``as_tensor`` of Python data, made from the package's own frames during
forward + backward, with an int64 mask (what Hugging Face tokenizers give) and float layer
weights, on every backend and entry point: zero.

Allowed, each for a reason that holds on a GPU:

* the extension's CPU training step compares the incoming grads with its forecast
  (``GradAhead.matches``, two small CPU vectors); it exists only for CPU tensors, where there
  is no device to synchronise with;
* Triton's interpreter reads its launch tables from CPU tensors built per call
  (``triton_kernels._table`` on a CPU device). On a GPU the tables come from the memo in
  ``device_tables.py`` instead: written to pinned memory and copied ``non_blocking`` on the
  stream, never a blocking copy (tests/test_device_tables.py simulates it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import eofd_kernels as ek
from eofd_kernels.distill import DistillationLoss, HiddenProjection

from .helpers import BACKEND_DEVICES, BACKEND_IDS

PACKAGE = str(Path(ek.__file__).parent)
# (owner, attribute): patched on the class or module, so the autograd engine's backward calls
# are seen too (a TorchFunctionMode is not active there).
READS = [(torch.Tensor, name) for name in ("item", "__bool__", "__float__", "__int__",
                                           "__index__", "tolist", "numpy")]
READS += [(torch, name) for name in ("equal", "tensor", "as_tensor")]
ALLOWED = ("GradAhead.matches", "_table (triton_kernels.py")


class HostReads:
    """Records the package frame of every host read made while active."""

    def __init__(self):
        self.reads: list[str] = []
        self._saved: list = []

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
                where = (f"{frame.f_code.co_qualname} ({Path(frame.f_code.co_filename).name}:"
                         f"{frame.f_lineno}): {name}")
                if not any(allowed in where for allowed in ALLOWED):
                    self.reads.append(where)
            return original(*args, **kwargs)

        return counted

    def __enter__(self):
        for owner, name in READS:
            original = getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def _layers(num_layers=3, d=16):
    g = torch.Generator().manual_seed(0)
    teachers = [torch.randn(2, 9, d, generator=g) for _ in range(num_layers)]
    students = [(t + 0.2 * torch.randn(t.shape, generator=g)).requires_grad_() for t in teachers]
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, 6:] = 0
    return students, teachers, mask


def _steps(entry, backend):
    """Forward + backward of ``entry``, three steps (the module's forecast hits and misses)."""
    students, teachers, mask = _layers()
    lambdas = [1.0, 0.5, 2.0]
    module = ek.EOFDLoss(backend=backend)
    widths = HiddenProjection(12, 16, 3)
    objective = DistillationLoss([(1, 1), (2, 2), (3, 3)], widths, backend=backend,
                                 use_logits=False)
    xs = [torch.randn(2, 9, 12).requires_grad_() for _ in range(3)]

    class Out:  # a Hugging Face model output's hidden states
        def __init__(self, states):
            self.hidden_states = [None, *states]

    for scale in (1.0, 1.0, 3.0):
        if entry == "eofd_loss":
            loss = ek.eofd_loss(students, teachers, mask=mask, layer_weights=lambdas,
                                backend=backend)
        elif entry == "EOFDLoss":
            loss = module(students, teachers, mask=mask, layer_weights=lambdas)
        elif entry == "eofd_projected_loss":
            loss = ek.eofd_projected_loss(xs, [m.weight for m in widths.layer_maps()],
                                          [m.bias for m in widths.layer_maps()], teachers,
                                          mask=mask, layer_weights=lambdas, backend=backend)
        else:
            loss = objective(Out(xs), Out(teachers), mask).loss
        (loss * scale).backward()


@pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICES + [("reference", "cpu")],
                         ids=BACKEND_IDS + ["reference-cpu"])
@pytest.mark.parametrize("entry", ["eofd_loss", "EOFDLoss", "eofd_projected_loss",
                                   "DistillationLoss"])
def test_training_calls_read_nothing_back(backend, device, entry):
    if backend == "reference" and entry in ("eofd_projected_loss", "DistillationLoss"):
        pytest.skip("the reference refuses the fused projection")
    _steps(entry, backend)  # warm: first-call imports and caches are not the steady state
    with HostReads() as mode:
        _steps(entry, backend)
    assert mode.reads == []


def test_the_counter_sees_a_read():
    """The counter is not blind: a package function that reads is caught."""
    from eofd_kernels import inputs

    with HostReads() as mode:
        inputs.check_power_eps(0.5, 0.0)
        torch.ones(2).sum().item()  # from the test's frame: not the package's
    assert mode.reads == []
    original = inputs.check_reduction

    def reading(reduction):
        torch.ones(1).item()
        return original(reduction)

    reading.__code__ = reading.__code__.replace(co_filename=inputs.__file__)
    with HostReads() as mode:
        reading("sum")
    assert len(mode.reads) == 1 and "item" in mode.reads[0]
