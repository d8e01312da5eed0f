"""``eofd-kernels cache``: record a teacher's hidden states over a text once
(:func:`~eofd_kernels.distill.teacher_cache.record_teacher`), for ``distill --teacher-cache``
and :class:`~eofd_kernels.distill.teacher_cache.TeacherCache`."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CacheConfig", "add_cache_parser", "run_cache", "run_cache_command"]


@dataclass
class CacheConfig:
    out: Path
    teacher: str = "minilm"
    text: str = "stdlib"
    layers: str | None = None  # "0,2,4"; default: the layers distill maps (3-layer student)
    dtype: str = "fp32"
    logits: str | None = None  # "full" or a top-k count
    batch_size: int = 64
    max_length: int = 64
    device: str | None = None


def add_cache_parser(commands) -> None:
    """Register ``cache`` on the ``eofd-kernels`` subcommands."""
    from .teacher_cache import STORE_DTYPES

    d = CacheConfig(out=Path())
    p = commands.add_parser(
        "cache", help="record a teacher's hidden states over a text once (a teacher cache)",
        description="Run a teacher once over a text and store the requested hidden-state "
                    "layers at the valid tokens (and optionally its logits) as safetensors "
                    "shards with a JSON index, for `distill --teacher-cache`. A killed run "
                    "resumes from its last complete shard. Offline.")
    p.add_argument("--teacher", default=d.teacher,
                   help="'minilm', 'random' or a local model folder (as for distill)")
    p.add_argument("--text", default=d.text,
                   help="'stdlib' (distill's training sentences) or a file, one sentence a line")
    p.add_argument("--layers", default=None,
                   help="hidden-state indices, e.g. 0,3,6 (0 = embeddings); default: the "
                        "layers distill maps for its default 3-layer student")
    p.add_argument("--out", type=Path, required=True, help="the cache folder")
    p.add_argument("--dtype", choices=sorted(STORE_DTYPES), default=d.dtype)
    p.add_argument("--logits", default=None,
                   help="'full', or k: the top k per row (the teacher needs a head)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes to record with (torchrun; each its share of the batches)")


def run_cache_command(args: argparse.Namespace, argv: list[str]) -> int:
    """The ``cache`` command: relaunched under torchrun for ``--nproc`` > 1."""
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from ..cli import _relaunch_with_torchrun

        return _relaunch_with_torchrun(args.nproc, argv)
    fields = CacheConfig.__dataclass_fields__
    run_cache(CacheConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0


def _load(cfg: CacheConfig):
    """The teacher; from a folder with ``--logits``, with the head its config names (the
    hidden states are its base model's, so they match distill's AutoModel teacher)."""
    from .models import Teacher, load_teacher

    teacher = load_teacher(cfg.teacher)
    if cfg.logits is None or not Path(cfg.teacher).is_dir():
        return teacher
    import transformers

    architecture = (teacher.model.config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise ValueError(f"logits: {cfg.teacher}'s config names no model class with a head "
                         f"(architectures: {teacher.model.config.architectures})")
    model = model_class.from_pretrained(cfg.teacher, local_files_only=True).eval()
    return Teacher(model, teacher.tokenizer, teacher.description)


def _sentences(text: str) -> list[str]:
    if text == "stdlib":
        from .corpus import stdlib_sentences

        return stdlib_sentences()[0]
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"text: expected 'stdlib' or a file, got {text!r}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


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


def run_cache(cfg: CacheConfig, print_fn=print):
    """Record ``cfg.teacher`` over ``cfg.text`` into ``cfg.out``; returns the TeacherCache.
    Under torchrun every process records its share (gloo on CPU, NCCL on CUDA)."""
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
        teacher = _load(cfg)
        config = teacher.model.config
        layers = ([int(t) for t in cfg.layers.split(",")] if cfg.layers
                  else default_layers(config.num_hidden_layers))
        logits = cfg.logits if cfg.logits in (None, "full") else int(cfg.logits)
        if int(os.environ.get("RANK", "0")) == 0:
            print_fn(f"teacher: {teacher.description}; recording layers {layers} at "
                     f"{cfg.dtype}")
        batches = _Batches(_sentences(cfg.text), teacher.tokenizer, cfg.batch_size,
                           cfg.max_length)
        return record_teacher(teacher.model.to(device), batches, layers=layers, out=cfg.out,
                              dtype=cfg.dtype, logits=logits, name=cfg.teacher,
                              print_fn=print_fn)
    finally:
        if distributed:
            dist.destroy_process_group()
