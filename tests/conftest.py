"""Test setup: run the Triton kernels through Triton's CPU interpreter where no GPU exists;
shared fixtures.

TRITON_INTERPRET must be set before ``triton.jit`` decorates our kernels, i.e. before
``eofd_kernels.backends.triton_kernels`` is imported; conftest runs before every test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def one_rank_group(tmp_path_factory):
    """A gloo process group of this process alone (split batches of one rank)."""
    import torch.distributed as dist

    store = tmp_path_factory.mktemp("store") / "file"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()
