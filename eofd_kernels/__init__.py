"""eofd-kernels: the EOFD distillation loss (Zhao et al., NAACL 2025) as fused kernels.

    import eofd_kernels as ek
    loss = ek.eofd_loss(student_hidden, teacher_hidden, power=0.5, mask=attention_mask)
"""

from . import reference
from .backends import available_backends
from .cpu_cache import cpu_cache_info, empty_cpu_cache, set_cpu_cache_limit
from .loss import EOFDLoss, eofd_loss, teacher_weights
from .outliers import OutlierScan, outlier_dims
from .projected_loss import eofd_projected_loss

__all__ = ["EOFDLoss", "OutlierScan", "available_backends", "cpu_cache_info", "empty_cpu_cache",
           "eofd_loss", "eofd_projected_loss", "outlier_dims", "reference", "set_cpu_cache_limit",
           "teacher_weights"]
__version__ = "0.1.0"
