"""``eofd-kernels bench --step``: whole distillation training steps, way against way.

A step: the frozen teacher's forward (no grad), the student's forward with its hidden states,
the loss (the projections of the mapped student states, EOFD on every mapped layer, and
``L_pred`` on the logits where the setting has them), then backward and an AdamW step. The ways
differ in the loss only:

    paper            the paper's code (eofd_kernels.reference) per layer on projected states
    mse              plain F.mse_loss per layer on projected states
    paper compiled   torch.compile of the paper's whole loss (projections, layers, L_pred)
    eofd_kernels     DistillationLoss: the projections fused into the loss, the best backend
    eofd_kernels cached
                     the same loss, the teacher's outputs read from a teacher cache
                     (:mod:`eofd_kernels.distill.teacher_cache`) recorded once before the
                     timed steps: its teacher part is reading and padding the batch's items

Method. Models from configs with random weights (offline). One student with its projections
and one optimiser serve every way: a step's cost does not depend on the weights' values, and
the memory holds one student. A fixed batch of random tokens without padding (the paper's code
knows no masks). First every way computes the loss of the same step 0 (same weights, same
dropout masks): the ways compute one objective (plain MSE the p = 0 one). Then warm-up steps
(compilation happens there), then the timed steps of all ways interleaved, their order rotated
every round so no way always runs after the same one. The parts are timed between marks
(perf_counter on a CPU; CUDA events on a GPU, one synchronize at the end of the step), so the
parts of a step sum to its time. Peak memory of one more step beyond what is allocated before
it: ``max_memory_allocated`` on a GPU; on a CPU the resident set, in a fresh process per
setting (:mod:`eofd_kernels.bench.memory`).

A way is a name, its loss, and where the teacher's outputs come from (:attr:`Way.teacher`, the
teacher's forward by default): a teacher cache is a way whose teacher part reads the cache. The
cache holds the mapped layers and, where the setting has logits, the full logits, in the
step's dtype: the same objective, so its step-0 loss is eofd_kernels' one. It is recorded into
a temporary folder just before the steps, so its shards are in the page cache (a cache that
fits in memory, read warm); on a GPU each step copies the batch from host memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..distill import (
    DistillationLoss,
    HiddenProjection,
    attach_projection,
    record_teacher,
    uniform_layer_map,
)
from ..distill.prediction_loss import soft_cross_entropy_eager
from ..reference import eofd_loss_reference
from . import memory

__all__ = ["PARTS", "SETTINGS", "WAYS", "Setting", "StepBench", "Way", "max_seq",
           "run_setting"]

PARTS = ("teacher", "student", "loss", "backward+optimizer")
WAYS = ("paper", "mse", "paper compiled", "eofd_kernels", "eofd_kernels cached")
PAPER = WAYS[0]


@dataclass(frozen=True)
class Setting:
    """A teacher/student pair and its step. ``family``: ``"bert"`` (BertModel, no logits) or
    ``"gpt2"`` (GPT2LMHeadModel); ``teacher`` / ``student``: their config's arguments."""

    key: str
    label: str
    family: str
    teacher: dict
    student: dict
    layer_map: tuple[tuple[int, int], ...]
    batch: int
    seq: int
    use_logits: bool
    hidden_weight: float

    @classmethod
    def from_dict(cls, d: dict) -> Setting:
        return cls(**{**d, "layer_map": tuple(tuple(p) for p in d["layer_map"])})


SETTINGS = {
    "bert": Setting(
        "bert", "BERT-base (12x768) -> TinyBERT-4L (4x312), hidden loss only", "bert",
        dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
             intermediate_size=3072),
        dict(num_hidden_layers=4, hidden_size=312, num_attention_heads=12,
             intermediate_size=1200),
        uniform_layer_map(4, 12), batch=16, seq=128, use_logits=False, hidden_weight=1.0),
    # The paper's GPT-2 recipe (Table 14): L_pred + 1e-4 * EOFD, every student layer mapped.
    "gpt2": Setting(
        "gpt2", "GPT-2-medium-like (24x1024) -> GPT-2-small-like (12x768), "
                "L_pred + 1e-4 * EOFD", "gpt2",
        dict(n_layer=24, n_embd=1024, n_head=16), dict(n_layer=12, n_embd=768, n_head=12),
        uniform_layer_map(12, 24, embeddings=False), batch=4, seq=128, use_logits=True,
        hidden_weight=1e-4),
}


def _config(family: str, kwargs: dict):
    from transformers import BertConfig, GPT2Config

    if family == "bert":
        return BertConfig(**kwargs)
    # No key/value cache: a training step never reads it.
    return GPT2Config(**kwargs, use_cache=False)


