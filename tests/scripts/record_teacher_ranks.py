"""Run by tests/test_teacher_cache.py under torchrun: every process records its share of the
same batches (gloo on CPU) into one teacher cache."""

import sys
from pathlib import Path

import torch.distributed as dist

from eofd_kernels.distill import record_teacher

sys.path.insert(0, str(Path(__file__).parents[2]))
from tests.distill_models import model_pair  # noqa: E402
from tests.test_teacher_cache import RECORDING, recording_batches  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    pair = model_pair("bert")
    record_teacher(pair.teacher, recording_batches(pair), out=out_dir, **RECORDING)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
