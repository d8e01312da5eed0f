"""EOFDTrainer under torchrun: 2 CPU processes (DDP over gloo) train a small BERT pair for a
few steps (gradient accumulation, fp32 and bf16 autocast), save, and the reloaded student
with its projections reproduces the trained one's projected hidden states."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
SCRIPT = Path(__file__).parent / "scripts" / "train_with_eofd_trainer.py"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_two_processes_save_and_reload(tmp_path, precision):
    from transformers import BertForSequenceClassification

    from eofd_kernels.distill import load_student
    from eofd_kernels.distill.layer_map import uniform_layer_map

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parents[2]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(29500 + os.getpid() % 1000), str(SCRIPT), str(tmp_path),
         precision], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    expected = torch.load(tmp_path / "expected.pt")
    assert expected["process_group"]  # the EOFD weights were the global batch's
    student = load_student(BertForSequenceClassification, tmp_path).eval()
    layer_map = uniform_layer_map(2, 4)
    with torch.no_grad():
        out = student(**expected["probe"], output_hidden_states=True)
        projected = student.eofd_projection([out.hidden_states[s] for s, _ in layer_map])
    for got, want in zip(projected, expected["projected"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