def _model(family: str, kwargs: dict) -> torch.nn.Module:
    from transformers import BertModel, GPT2LMHeadModel

    if family == "bert":
        return BertModel(_config(family, kwargs), add_pooling_layer=False)
    return GPT2LMHeadModel(_config(family, kwargs))


def max_seq(setting: Setting) -> int:
    """The most tokens both models of ``setting`` take."""
    return min(_config(setting.family, kw).max_position_embeddings
               for kw in (setting.teacher, setting.student))


@dataclass
class Way:
    """loss(student_out, teacher_out) -> the step's loss; teacher(batch) -> the teacher's
    outputs with hidden states (None: the teacher's forward)."""

    name: str
    loss: Callable
    teacher: Callable | None = None


class _Clock:
    """Marks between a step's parts: perf_counter on a CPU; CUDA events on a GPU, read after
    one synchronize at the end (the host runs ahead of the device)."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def parts_ms(self) -> list[float]:
        pairs = itertools.pairwise(self.marks)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) for a, b in pairs]
        return [(b - a) * 1e3 for a, b in pairs]


class StepBench:
    """The models, projections, optimiser and batch of one setting, and its step."""

    def __init__(self, setting: Setting, device: torch.device, dtype: torch.dtype,
                 seed: int = 0):
        torch.manual_seed(seed)
        self.setting, self.device, self.dtype, self.seed = setting, device, dtype, seed
        # The teacher is frozen, so it runs in the step's dtype; the student trains in fp32
        # under autocast.
        self.teacher = _model(setting.family, setting.teacher).to(device, dtype).eval()
        self.teacher.requires_grad_(False)
        self.student = _model(setting.family, setting.student).to(device).train()
        self.projection = attach_projection(self.student, HiddenProjection(
            self.student.config.hidden_size, self.teacher.config.hidden_size,
            len(setting.layer_map)).to(device))
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-4)
        vocab = min(self.teacher.config.vocab_size, self.student.config.vocab_size)
        ids = torch.randint(vocab, (setting.batch, setting.seq), device=device)
        self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _teacher_forward(self, batch):
        return self.teacher(**batch, output_hidden_states=True)

    def step(self, way: Way, *, update: bool = True) -> tuple[list[float], float]:
        """One step of ``way``: the ms of each of :data:`PARTS` and the loss. ``update=False``
        stops after the loss (no backward, no optimiser step)."""
        clock = _Clock(self.device)
        clock.mark()
        with torch.no_grad(), self._autocast():
            teacher_out = (way.teacher or self._teacher_forward)(self.batch)
        clock.mark()
        with self._autocast():
            student_out = self.student(**self.batch, output_hidden_states=True)
        clock.mark()
        with self._autocast():
            loss = way.loss(student_out, teacher_out)
        clock.mark()
        if update:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            clock.mark()
        return clock.parts_ms(), loss.item()

    def first_loss(self, way: Way) -> float:
        """The loss of ``way`` at the current weights with the dropout masks of seed ``seed``."""
        torch.manual_seed(self.seed)
        return self.step(way, update=False)[1]

    def ways(self, names, power: float) -> list[Way]:
        return [self._way(name, power) for name in names]

    def _way(self, name: str, power: float) -> Way:
        s = self.setting
        if name in ("eofd_kernels", "eofd_kernels cached"):
            objective = DistillationLoss(s.layer_map, self.projection, power=power,
                                         hidden_weight=s.hidden_weight,
                                         use_logits=s.use_logits)
            return Way(name, lambda student_out, teacher_out:
                       objective(student_out, teacher_out).loss,
                       self._cached_teacher() if name == "eofd_kernels cached" else None)
        if name in ("paper", "paper compiled"):
            objective = self._per_layer(functools.partial(eofd_loss_reference, power=power))
            if name == "paper compiled":
                objective = torch.compile(objective, dynamic=False)
        elif name == "mse":
            objective = self._per_layer(F.mse_loss)
        else:
            raise ValueError(f"way: expected one of {WAYS}, got {name!r}")

        def loss(student_out, teacher_out):
            return objective([student_out.hidden_states[i] for i, _ in s.layer_map],
                             [teacher_out.hidden_states[j] for _, j in s.layer_map],
                             getattr(student_out, "logits", None),
                             getattr(teacher_out, "logits", None))
        return Way(name, loss)

    def _cached_teacher(self) -> Callable:
        """The teacher part of the cached way: the batch's outputs read from a cache of the
        teacher on this batch, recorded now (once per bench) into a folder the bench owns."""
        s = self.setting
        self._cache_folder = tempfile.TemporaryDirectory(prefix="eofd-step-cache-")
        with self._autocast():
            cache = record_teacher(
                self.teacher, [{k: v.cpu() for k, v in self.batch.items()}],
                layers=[t for _, t in s.layer_map], out=self._cache_folder.name,
                dtype="fp32" if self.dtype == torch.float32 else "bf16",
                logits="full" if s.use_logits else None, print_fn=lambda *_: None)
        examples = range(len(cache))

        def read(_batch):
            return cache.collate([cache[i] for i in examples])["teacher"].to(self.device)
        return read

    def _per_layer(self, layer_loss: Callable) -> Callable:
        """The loss a user writes around a per-layer loss: project, sum the layers, add
        ``L_pred``, as DistillationLoss defines them."""
        s, projection = self.setting, self.projection

        def objective(students, teachers, student_logits, teacher_logits):
            hidden = sum(layer_loss(h, t) for h, t in zip(projection(students), teachers))
            pred = (soft_cross_entropy_eager(student_logits, teacher_logits) if s.use_logits
                    else 0.0)
            return pred + s.hidden_weight * hidden
        return objective


def _spread(values: list[float]) -> tuple[float, float, float]:
    """median, p20, p80."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    p20, _, _, p80 = statistics.quantiles(values, n=5, method="inclusive")
    return statistics.median(values), p20, p80


