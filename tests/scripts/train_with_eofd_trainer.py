"""Run by tests/test_trainer.py under torchrun (or alone): EOFDTrainer on a small BERT pair
for a few steps, then save the student; rank 0 writes the trained student's outputs."""

import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

from eofd_kernels.distill import (
    DistillationLoss,
    EOFDTrainer,
    HiddenProjection,
    attach_projection,
    uniform_layer_map,
)

sys.path.insert(0, str(Path(__file__).parents[2]))
from tests.distill_models import batches, model_pair  # noqa: E402


def main(out_dir: str, bf16: str) -> None:
    pair = model_pair("bert")
    layer_map = uniform_layer_map(pair.student_layers, pair.teacher_layers)
    attach_projection(pair.student, HiddenProjection(pair.student_width, pair.teacher_width,
                                                     len(layer_map)))
    objective = DistillationLoss(layer_map, pair.student.eofd_projection, power=0.5,
                                 temperature=2.0)
    rows = [dict(zip(b, values)) for b in batches(pair, 4) for values in zip(*b.values())]
    args = TrainingArguments(output_dir=out_dir, max_steps=3, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-3, use_cpu=True,
                             ddp_backend="gloo", report_to=[], logging_steps=1,
                             save_strategy="no", bf16=bf16 == "bf16", seed=0,
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = EOFDTrainer(model=pair.student, args=args, train_dataset=rows,
                          data_collator=lambda items: {k: torch.stack([i[k] for i in items])
                                                       for k in items[0]},
                          teacher=pair.teacher, objective=objective)
    trainer.train()
    trainer.save_model(out_dir)
    if trainer.is_world_process_zero():
        logged = [k for entry in trainer.state.log_history for k in entry if k.startswith("eofd")]
        assert logged, trainer.state.log_history
        # Without the autocast wrapper the Trainer put around forward under bf16.
        student = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        student.eval()
        probe = batches(pair, 1, seed=7)[0]
        with torch.no_grad():
            out = student(**probe, output_hidden_states=True)
            projected = student.eofd_projection([out.hidden_states[s] for s, _ in layer_map])
        torch.save({"probe": probe, "projected": projected,
                    "process_group": objective.eofd.process_group is not None},
                   Path(out_dir) / "expected.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
