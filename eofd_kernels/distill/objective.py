"""The distillation objective around EOFD: ``L = L_pred + lambda * sum_l L_EOFD(l)``.

This is the paper's one-step distillation for GPT-2 and T5 (001, Tables 14 and 16: lambda, the
"hidden state ratio", is 1e-4 there and matches the two losses' scales; the temperature is 1).
``L_pred`` is TinyBERT's prediction-layer loss, the soft cross-entropy between the teacher's and
the student's logits at temperature tau, averaged over the rows of the logits (examples, or the
valid tokens when the logits are per token).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..loss import EOFDLoss
from ..projected_loss import eofd_projected_loss
from .layer_map import LayerMap
from .prediction_loss import soft_cross_entropy
from .projection import HiddenProjection

__all__ = ["DistillationLoss", "DistillationOutput"]


class DistillationOutput(NamedTuple):
    """loss: the total; pred: ``L_pred`` (0 without logits); hidden: ``sum_l L_EOFD(l)``;
    layer_losses: ``(L,)`` per distilled layer, named by ``layer_names`` (e.g. ``"dec 2<-4"``:
    student hidden state 2 from teacher hidden state 4 of the decoder)."""

    loss: torch.Tensor
    pred: torch.Tensor
    hidden: torch.Tensor
    layer_losses: torch.Tensor
    layer_names: list[str]


def _is_seq2seq(model_out) -> bool:
    return getattr(model_out, "encoder_hidden_states", None) is not None


def _check_pairs(tag: str, pairs, s_states, t_states) -> None:
    """Every pair names hidden states the models returned (a clear error, not an IndexError)."""
    name = "decoder_layer_map" if tag == "dec" else "layer_map"
    for s, t in pairs:
        for side, index, states in (("student", s, s_states), ("teacher", t, t_states)):
            if not -len(states) <= index < len(states):
                raise ValueError(f"{name}: pair ({s}, {t}) asks for {side} hidden state "
                                 f"{index}, but the {side} returned {len(states)}")
            if states[index] is None:  # a teacher cache holds the layers it recorded
                raise ValueError(f"{name}: pair ({s}, {t}) asks for {side} hidden state "
                                 f"{index}, which the {side}'s output does not hold")


class DistillationLoss(nn.Module):
    """EOFD on mapped hidden states (+ KD on logits) for Hugging Face model outputs.

    Call both models with ``output_hidden_states=True``. Encoder-only and decoder-only models
    (BERT, GPT-2) use ``layer_map`` on ``hidden_states`` with ``attention_mask``; encoder-decoder
    models (T5) use ``layer_map`` on ``encoder_hidden_states`` with ``attention_mask`` and
    ``decoder_layer_map`` on ``decoder_hidden_states`` with ``decoder_attention_mask``. All
    distilled layers of a step go through one :func:`eofd_kernels.eofd_loss` call.

    Args:
        layer_map / decoder_layer_map: ``(student_index, teacher_index)`` pairs, see
            :mod:`eofd_kernels.distill.layer_map`.
        projection / decoder_projection: a :class:`HiddenProjection` with one map per pair, or
            None when the widths already match.
        power: EOFD's p (0 is plain MSE); hidden_weight: lambda; temperature: tau of ``L_pred``;
        use_logits: add ``L_pred`` (both outputs must have ``logits``);
        eps, backend: passed to :func:`eofd_kernels.eofd_loss`;
        fuse_projection: compute the projections inside the loss
            (:func:`eofd_kernels.eofd_projected_loss`: the projected states are never all
            alive) when every mapped stack has a projection. Default: on, except for
            ``backend="reference"``, which stays the paper's code on projected states.
        process_group: split batches (see :func:`eofd_kernels.eofd_loss`); the projections
            are then applied first (the fused projection has no split-batch mode).
    """

    def __init__(self, layer_map: LayerMap, projection: HiddenProjection | None = None, *,
                 decoder_layer_map: LayerMap | None = None,
                 decoder_projection: HiddenProjection | None = None, power: float = 0.5,
                 hidden_weight: float = 1.0, temperature: float = 1.0, use_logits: bool = True,
                 eps: float = 0.0, backend: str = "auto", fuse_projection: bool | None = None,
                 process_group=None):
        super().__init__()
        for name, pairs, proj in (("layer_map", layer_map, projection),
                                  ("decoder_layer_map", decoder_layer_map, decoder_projection)):
            if proj is not None and (pairs is None or proj.num_layers != len(pairs)):
                raise ValueError(f"{name}: the projection has {proj.num_layers} maps but the "
                                 f"layer map has {0 if pairs is None else len(pairs)} pairs")
        self.layer_map, self.decoder_layer_map = tuple(layer_map), decoder_layer_map
        # Not submodules: the projections belong to the student (attach_projection), so they
        # are not registered twice in an optimiser built from both modules.
        self._projections = {"enc": projection, "dec": decoder_projection}
        self.hidden_weight, self.temperature = hidden_weight, temperature
        self.use_logits = use_logits
        # Per-layer losses for logging; the module also owns the forecast of their grads.
        self.eofd = EOFDLoss(power=power, reduction="none", eps=eps, backend=backend,
                             process_group=process_group)
        if fuse_projection and process_group is not None:
            raise ValueError("fuse_projection: not available with a process_group")
        self.fuse_projection = (backend != "reference" and process_group is None
                                if fuse_projection is None else fuse_projection)

    def use_process_group(self, process_group) -> None:
        """Split batches from now on (the projections are then applied before the loss)."""
        self.eofd.process_group = process_group
        self.fuse_projection = False

    def _sides(self, student_out, teacher_out, attention_mask, decoder_attention_mask):
        """Yield (tag, layer map, projection, student states, teacher states, mask)."""
        if _is_seq2seq(teacher_out):
            if self.decoder_layer_map is None:
                raise ValueError("decoder_layer_map: required for encoder-decoder outputs")
            yield ("enc", self.layer_map, self._projections["enc"],
                   student_out.encoder_hidden_states, teacher_out.encoder_hidden_states,
                   attention_mask)
            yield ("dec", self.decoder_layer_map, self._projections["dec"],
                   student_out.decoder_hidden_states, teacher_out.decoder_hidden_states,
                   decoder_attention_mask)
            return
        if getattr(teacher_out, "hidden_states", None) is None:
            raise ValueError("teacher_out: no hidden states; call the model with "
                             "output_hidden_states=True")
        yield ("", self.layer_map, self._projections["enc"], student_out.hidden_states,
               teacher_out.hidden_states, attention_mask)

    def forward(self, student_out, teacher_out, attention_mask: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None) -> DistillationOutput:
        picked, projections, teachers, masks, names = [], [], [], [], []
        for tag, pairs, proj, s_states, t_states, mask in self._sides(
                student_out, teacher_out, attention_mask, decoder_attention_mask):
            if s_states is None:
                raise ValueError("student_out: no hidden states; call the model with "
                                 "output_hidden_states=True")
            _check_pairs(tag, pairs, s_states, t_states)
            picked.append([s_states[s] for s, _ in pairs])
            projections.append(proj)
            teachers += [t_states[t] for _, t in pairs]
            masks += [mask] * len(pairs)
            names += [f"{tag} {s}<-{t}".strip() for s, t in pairs]
        if self.fuse_projection and all(p is not None for p in projections):
            maps = [m for proj, states in zip(projections, picked) for m in proj.layer_maps()]
            layer_losses = eofd_projected_loss(
                [h for states in picked for h in states], [m.weight for m in maps],
                [m.bias for m in maps], teachers, power=self.eofd.power, mask=masks,
                reduction="none", eps=self.eofd.eps, backend=self.eofd.backend)
        else:
            students = [h for proj, states in zip(projections, picked)
                        for h in (states if proj is None else proj(states))]
            layer_losses = self.eofd(students, teachers, mask=masks)
        hidden = layer_losses.sum()
        pred = hidden.new_zeros(())
        if self.use_logits:
            pred = self._pred_loss(student_out, teacher_out, attention_mask,
                                   decoder_attention_mask)
        return DistillationOutput(pred + self.hidden_weight * hidden, pred, hidden,
                                  layer_losses, names)

    def _pred_loss(self, student_out, teacher_out, attention_mask, decoder_attention_mask):
        s_logits = getattr(student_out, "logits", None)
        t_logits = getattr(teacher_out, "logits", None)
        if s_logits is None or t_logits is None:
            raise ValueError("use_logits: both outputs need logits (or pass use_logits=False)")
        # Per-token logits (causal or seq2seq LM) use the mask of the tokens they belong to.
        mask = decoder_attention_mask if _is_seq2seq(teacher_out) else attention_mask
        if mask is not None and tuple(mask.shape) != tuple(t_logits.shape[:-1]):
            mask = None
        return soft_cross_entropy(s_logits, t_logits, temperature=self.temperature, mask=mask)

    def extra_repr(self) -> str:
        return (f"layer_map={self.layer_map}, decoder_layer_map={self.decoder_layer_map}, "
                f"hidden_weight={self.hidden_weight}, temperature={self.temperature}, "
                f"use_logits={self.use_logits}, fuse_projection={self.fuse_projection}")
