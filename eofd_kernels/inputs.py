"""Validation and normalisation of the public API's arguments.

Every backend receives the same :class:`LayerBatch`: the caller's ``(..., d_l)`` tensors as they
are (each backend views them as ``(tokens, d_l)`` rows where it needs to: the fused ops do it
inside, so autograd records no view nodes), a flat boolean mask or ``None`` per layer, and a
checked power/eps. All checks here read shapes, dtypes and devices only: no device sync.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["LayerBatch", "REDUCTIONS", "check_power_eps", "check_reduction", "check_weights",
           "prepare_layers", "reduce_layers"]

REDUCTIONS = ("sum", "mean", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LayerBatch:
    """The distilled layers of one call.

    students[l], teachers[l]: the caller's ``(..., d_l)`` tensors, same shape; n_l tokens.
    masks[l]: ``(n_l,)`` contiguous bool over the flattened tokens, or ``None`` when every
        token counts.
    """

    students: list[torch.Tensor]
    teachers: list[torch.Tensor]
    masks: list[torch.Tensor | None]

    @property
    def num_layers(self) -> int:
        return len(self.students)

    @property
    def result_dtype(self) -> torch.dtype:
        """float64 when any input is float64, else float32 (accumulation is never below fp32)."""
        wide = any(t.dtype == torch.float64 for t in self.students + self.teachers)
        return torch.float64 if wide else torch.float32


def _as_layer_list(x, name: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        layers = list(x)
        if not layers:
            raise ValueError(f"{name}: expected a tensor or a non-empty sequence, got []")
        for i, t in enumerate(layers):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        return layers
    raise TypeError(f"{name}: expected a tensor or a sequence of tensors, got {type(x).__name__}")


def _check_pair(i: int, s: torch.Tensor, t: torch.Tensor, names: tuple[str, str],
                min_tokens: int) -> None:
    # One cheap test for the usual case (it runs per layer on every training step); the
    # checks after it explain which part of it failed.
    if (s.shape == t.shape and s.dim() >= 2 and s.dtype in _FLOAT_DTYPES
            and t.dtype in _FLOAT_DTYPES and s.device == t.device and s.shape[-1] > 0
            and s.numel() >= min_tokens * s.shape[-1] and s.layout == t.layout == torch.strided
            and s.device.type != "meta"):
        return
    where = f"layer {i}: "
    for name, x in zip(names, (s, t)):
        if x.layout != torch.strided:
            raise TypeError(f"{where}{name} must be a dense (strided) tensor, got {x.layout}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{where}{name} must be float16/bfloat16/float32/float64, got {x.dtype}"
            )
        if x.device.type == "meta":
            raise ValueError(f"{where}{name} is a meta tensor (no values to compute on); "
                             "use FakeTensorMode or torch.compile to trace shapes")
        if x.dim() < 2:
            raise ValueError(
                f"{where}{name} must have shape (..., d) with at least one token dim, "
                f"got shape {tuple(x.shape)}"
            )
        if x.numel() == 0:
            raise ValueError(f"{where}{name} is empty (shape {tuple(x.shape)})")
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"{where}student hidden size {s.shape[-1]} != teacher hidden size {t.shape[-1]} "
            f"(student {tuple(s.shape)}, teacher {tuple(t.shape)}); project the student first"
        )
    if s.shape != t.shape:
        raise ValueError(
            f"{where}student shape {tuple(s.shape)} != teacher shape {tuple(t.shape)}"
        )
    if s.device != t.device:
        raise ValueError(f"{where}student is on {s.device} but teacher is on {t.device}")
    if s.numel() // s.shape[-1] < min_tokens:
        raise ValueError(
            f"{where}the teacher std needs at least 2 tokens, got shape {tuple(t.shape)}"
        )


def _check_mask_values(i: int, m: torch.Tensor) -> None:
    """A non-bool mask must hold only 0 and 1 (0.5 is not a token weight). Checked on the
    device (``_assert_async``): no host read, so no sync on a GPU, where a bad value stops
    the program at the next synchronisation with this message; on a CPU it raises here."""
    if torch._subclasses.fake_tensor.is_fake(m):
        return
    torch._assert_async(((m == 0) | (m == 1)).all(),
                        f"mask[{i}]: a {m.dtype} mask must hold only 0 and 1 (or be bool)")


def _check_mask(i: int, m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"mask[{i}]: expected a torch.Tensor or None, got {type(m).__name__}")
    if m.shape != t.shape[:-1]:
        raise ValueError(
            f"mask[{i}]: shape {tuple(m.shape)} != the leading shape {tuple(t.shape[:-1])} "
            f"of layer {i} (teacher {tuple(t.shape)})"
        )
    if m.device != t.device:
        raise ValueError(f"mask[{i}]: on {m.device} but layer {i} is on {t.device}")
    if m.layout != torch.strided:
        raise TypeError(f"mask[{i}]: must be a dense (strided) tensor, got {m.layout}")
    if m.is_complex():
        raise TypeError(f"mask[{i}]: expected bool or 0/1 values, got {m.dtype}")
    if m.dtype == torch.bool:
        return m.reshape(-1).contiguous()
    _check_mask_values(i, m)
    return (m != 0).reshape(-1).contiguous()


def _masks_per_layer(mask, teachers: list[torch.Tensor]) -> list[torch.Tensor | None]:
    num_layers = len(teachers)
    if mask is None:
        return [None] * num_layers
    if isinstance(mask, torch.Tensor):
        # One mask for every layer whose leading shape it matches (an encoder's attention mask
        # over all encoder layers; a T5 decoder layer of another length keeps all its tokens).
        matching = [t.shape[:-1] == mask.shape for t in teachers]
        if not any(matching):
            shapes = sorted({tuple(t.shape[:-1]) for t in teachers})
            raise ValueError(
                f"mask: shape {tuple(mask.shape)} matches the leading shape of no layer "
                f"(layers have {shapes})"
            )
        first = matching.index(True)
        checked = _check_mask(first, mask, teachers[first])  # one check for every layer
        return [checked if ok else None for ok in matching]
    if isinstance(mask, Sequence) and not isinstance(mask, (str, bytes)):
        masks = list(mask)
        if len(masks) != num_layers:
            raise ValueError(f"mask: got {len(masks)} masks for {num_layers} layers")
        return [None if m is None else _check_mask(i, m, t) for i, (m, t) in
                enumerate(zip(masks, teachers))]
    raise TypeError(f"mask: expected None, a tensor or a sequence, got {type(mask).__name__}")


def prepare_layers(student, teacher, mask=None,
                   names: tuple[str, str] = ("student", "teacher"),
                   min_tokens: int = 2) -> LayerBatch:
    """Check the layers and masks of one call; ``names`` are the arguments' names in errors.
    ``min_tokens``: tokens a layer needs by shape (1 for a rank's shard of a split batch: the
    std is the whole batch's)."""
    students = _as_layer_list(student, names[0])
    teachers = _as_layer_list(teacher, names[1])
    if len(students) != len(teachers):
        raise ValueError(
            f"student has {len(students)} layers but teacher has {len(teachers)} layers"
        )
    for i, (s, t) in enumerate(zip(students, teachers)):
        _check_pair(i, s, t, names, min_tokens)
    devices = {t.device for t in teachers}
    if len(devices) > 1:
        raise ValueError(f"all layers must be on one device, got {sorted(map(str, devices))}")
    masks = _masks_per_layer(mask, teachers)
    return LayerBatch(students=students, teachers=teachers, masks=masks)


def check_power_eps(power, eps) -> tuple[float, float]:
    """Return ``(power, eps)`` as Python floats; both must be finite, eps >= 0. While
    ``torch.compile`` traces, only their types are checked: with ``dynamic=True`` they are
    symbolic, and checking their values would specialise the graph on them (``EOFDLoss``
    checks them at construction, an eager call on every call)."""
    for name, value in (("power", power), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymFloat)):
            raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
    if torch.compiler.is_compiling():
        return power, eps
    for name, value in (("power", power), ("eps", eps)):
        if not math.isfinite(value):
            raise ValueError(f"{name}: must be finite, got {value}")
    if eps < 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    return float(power), float(eps)


