"""``python -m eofd_kernels``: the ``eofd-kernels`` command (``torchrun ... -m eofd_kernels``)."""

import sys

from .cli import main

sys.exit(main())
