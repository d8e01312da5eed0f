"""``EOFDTrainer``: a Hugging Face ``Trainer`` that distils a teacher into the student it
trains, with ``L = L_pred + lambda * sum_l EOFD_l`` (:class:`DistillationLoss`).

* The teacher is frozen, in eval mode, on the student's device and in its dtype; or there is
  none (``teacher=None``) and the batches carry its recorded outputs: ``train_dataset`` a
  :class:`~eofd_kernels.distill.teacher_cache.TeacherCache` (its ``collate`` is the default
  collator there).
* The projections live on the student (``attach_projection``): the Trainer's optimizer trains
  them and ``save_model`` writes them with it; :func:`load_student` reads both back.
* Under ``torchrun`` (DDP; gloo on CPU) the objective's EOFD weights are the whole global
  batch's (``process_group``), so the result does not depend on the number of processes.
* Per-layer EOFD losses are logged through the Trainer's logging (``eofd <layer>``), averaged
  over the steps since the last log.

Gradient accumulation and bf16 autocast work as the Trainer does them; the EOFD weights are
then the micro-batch's (pass ``weights=`` to the loss for the whole optimizer batch's). The
loss is a mean over each micro-batch, so the Trainer always divides it by the accumulation
steps (also when a batch has ``labels``, which would otherwise make it expect a loss summed
over tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer

from .objective import DistillationLoss
from .projection import HiddenProjection, attach_projection
from .teacher_cache import TeacherCache

__all__ = ["EOFDTrainer", "load_student"]


class EOFDTrainer(Trainer):
    """``Trainer(model=student, args=..., train_dataset=..., data_collator=...)`` plus
    ``teacher`` and ``objective``; batches are the models' keyword inputs (``input_ids``,
    ``attention_mask``, and for T5 ``decoder_*``); a ``labels`` entry is ignored. With
    ``teacher=None`` each batch brings the teacher's output as ``batch["teacher"]`` (a
    :class:`TeacherCache` as ``train_dataset`` does; the cache is checked against the
    objective first). Under DDP every student parameter must take part in the loss (the
    projections run after the student's forward, so DDP cannot search for unused ones): drop
    an unused pooler."""

    def __init__(self, *args, teacher: torch.nn.Module | None, objective: DistillationLoss,
                 **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and training_args.ddp_find_unused_parameters is None:
            # The projections run after the student's forward: a search for unused
            # parameters would mark them ready before their gradients come. So every student
            # parameter must take part in the loss (drop a pooler the loss does not use).
            training_args.ddp_find_unused_parameters = False
        cache = kwargs.get("train_dataset")
        if teacher is None and isinstance(cache, TeacherCache):
            cache.check(objective)
            if kwargs.get("data_collator") is None:
                kwargs["data_collator"] = cache.collate
            if training_args is not None:
                # The Trainer would drop "teacher": not an argument of the student's forward.
                training_args.remove_unused_columns = False
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-micro-batch mean: never a loss already summed over the
        # accumulated batch's tokens, which the Trainer assumes for models taking **kwargs
        # when batches hold labels (it would then skip dividing by the accumulation steps).
        self.model_accepts_loss_kwargs = False
        self.teacher = None
        if teacher is not None:
            student_dtype = next(self.model.parameters()).dtype
            self.teacher = teacher.to(device=self.args.device, dtype=student_dtype).eval()
            self.teacher.requires_grad_(False)
        self.objective = objective
        if self.args.world_size > 1:
            import torch.distributed as dist

            objective.use_process_group(dist.group.WORLD)
        self._layer_sums: torch.Tensor | None = None
        self._layer_names: list[str] = []
        self._layer_steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        recorded = inputs.get("teacher")
        inputs = {k: v for k, v in inputs.items() if k not in ("labels", "teacher")}
        if self.teacher is not None:
            with torch.no_grad():
                teacher_out = self.teacher(**inputs, output_hidden_states=True)
        elif recorded is None:
            raise ValueError("teacher: None, and the batch has no 'teacher' entry (train from "
                             "a TeacherCache, or pass the teacher model)")
        else:
            teacher_out = recorded.to(self.args.device)
        student_out = model(**inputs, output_hidden_states=True)
        out = self.objective(student_out, teacher_out, inputs.get("attention_mask"),
                             inputs.get("decoder_attention_mask"))
        layer_losses = out.layer_losses.detach().float()
        self._layer_sums = (layer_losses if self._layer_sums is None
                            else self._layer_sums + layer_losses)
        self._layer_names, self._layer_steps = out.layer_names, self._layer_steps + 1
        return (out.loss, student_out) if return_outputs else out.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._layer_sums is not None:
            means = (self._layer_sums / self._layer_steps).tolist()
            logs.update({f"eofd {name}": value for name, value in zip(self._layer_names, means)})
            self._layer_sums, self._layer_steps = None, 0
        super().log(logs, *args, **kwargs)


def load_student(model_class, path: str | Path, name: str = "eofd_projection"):
    """A student saved by ``EOFDTrainer.save_model`` (or ``save_pretrained``), with its
    projection ``name`` rebuilt from the saved weights and attached again.

    model_class: e.g. ``transformers.BertModel`` or ``AutoModel``.
    """
    from safetensors.torch import load_file

    student = model_class.from_pretrained(path)
    tensors = load_file(str(Path(path) / "model.safetensors"))
    prefix = f"{name}.maps."
    weights = sorted((k for k in tensors if k.startswith(prefix) and k.endswith(".weight")),
                     key=lambda k: int(k[len(prefix):].split(".")[0]))
    if not weights:
        raise ValueError(f"path: {path} holds no projection named {name!r}")
    teacher_width, student_width = tensors[weights[0]].shape
    has_bias = f"{prefix}0.bias" in tensors
    projection = HiddenProjection(student_width, teacher_width, len(weights), bias=has_bias)
    projection.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items()
                                if k.startswith(name + ".")})
    attach_projection(student, projection, name=name)
    return student