def _timed(bench: StepBench, ways: list[Way], warmup: int, reps: int) -> dict[str, list]:
    for _ in range(warmup):
        for way in ways:
            bench.step(way)
    times = {way.name: [] for way in ways}
    for r in range(reps):
        k = r % len(ways)
        for way in ways[k:] + ways[:k]:
            times[way.name].append(bench.step(way)[0])
    return times


def _cpu_peaks(setting: Setting, names, dtype: torch.dtype, power: float) -> dict[str, float]:
    """Peak extra MB of one step of each way, in a fresh process (:func:`_cpu_child`)."""
    spec = {"setting": dataclasses.asdict(setting), "ways": list(names),
            "dtype": str(dtype).removeprefix("torch."), "power": power}
    return json.loads(memory.in_fresh_process("eofd_kernels.bench.step", json.dumps(spec)))


def _cpu_child(spec: dict) -> dict[str, float]:
    """In a fresh process: each way's warm-up step, then the peak extra MB of one step."""
    from ..cpu_cache import set_cpu_cache_limit

    set_cpu_cache_limit(0)  # its buffers are memory the step uses
    bench = StepBench(Setting.from_dict(spec["setting"]), torch.device("cpu"),
                      getattr(torch, spec["dtype"]))
    peaks = {}
    for way in bench.ways(spec["ways"], spec["power"]):
        bench.step(way)
        peaks[way.name] = memory.peak_extra_mb(lambda w=way: bench.step(w))
    return peaks


def run_setting(setting: Setting, device: torch.device, dtype: torch.dtype, *,
                ways=WAYS, power: float = 0.5, warmup: int = 1, reps: int = 5,
                measure_memory: bool = True, print_fn=print) -> list[dict]:
    """One record per way: step and part times (median, p20, p80), peak extra memory, the
    step-0 loss, and the ratios to the paper's code where it ran."""
    bench = StepBench(setting, device, dtype)
    built = bench.ways(ways, power)
    first = {way.name: bench.first_loss(way) for way in built}
    times = _timed(bench, built, warmup, reps)
    if not measure_memory:
        peaks = {}
    elif device.type == "cuda":
        peaks = {way.name: memory.cuda_peak_extra_mb(lambda w=way: bench.step(w), device)
                 for way in built}
    else:
        peaks = _cpu_peaks(setting, ways, dtype, power)
    records = []
    for way in built:
        steps = times[way.name]
        median, p20, p80 = _spread([sum(parts) for parts in steps])
        records.append({
            "setting": setting.key, "label": setting.label, "way": way.name,
            "device": device.type, "dtype": str(dtype).removeprefix("torch."),
            "batch": setting.batch, "seq": setting.seq, "power": power, "reps": reps,
            "step_ms": median, "p20_ms": p20, "p80_ms": p80,
            "parts": {part: statistics.median(s[i] for s in steps)
                      for i, part in enumerate(PARTS)},
            "steps_ms": steps, "peak_extra_mb": peaks.get(way.name), "loss0": first[way.name]})
    paper = next((r for r in records if r["way"] == PAPER), None)
    for r in records:
        r["vs_paper"] = paper["step_ms"] / r["step_ms"] if paper else None
        r["loss_part_vs_paper"] = (paper["parts"]["loss"] / r["parts"]["loss"] if paper
                                   else None)
        print_fn(f"{setting.key:<6} {r['dtype']:<9} {r['way']:<15} {r['step_ms']:9.1f} ms  "
                 + "  ".join(f"{p} {ms:.1f}" for p, ms in r["parts"].items()))
    return records


if __name__ == "__main__":  # the child of _cpu_peaks: a JSON spec
    print(json.dumps(_cpu_child(json.loads(sys.argv[1]))))
