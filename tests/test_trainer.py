"""EOFDTrainer against a plain hand-written training loop: the same student start, the same
batches (sequential sampling), the same optimizer steps. One process (SGD, and AdamW with
gradient clipping), and two torchrun processes (DDP over gloo, the EOFD weights of the global
batch through the process group) against the one-process loop on the whole batch.

Tolerances. In one process both loops run the same float32 operations in the same order, so
they agree to the last bit; the test allows 1e-7 (a few ulps of parameters of size ~0.1-1), so
that a transformers release reordering e.g. the loss scaling does not fail it, while a wrong
accumulation scale (x2), a skipped or repeated step, or another learning rate moves the
parameters by >= 1e-4 here (checked below: the steps move them by more than 1e-3). Under DDP the
gradient is summed over two ranks and the per-dim statistics are merged in float64 from two
shards: float32 reassociation of sums over ~50 tokens, ~1e-7 relative per step; 1e-5 absolute
after 3 SGD steps of lr 0.1 (as test_distributed.py's DDP loop)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tests.distill_models import batches, model_pair  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "train_with_eofd_trainer.py"
STEPS, ACCUMULATION, LR = 3, 2, 0.1


def training_setup(seed: int = 0):
    """(student, teacher, objective, micro-batches with labels): batches of 4 examples, two per
    optimizer step."""
    from eofd_kernels.distill import (
        DistillationLoss,
        HiddenProjection,
        attach_projection,
        uniform_layer_map,
    )

    pair = model_pair("bert", seed=seed)
    layer_map = uniform_layer_map(pair.student_layers, pair.teacher_layers)
    attach_projection(pair.student, HiddenProjection(pair.student_width, pair.teacher_width,
                                                     len(layer_map)))
    # The pooler feeds the classifier, so every parameter takes part (DDP needs that).
    objective = DistillationLoss(layer_map, pair.student.eofd_projection, power=0.5,
                                 hidden_weight=0.1, temperature=2.0)
    micro = batches(pair, STEPS * ACCUMULATION)
    for i, batch in enumerate(micro):
        # Labels make the Trainer think the loss is summed over tokens unless told otherwise.
        batch["labels"] = torch.arange(4) % 3 + i % 2
    return pair.student, pair.teacher, objective, micro


def plain_loop(student, teacher, objective, micro, *, optim: str, clip: float | None):
    """What EOFDTrainer should do, written out: per optimizer step the accumulated gradient of
    the micro-batch losses / ACCUMULATION, optional clipping, a linear-decay learning rate."""
    params = list(student.parameters())
    optimizer = (torch.optim.SGD(params, lr=LR) if optim == "sgd"
                 else torch.optim.AdamW(params, lr=LR, weight_decay=0.0))
    teacher.eval()
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = LR * (float(STEPS - step) / float(STEPS))  # linear, no warm-up
        for batch in micro[step * ACCUMULATION:(step + 1) * ACCUMULATION]:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                teacher_out = teacher(**inputs, output_hidden_states=True)
            out = objective(student(**inputs, output_hidden_states=True), teacher_out,
                            inputs["attention_mask"])
            (out.loss / ACCUMULATION).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def trainer_args(out_dir, *, optim: str, clip: float | None, world: int = 1):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4 // world,
        gradient_accumulation_steps=ACCUMULATION, learning_rate=LR, optim=optim,
        weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0,
        max_grad_norm=clip or 0.0, use_cpu=True, ddp_backend="gloo" if world > 1 else None,
        report_to=[], logging_steps=1, save_strategy="no", seed=0,
        remove_unused_columns=False, disable_tqdm=True, train_sampling_strategy="sequential")


def rows_of(micro):
    return [dict(zip(b, values)) for b in micro for values in zip(*b.values())]


def stack(items):
    return {k: torch.stack([i[k] for i in items]) for k in items[0]}


@pytest.mark.parametrize("optim, clip", [("sgd", None), ("adamw_torch", 1.0)])
def test_trainer_equals_a_plain_loop(tmp_path, optim, clip):
    from transformers import BertForSequenceClassification

    from eofd_kernels.distill import EOFDTrainer, load_student

    student, teacher, objective, micro = training_setup()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    want = plain_loop(student, teacher, objective, micro, optim=optim, clip=clip)
    student.load_state_dict(start)
    trainer = EOFDTrainer(model=student, args=trainer_args(tmp_path, optim=optim, clip=clip),
                          train_dataset=rows_of(micro), data_collator=stack, teacher=teacher,
                          objective=objective)
    trainer.train()
    assert trainer.state.global_step == STEPS
    assert any("eofd 1<-2" in entry for entry in trainer.state.log_history)
    moved = max((want[k] - start[k]).abs().max().item() for k in want)
    assert moved > 1e-3
    for name, value in student.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-7, msg=name)
    trainer.save_model(tmp_path / "saved")
    reloaded = load_student(BertForSequenceClassification, tmp_path / "saved")
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, want[name]), name


def test_trainer_on_two_processes_equals_the_plain_loop_on_the_whole_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parents[2]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(29500 + os.getpid() % 1000), str(SCRIPT), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    got = torch.load(tmp_path / "trained.pt")
    assert got["process_group"]  # the EOFD weights were the global batch's
    student, teacher, objective, micro = training_setup()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    want = plain_loop(student, teacher, objective, micro, optim="sgd", clip=None)
    assert max((want[k] - start[k]).abs().max().item() for k in want) > 1e-3
    for name, value in got["state"].items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-5, msg=name)
