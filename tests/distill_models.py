"""Small randomly initialised teacher/student pairs (BERT, GPT-2, T5) and their batches.

Teachers have 4 layers of width 64, students 2 layers of width 32. Dropout is off so that a
training step is a pure function of the parameters and the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH, LABELS = 96, 12, 4, 3


@dataclass
class ModelPair:
    teacher: torch.nn.Module
    student: torch.nn.Module
    teacher_layers: int
    student_layers: int
    teacher_width: int
    student_width: int
    seq2seq: bool = False


def _bert(layers: int, width: int):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=width // 16, intermediate_size=2 * width, num_labels=LABELS,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def _gpt2(layers: int, width: int):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=width, n_layer=layers, n_head=width // 16, n_positions=SEQ,
        num_labels=LABELS, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2ForSequenceClassification(cfg)


def _t5(layers: int, width: int):
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=width, d_kv=16, d_ff=2 * width, num_layers=layers,
        num_decoder_layers=layers, num_heads=width // 16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


BUILDERS = {"bert": _bert, "gpt2": _gpt2, "t5": _t5}


def model_pair(kind: str, seed: int = 0) -> ModelPair:
    torch.manual_seed(seed)
    teacher = BUILDERS[kind](4, 64).eval()
    student = BUILDERS[kind](2, 32).train()
    return ModelPair(teacher, student, 4, 2, 64, 32, seq2seq=kind == "t5")


def batches(pair: ModelPair, steps: int, seed: int = 1) -> list[dict]:
    """``steps`` padded batches; token 0 is padding, every row keeps at least 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths = torch.randint(3, SEQ + 1, (BATCH, 1), generator=g)
        mask = (torch.arange(SEQ) < lengths).long()
        ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g) * mask
        batch = {"input_ids": ids, "attention_mask": mask}
        if pair.seq2seq:
            dec_lengths = torch.randint(2, SEQ // 2 + 1, (BATCH, 1), generator=g)
            dec_mask = (torch.arange(SEQ // 2) < dec_lengths).long()
            batch["decoder_input_ids"] = torch.randint(1, VOCAB, (BATCH, SEQ // 2),
                                                       generator=g) * dec_mask
            batch["decoder_attention_mask"] = dec_mask
        out.append(batch)
    return out
