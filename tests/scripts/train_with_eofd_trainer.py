"""Run by tests/test_trainer.py under torchrun: EOFDTrainer (DDP over gloo) on the test's
batches, each process half of every batch; rank 0 writes the trained student's state."""

import sys
from pathlib import Path

import torch

from eofd_kernels.distill import EOFDTrainer

sys.path.insert(0, str(Path(__file__).parents[2]))
from tests.test_trainer import rows_of, stack, trainer_args, training_setup  # noqa: E402


def main(out_dir: str) -> None:
    student, teacher, objective, micro = training_setup()
    trainer = EOFDTrainer(model=student,
                          args=trainer_args(out_dir, optim="sgd", clip=None, world=2),
                          train_dataset=rows_of(micro), data_collator=stack, teacher=teacher,
                          objective=objective)
    trainer.train()
    if trainer.is_world_process_zero():
        trained = trainer.accelerator.unwrap_model(trainer.model)
        torch.save({"state": trained.state_dict(),
                    "process_group": objective.eofd.process_group is not None},
                   Path(out_dir) / "trained.pt")


if __name__ == "__main__":
    main(sys.argv[1])
