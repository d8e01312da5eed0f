"""Test setup: run the Triton kernels through Triton's CPU interpreter where no GPU exists.

TRITON_INTERPRET must be set before ``triton.jit`` decorates our kernels, i.e. before
``eofd_kernels.backends.triton_kernels`` is imported; conftest runs before every test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
