"""``eofd-kernels distill``: distil a pretrained teacher into a smaller student, EOFD vs MSE.

The students (one EOFD student per power, and the MSE one) start from the same weights, see
the same batches and take the same optimiser steps; they differ only in the power of the
hidden-state loss (EOFD's p, or 0: plain MSE). From a teacher cache, the whole grid trains on
one recording: the teacher runs for none of the students' steps.
Everything is offline: the teacher comes from an installed package (or is random, and says
so), the text from Python's standard library.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backends import available_backends
from ..loss import eofd_loss
from ..outliers import OutlierScan
from ..timing import median, time_ms
from .corpus import stdlib_sentences
from .layer_map import uniform_layer_map
from .models import Teacher, load_teacher, make_student
from .objective import DistillationLoss
from .outliers_job import plot_report
from .projection import HiddenProjection, attach_projection
from .teacher_cache import TeacherCache

__all__ = ["DistillConfig", "run_distill", "student_names"]


@dataclass
class DistillConfig:
    teacher: str = "minilm"
    student_layers: int = 3
    student_width: int = 192
    backend: str = "auto"
    steps: int = 300
    powers: tuple[float, ...] = (0.5,)  # one EOFD student each (the paper's grid: 0.5, 1.0)
    batch_size: int = 16
    max_length: int = 64
    lr: float = 5e-4
    seed: int = 0
    top_dims: int = 8
    device: str | torch.device | None = None
    out: Path | None = None  # plots of the teacher's and each student's sigma_d / sbar
    teacher_cache: Path | None = None  # train from it (eofd-kernels cache) instead of the text


@dataclass
class Student:
    name: str
    model: torch.nn.Module
    objective: DistillationLoss


def student_names(powers) -> list[str]:
    """The students' names, which key every result: one EOFD student per p, then MSE. A
    ValueError naming ``powers`` where two would share a name."""
    names = [f"EOFD p={p:g}" for p in powers]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise ValueError(f"powers: {repeated.removeprefix('EOFD ')} given twice")
    return [*names, "MSE (p=0)"]


def _students(cfg: DistillConfig, teacher) -> list[Student]:
    layer_map = uniform_layer_map(cfg.student_layers, teacher.config.num_hidden_layers)
    base = make_student(teacher, cfg.student_layers, cfg.student_width, cfg.seed)
    if getattr(base, "pooler", None) is not None:
        base.pooler = None  # the hidden-state loss does not train it (and DDP needs all used)
    attach_projection(base, HiddenProjection(cfg.student_width, teacher.config.hidden_size,
                                             len(layer_map)))
    students = []
    for name, power in zip(student_names(cfg.powers), (*cfg.powers, 0.0)):
        model = copy.deepcopy(base)  # the same start for every student
        objective = DistillationLoss(layer_map, model.eofd_projection, power=power,
                                     use_logits=False, backend=cfg.backend)
        students.append(Student(name, model, objective))
    return students


def _tokenize(tokenizer, texts, cfg, device) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, max_length=cfg.max_length, padding=True, truncation=True,
                    return_tensors="pt")
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}


def _training_args(cfg: DistillConfig, device: torch.device, out_dir: str):
    """The Trainer's settings: the global batch is ``batch_size`` however many processes run
    (each takes its share), linear warm-up over a tenth of the steps then linear decay, AdamW
    with weight decay 1e-4, gradients clipped at 1 (TinyBERT's recipe)."""
    from transformers import TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % world:
        raise ValueError(f"batch_size: {cfg.batch_size} does not split over {world} processes")
    return TrainingArguments(
        output_dir=out_dir, max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size // world, learning_rate=cfg.lr,
        weight_decay=1e-4, lr_scheduler_type="linear", warmup_steps=max(1, cfg.steps // 10),
        max_grad_norm=1.0, seed=cfg.seed, logging_steps=max(1, cfg.steps // 5),
        save_strategy="no", report_to=[], use_cpu=device.type == "cpu",
        ddp_backend="gloo" if device.type == "cpu" and world > 1 else None,
        remove_unused_columns=False,
        dataloader_drop_last=True)


def _train(cfg, teacher, tokenizer, students, sentences, device) -> dict[str, float]:
    """Each student through ``EOFDTrainer`` on the same batches (the Trainer's seeded
    shuffle): DDP across processes when launched with torchrun. Returns each student's
    training seconds (wall clock: the teacher's forwards, or reading the cache, included)."""
    from .trainer import EOFDTrainer

    def collate(texts):
        return _tokenize(tokenizer, texts, cfg, "cpu")

    # From a cache the teacher does not run in training: the batches bring its states.
    source = {"train_dataset": sentences, "data_collator": collate, "teacher": teacher}
    if cfg.teacher_cache is not None:
        cache = TeacherCache(cfg.teacher_cache)
        cache.check_teacher(teacher)
        source = {"train_dataset": cache, "teacher": None}
    seconds = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for st in students:
            trainer = EOFDTrainer(model=st.model, args=_training_args(cfg, device, out_dir),
                                  objective=st.objective, **source)
            start = time.perf_counter()
            trainer.train()
            seconds[st.name] = time.perf_counter() - start
            st.model = trainer.accelerator.unwrap_model(trainer.model,
                                                        keep_fp32_wrapper=False).eval()
    return seconds


@torch.no_grad()
def _evaluate(cfg, teacher, tokenizer, students, sentences, device) -> dict[str, dict]:
    """Held-out metrics per student, on every mapped layer and the sentence embedding.

    top-k FVU: the student's squared error over the teacher's variance, both summed over the
    teacher's k highest-variance dims of a mapped layer (averaged over layers); all-dims FVU
    likewise over every dim; cosine: of mean-pooled last hidden states (all-MiniLM's sentence
    embedding), the student's through its last projection.
    """
    batches = [_tokenize(tokenizer, sentences[i:i + 64], cfg, device)
               for i in range(0, len(sentences), 64)]
    layer_map = students[0].objective.layer_map
    t_states, masks = [[] for _ in layer_map], []
    for batch in batches:
        out = teacher(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].bool()
        masks.append(mask)
        for i, (_, t) in enumerate(layer_map):
            t_states[i].append(out.hidden_states[t][mask].double())
    teacher_tokens = [torch.cat(x) for x in t_states]
    t_embed = _mean_pool(teacher_tokens[-1], masks)
    # The teacher's outlier dims per mapped layer (eofd_kernels.outliers, variance criterion).
    # The weights the report lists are those of the first EOFD student's p.
    outliers = OutlierScan().update(teacher_tokens).report(power=cfg.powers[0])
    if cfg.out is not None:
        plot_report(outliers, cfg.out / "teacher", "teacher (mapped layers)")
    outlier_masks = [torch.zeros(t.shape[1], dtype=torch.bool).index_fill_(
        0, torch.tensor(layer.dims, dtype=torch.long), True) for t, layer in
        zip(teacher_tokens, outliers.layers)]
    results = {}
    for st in students:
        st.model.eval()
        s_states = [[] for _ in layer_map]
        for batch, mask in zip(batches, masks):
            out = st.model(**batch, output_hidden_states=True)
            projected = st.model.eofd_projection([out.hidden_states[s] for s, _ in layer_map])
            for i, p in enumerate(projected):
                s_states[i].append(p[mask].double())
        top, every, on_outliers, on_others = [], [], [], []
        for s, t, is_outlier in zip((torch.cat(x) for x in s_states), teacher_tokens,
                                    outlier_masks):
            error, spread = ((s - t) ** 2).sum(0), ((t - t.mean(0)) ** 2).sum(0)
            dims = spread.topk(cfg.top_dims).indices
            top.append((error[dims].sum() / spread[dims].sum()).item())
            every.append((error.sum() / spread.sum()).item())
            on_outliers.append((error[is_outlier].sum() / spread[is_outlier].sum()).item()
                               if is_outlier.any() else math.nan)
            on_others.append((error[~is_outlier].sum() / spread[~is_outlier].sum()).item())
        s_embed = _mean_pool(torch.cat(s_states[-1]), masks)
        if cfg.out is not None:  # the student's copy, plotted as the teacher's
            copy_report = OutlierScan().update([torch.cat(x) for x in s_states]).report(
                power=cfg.powers[0])
            plot_report(copy_report, cfg.out / _slug(st.name), f"student {st.name}")
        results[st.name] = {
            "top_dims_fvu": sum(top) / len(top),
            "all_dims_fvu": sum(every) / len(every),
            "embedding_cosine": F.cosine_similarity(s_embed, t_embed, dim=-1).mean().item(),
            "outlier_dims": [layer.dims for layer in outliers.layers],
            "outlier_fvu_per_layer": on_outliers,
            "other_fvu_per_layer": on_others,
        }
    return results


def _slug(name: str) -> str:
    """A folder name: "MSE (p=0)" -> "mse-p-0"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _print_outlier_fvu(results: dict, layer_map, print_fn) -> None:
    """Per mapped layer: the teacher's outlier dims and each student's FVU on them vs the
    other dims (the same definition as `eofd-kernels outliers`)."""
    names = list(results)
    print_fn("FVU on the teacher's outlier dims (variance criterion) vs the other dims, per "
             "mapped layer (student<-teacher):")
    print_fn(f"{'layer':>7} {'outlier dims':>16} " + " ".join(
        f"{n + ' outl/other':>24}" for n in names))
    first = results[names[0]]
    for i, (s, t) in enumerate(layer_map):
        dims = ",".join(map(str, first["outlier_dims"][i])) or "-"
        cells = " ".join(f"{results[n]['outlier_fvu_per_layer'][i]:>11.4f} /"
                         f"{results[n]['other_fvu_per_layer'][i]:>10.4f}" for n in names)
        print_fn(f"{f'{s}<-{t}':>7} {dims:>16} {cells}")


def _mean_pool(tokens: torch.Tensor, masks) -> torch.Tensor:
    """Sentence embeddings: the mean of each sentence's valid-token states."""
    counts = torch.cat([m.sum(1) for m in masks]).tolist()
    return torch.stack([chunk.mean(0) for chunk in tokens.split(counts)])


def _loss_timings(cfg, teacher, tokenizer, student: Student, sentences, device) -> dict:
    """Forward+backward ms of the hidden-state loss on one training batch, per backend."""
    batch = _tokenize(tokenizer, sentences[: cfg.batch_size], cfg, device)
    with torch.no_grad():
        t_out = teacher(**batch, output_hidden_states=True)
        s_out = student.model(**batch, output_hidden_states=True)
        layer_map = student.objective.layer_map
        projected = student.model.eofd_projection([s_out.hidden_states[s] for s, _ in layer_map])
    teachers = [t_out.hidden_states[t] for _, t in layer_map]
    students = [p.detach() for p in projected]
    mask = batch["attention_mask"]

    def step(loss_fn):
        leaves = [s.detach().requires_grad_() for s in students]
        torch.autograd.grad(loss_fn(leaves), leaves)

    providers = {
        backend: functools.partial(_eofd_all, teachers=teachers, mask=mask,
                                   power=student.objective.eofd.power, backend=backend)
        for backend in available_backends(device)
    }
    providers["F.mse_loss (no weights)"] = functools.partial(_mse_all, teachers=teachers,
                                                             mask=mask)
    return {name: median(time_ms(functools.partial(step, fn), device, reps=10))
            for name, fn in providers.items()}


def _eofd_all(students, *, teachers, mask, power, backend):
    return eofd_loss(students, teachers, power=power, mask=mask, backend=backend)


def _mse_all(students, *, teachers, mask):
    keep = mask.bool()
    return sum(F.mse_loss(s[keep], t[keep]) for s, t in zip(students, teachers))


def _quiet(*_args, **_kwargs) -> None:
    """Other ranks' print: nothing (rank 0 speaks for the run)."""


def run_distill(cfg: DistillConfig, print_fn=print, teacher: Teacher | None = None) -> dict:
    """Train the EOFD and the MSE student, print and return the held-out comparison.

    ``teacher``: one already loaded (the CLI loads it to check the flags against it), else
    ``cfg.teacher`` is loaded. Under torchrun every process trains its share of each batch
    (DDP, with the EOFD weights of the whole batch) and the first one prints."""
    if int(os.environ.get("RANK", "0")) != 0:
        print_fn, cfg = _quiet, dataclasses.replace(cfg, out=None)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    teacher = teacher if teacher is not None else load_teacher(cfg.teacher)
    model = teacher.model.to(device)
    train, held_out = stdlib_sentences()
    students = _students(cfg, model)
    tc = model.config
    print_fn(f"teacher: {teacher.description}; {tc.num_hidden_layers} layers, d={tc.hidden_size}")
    print_fn(f"students: {cfg.student_layers} layers, d={cfg.student_width}, projected to "
             f"d={tc.hidden_size}; layer map (student<-teacher): "
             f"{students[0].objective.layer_map}")
    print_fn(f"text: {len(train)} training / {len(held_out)} held-out sentences from Python's "
             f"pydoc topics; {cfg.steps} steps of {cfg.batch_size}; device {device}; "
             f"loss backend {cfg.backend!r}")
    if cfg.teacher_cache is not None:
        print_fn(f"training from the teacher cache {cfg.teacher_cache} (the teacher runs for "
                 f"the held-out evaluation only)")
    train_seconds = _train(cfg, model, teacher.tokenizer, students, train, device)
    results = _evaluate(cfg, model, teacher.tokenizer, students, held_out, device)
    print_fn(f"\nheld-out comparison ({len(held_out)} sentences; lower FVU is better, "
             f"FVU = unexplained share of the teacher's variance):")
    print_fn(f"{'student':14} {f'FVU top-{cfg.top_dims} dims':>16} {'FVU all dims':>13} "
             f"{'embedding cos':>14}")
    for name, r in results.items():
        print_fn(f"{name:14} {r['top_dims_fvu']:16.4f} {r['all_dims_fvu']:13.4f} "
                 f"{r['embedding_cosine']:14.4f}")
    _print_outlier_fvu(results, students[0].objective.layer_map, print_fn)
    source = "from the teacher cache" if cfg.teacher_cache is not None else "with the teacher"
    print_fn(f"training time ({source}): " + ", ".join(
        f"{name} {sec:.1f} s" for name, sec in train_seconds.items())
        + f"; all {sum(train_seconds.values()):.1f} s")
    timings = _loss_timings(cfg, model, teacher.tokenizer, students[0], train, device)
    print_fn("hidden-state loss, fwd+bwd per step (all mapped layers): " + ", ".join(
        f"{name} {ms:.2f} ms" for name, ms in timings.items()))
    headline = ("top_dims_fvu", "all_dims_fvu", "embedding_cosine")
    return {"results": results, "timings_ms": timings, "train_seconds": train_seconds,
            "finite": all(math.isfinite(r[k]) for r in results.values() for k in headline)}