def _layer_weight_items(layer_weights, num_layers: int) -> list:
    """The lambdas of a sequence: Python numbers, or one-element tensors (kept with their
    graph: a ParameterList of learned weights)."""
    if isinstance(layer_weights, (str, bytes)) or not hasattr(layer_weights, "__iter__"):
        raise TypeError(f"layer_weights: expected a tensor or a sequence of numbers, got "
                        f"{type(layer_weights).__name__}")
    items = list(layer_weights)
    for i, x in enumerate(items):
        numeric = isinstance(x, (int, float)) and not isinstance(x, bool)
        if not (numeric or (isinstance(x, torch.Tensor) and x.numel() == 1)):
            raise TypeError(f"layer_weights[{i}]: expected a number or a one-element tensor, "
                            f"got {type(x).__name__}")
    if len(items) != num_layers:
        raise ValueError(f"layer_weights: expected {num_layers} weights (one per layer), "
                         f"got {len(items)}")
    return items


def _check_lambda_tensor(lam: torch.Tensor, losses: torch.Tensor, name: str) -> None:
    if not (lam.is_floating_point() or lam.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name}: expected real numbers, got {lam.dtype}")
    if lam.device != losses.device:
        raise ValueError(f"{name}: on {lam.device} but the layers are on {losses.device}")


