"""``eofd-kernels cache``: record a teacher's hidden states over a text once
(:func:`~eofd_kernels.distill.teacher_cache.record_teacher`), for ``distill --teacher-cache``
and :class:`~eofd_kernels.distill.teacher_cache.TeacherCache`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CacheConfig", "add_cache_parser", "run_cache", "with_head"]


@dataclass
class CacheConfig:
    out: Path
    teacher: str = "minilm"
    text: str = "stdlib"
    layers: list[int] | None = None  # default: the layers distill maps (3-layer student)
    dtype: str = "fp32"
    logits: str | int | None = None  # "full" or a top-k count
    batch_size: int = 64
    max_length: int = 64
    device: str | torch.device | None = None


def add_cache_parser(commands) -> None:
    """Register ``cache`` on the ``eofd-kernels`` subcommands. Each flag is checked as it is
    parsed; what a flag and the teacher's config must agree on, by the command before it
    records (:mod:`eofd_kernels.cli`)."""
    from ..cli_args import (
        device_arg,
        int_in,
        layers_arg,
        logits_arg,
        out_dir_arg,
        positive_int,
        teacher_arg,
        text_arg,
    )
    from .teacher_cache import STORE_DTYPES

    d = CacheConfig(out=Path())
    p = commands.add_parser(
        "cache", help="record a teacher's hidden states over a text once (a teacher cache)",
        description="Run a teacher once over a text and store the requested hidden-state "
                    "layers at the valid tokens (and optionally its logits) as safetensors "
                    "shards with a JSON index, for `distill --teacher-cache`. A killed run "
                    "resumes from its last complete shard. Offline.")
    p.set_defaults(command_parser=p)
    p.add_argument("--teacher", type=teacher_arg, default=d.teacher,
                   help="'minilm', 'random' or a local model folder (as for distill)")
    p.add_argument("--text", type=text_arg, default=d.text,
                   help="'stdlib' (distill's training sentences) or a file, one sentence a line")
    p.add_argument("--layers", type=layers_arg, default=None,
                   help="hidden-state indices, e.g. 0,3,6 (0 = embeddings); default: the "
                        "layers distill maps for its default 3-layer student")
    p.add_argument("--out", type=out_dir_arg, required=True, help="the cache folder")
    p.add_argument("--dtype", choices=sorted(STORE_DTYPES), default=d.dtype)
    p.add_argument("--logits", type=logits_arg, default=None,
                   help="'full', or k: the top k per row (the teacher needs a head)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    # As for distill: [CLS], [SEP] and one token of the sentence.
    p.add_argument("--max-length", type=int_in(3), default=d.max_length,
                   help="tokens per sentence, at most the teacher's position embeddings")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="processes to record with (torchrun; each its share of the batches)")


def with_head(teacher, cfg: CacheConfig):
    """The loaded ``teacher`` as the recording runs it: with ``cfg.logits`` and a model folder,
    the model with the head its config names (the hidden states are its base model's, so they
    match distill's AutoModel teacher). A ValueError naming ``logits`` where there is no head
    to give them."""
    if cfg.logits is None:
        return teacher
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    from .models import Teacher

    config = teacher.model.config
    if Path(cfg.teacher).is_dir():
        architecture = (config.architectures or [None])[0]
        model_class = getattr(transformers, architecture or "", None)
        if model_class is not None:
            model = model_class.from_pretrained(cfg.teacher, local_files_only=True).eval()
            teacher = Teacher(model, teacher.tokenizer, teacher.description)
    if type(teacher.model).__name__ == MODEL_MAPPING_NAMES.get(config.model_type):
        raise ValueError(f"logits: {cfg.teacher!r} is a base model without a head (its "
                         f"config's architectures: {config.architectures}); record logits "
                         f"from a model folder whose config names a model with a head")
    return teacher


def _sentences(text: str) -> list[str]:
    """distill's training sentences for ``stdlib``, else the file's."""
    from .corpus import file_sentences, stdlib_sentences

    return stdlib_sentences()[0] if text == "stdlib" else file_sentences(text)


class _Batches:
    """The text tokenized in order, ``batch_size`` sentences a batch, padded to the longest;
    sized, so the recording knows its total, and re-iterable, so a resumed run sees the same
    batches."""

    def __init__(self, sentences, tokenizer, batch_size: int, max_length: int):
        self.sentences, self.tokenizer = sentences, tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    def __len__(self) -> int:
        return -(-len(self.sentences) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.sentences), self.batch_size):
            enc = self.tokenizer(self.sentences[i:i + self.batch_size], padding=True,
                                 truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            yield {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")
                   if k in enc}


def default_layers(teacher_layers: int, student_layers: int = 3) -> list[int]:
    from .layer_map import uniform_layer_map

    return [t for _, t in uniform_layer_map(student_layers, teacher_layers)]


def run_cache(cfg: CacheConfig, print_fn=print, teacher=None):
    """Record ``cfg.teacher`` over ``cfg.text`` into ``cfg.out``; returns the TeacherCache.
    ``teacher``: one already loaded, with its head where ``cfg.logits`` needs it
    (:func:`with_head`; the command loads it to check the flags), else it is loaded. Under
    torchrun every process records its share (gloo on CPU, NCCL on CUDA)."""
    import torch.distributed as dist

    from .teacher_cache import record_teacher

    distributed = "LOCAL_RANK" in os.environ and not dist.is_initialized()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        if teacher is None:
            from .models import load_teacher

            teacher = with_head(load_teacher(cfg.teacher), cfg)
        layers = cfg.layers or default_layers(teacher.model.config.num_hidden_layers)
        if int(os.environ.get("RANK", "0")) == 0:
            print_fn(f"teacher: {teacher.description}; recording layers {layers} at "
                     f"{cfg.dtype}")
        batches = _Batches(_sentences(cfg.text), teacher.tokenizer, cfg.batch_size,
                           cfg.max_length)
        # A folder by its absolute path: a resumed run may start from another directory.
        name = str(Path(cfg.teacher).resolve()) if Path(cfg.teacher).is_dir() else cfg.teacher
        return record_teacher(teacher.model.to(device), batches, layers=layers, out=cfg.out,
                              dtype=cfg.dtype, logits=cfg.logits, name=name,
                              print_fn=print_fn)
    finally:
        if distributed:
            dist.destroy_process_group()
