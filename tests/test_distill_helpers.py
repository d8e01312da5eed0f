"""The distillation helpers: layer maps, projections, soft cross-entropy, the objective."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import eofd_kernels as ek
from eofd_kernels.distill import (
    DistillationLoss,
    HiddenProjection,
    attach_projection,
    explicit_layer_map,
    last_k_layer_map,
    soft_cross_entropy,
    uniform_layer_map,
)


def test_uniform_map_is_tinybert():
    assert uniform_layer_map(4, 12) == ((0, 0), (1, 3), (2, 6), (3, 9), (4, 12))
    assert uniform_layer_map(6, 12, embeddings=False) == tuple((m, 2 * m) for m in range(1, 7))
    assert uniform_layer_map(3, 3) == ((0, 0), (1, 1), (2, 2), (3, 3))
    assert uniform_layer_map(4, 6)[-1] == (4, 6)  # not divisible: the last layers still meet


def test_last_k_and_explicit_maps():
    assert last_k_layer_map(4, 12, 2) == ((3, 11), (4, 12))
    assert explicit_layer_map([(1, 5), (2, 12)], 2, 12) == ((1, 5), (2, 12))


@pytest.mark.parametrize("call, message", [
    (lambda: uniform_layer_map(12, 4), "student_layers"),
    (lambda: uniform_layer_map(0, 4), "student_layers"),
    (lambda: last_k_layer_map(2, 12, 3), "k:"),
    (lambda: explicit_layer_map([(3, 1)], 2, 12), r"pairs\[0\]"),
    (lambda: explicit_layer_map([(1, 2, 3)], 2, 12), r"pairs\[0\]"),
    (lambda: explicit_layer_map([], 2, 12), "pairs"),
])
def test_layer_map_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _states(g, layers, b, n, d):
    return tuple(torch.randn(b, n, d, generator=g) * (1 + torch.arange(d)) for _ in range(layers))


def test_objective_is_pred_plus_lambda_times_eofd_layers():
    g = torch.Generator().manual_seed(1)
    teacher = SimpleNamespace(hidden_states=_states(g, 5, 2, 6, 8), logits=torch.randn(2, 3))
    student = SimpleNamespace(hidden_states=_states(g, 3, 2, 6, 4), logits=torch.randn(2, 3))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    pairs = uniform_layer_map(2, 4)
    proj = HiddenProjection(4, 8, len(pairs))
    objective = DistillationLoss(pairs, proj, power=1.0, hidden_weight=0.25, temperature=2.0,
                                 backend="torch")
    out = objective(student, teacher, mask)
    projected = proj([student.hidden_states[s] for s, _ in pairs])
    want_layers = torch.stack([
        ek.eofd_loss(p, teacher.hidden_states[t], power=1.0, mask=mask, backend="reference")
        for p, (_, t) in zip(projected, pairs)])
    torch.testing.assert_close(out.layer_losses, want_layers, rtol=1e-6, atol=0)
    want_pred = soft_cross_entropy(student.logits, teacher.logits, temperature=2.0)
    torch.testing.assert_close(out.pred, want_pred)
    torch.testing.assert_close(out.loss, want_pred + 0.25 * want_layers.sum())
    assert out.layer_names == ["0<-0", "1<-2", "2<-4"]


def test_seq2seq_uses_decoder_mask_for_decoder_layers():
    """Garbage in the decoder's padding must not reach the loss; the encoder mask must not
    be applied to the decoder (different lengths)."""
    g = torch.Generator().manual_seed(2)
    enc_mask = torch.ones(2, 6, dtype=torch.long)
    dec_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])

    def outputs():
        return (SimpleNamespace(encoder_hidden_states=_states(g, 3, 2, 6, 8),
                                decoder_hidden_states=_states(g, 3, 2, 3, 8), logits=None),
                SimpleNamespace(encoder_hidden_states=_states(g, 3, 2, 6, 8),
                                decoder_hidden_states=_states(g, 3, 2, 3, 8), logits=None))

    student, teacher = outputs()
    pairs = uniform_layer_map(2, 2)
    objective = DistillationLoss(pairs, decoder_layer_map=pairs, use_logits=False,
                                 backend="torch")
    clean = objective(student, teacher, enc_mask, dec_mask)
    for h in teacher.decoder_hidden_states:
        h[0, 2] = 1e6
    dirty = objective(student, teacher, enc_mask, dec_mask)
    torch.testing.assert_close(dirty.layer_losses, clean.layer_losses, rtol=0, atol=0)
    assert clean.layer_names[:3] == ["enc 0<-0", "enc 1<-1", "enc 2<-2"]
    assert clean.layer_names[3:] == ["dec 0<-0", "dec 1<-1", "dec 2<-2"]
    assert clean.pred.item() == 0.0
    with pytest.raises(ValueError, match="decoder_layer_map"):
        DistillationLoss(pairs, backend="torch")(student, teacher, enc_mask, dec_mask)


def test_objective_errors():
    pairs = uniform_layer_map(2, 4)
    with pytest.raises(ValueError, match="layer_map"):
        DistillationLoss(pairs, HiddenProjection(4, 8, 2))
    no_states = SimpleNamespace(hidden_states=None, logits=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="output_hidden_states"):
        DistillationLoss(pairs)(no_states, no_states)
    g = torch.Generator()
    out = SimpleNamespace(hidden_states=_states(g, 5, 1, 4, 8), logits=None)
    with pytest.raises(ValueError, match="use_logits"):
        DistillationLoss(explicit_layer_map([(1, 1)], 4, 4))(out, out)


def test_attach_projection_registers_on_student():
    student = torch.nn.Linear(2, 2)
    proj = attach_projection(student, HiddenProjection(2, 4, 3, shared=True))
    assert len(proj.maps) == 1
    assert {"eofd_projection.maps.0.weight", "eofd_projection.maps.0.bias"} <= set(
        student.state_dict())
    assert sum(p.numel() for p in student.parameters()) == 6 + 12
    with pytest.raises(ValueError, match="name"):
        attach_projection(student, HiddenProjection(2, 4, 3), name="weight")