def _weighted_layers(losses: torch.Tensor, layer_weights) -> torch.Tensor:
    """``lambda_l * loss_l``. Python numbers multiply as scalars (no host-to-device copy per
    call); tensors keep their graph, so learned lambdas get gradients."""
    num_layers = losses.shape[0]
    if isinstance(layer_weights, torch.Tensor):
        _check_lambda_tensor(layer_weights, losses, "layer_weights")
        if layer_weights.shape != (num_layers,):
            raise ValueError(f"layer_weights: expected {num_layers} weights (one per layer), "
                             f"got shape {tuple(layer_weights.shape)}")
        return losses * layer_weights.to(losses.dtype)
    items = _layer_weight_items(layer_weights, num_layers)
    weighted = []
    for i, (loss, lam) in enumerate(zip(losses.unbind(0), items)):
        if isinstance(lam, torch.Tensor):
            _check_lambda_tensor(lam, losses, f"layer_weights[{i}]")
            lam = lam.reshape(()).to(losses.dtype)
        weighted.append(loss * lam)
    return torch.stack(weighted) if weighted else losses


def reduce_layers(losses: torch.Tensor, layer_weights, reduction: str) -> torch.Tensor:
    """``reduce_l(lambda_l * loss_l)`` over the ``(L,)`` per-layer losses."""
    if layer_weights is not None:
        losses = _weighted_layers(losses, layer_weights)
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    return losses


def check_weights(weights, dims: list[int], device: torch.device) -> list[torch.Tensor]:
    """Given per-dim weights: one real ``(d,)`` tensor per layer on the layers' device. Their
    values must be finite and >= 0: checked on the device, without a host read."""
    if isinstance(weights, torch.Tensor):
        weights = [weights]
    if not isinstance(weights, Sequence) or isinstance(weights, (str, bytes)):
        raise TypeError(f"weights: expected a (d,) tensor or a sequence of them, got "
                        f"{type(weights).__name__}")
    if len(weights) != len(dims):
        raise ValueError(f"weights: expected one (d,) tensor per layer ({len(dims)} layers), "
                         f"got {len(weights)}")
    for i, (w, d) in enumerate(zip(weights, dims)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights[{i}]: expected a tensor, got {type(w).__name__}")
        if w.shape != (d,):
            raise ValueError(f"weights[{i}]: expected shape ({d},) for layer {i}, got "
                             f"{tuple(w.shape)}")
        if not w.is_floating_point():
            raise TypeError(f"weights[{i}]: expected a real floating-point tensor, got {w.dtype}")
        if w.device != device:
            raise ValueError(f"weights[{i}]: on {w.device} but the layers are on {device}")
        if not torch._subclasses.fake_tensor.is_fake(w) and w.device.type != "meta":
            torch._assert_async((torch.isfinite(w) & (w >= 0)).all(),
                                f"weights[{i}]: every weight must be finite and >= 0")
    return list(weights)


def check_reduction(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction
