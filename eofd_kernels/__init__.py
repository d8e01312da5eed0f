"""eofd-kernels: the EOFD distillation loss (Zhao et al., NAACL 2025) as fused kernels.

    import eofd_kernels as ek
    loss = ek.eofd_loss(student_hidden, teacher_hidden, power=0.5, mask=attention_mask)
"""

from . import reference
from .backends import available_backends
from .loss import EOFDLoss, eofd_loss, teacher_weights

__all__ = ["EOFDLoss", "available_backends", "eofd_loss", "reference", "teacher_weights"]
__version__ = "0.1.0"
