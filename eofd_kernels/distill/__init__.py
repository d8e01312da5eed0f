"""Distillation helpers around the EOFD loss for Hugging Face models.

    from eofd_kernels.distill import DistillationLoss, HiddenProjection, uniform_layer_map
    from eofd_kernels.distill import TeacherCache, record_teacher   # the teacher run once
"""

from .layer_map import LayerMap, explicit_layer_map, last_k_layer_map, uniform_layer_map
from .objective import DistillationLoss, DistillationOutput
from .prediction_loss import TopKLogits, soft_cross_entropy
from .projection import HiddenProjection, attach_projection
from .teacher_cache import CachedTeacherOutput, CacheError, TeacherCache, record_teacher

__all__ = ["CacheError", "CachedTeacherOutput", "DistillationLoss", "DistillationOutput",
           "EOFDTrainer", "HiddenProjection", "LayerMap", "TeacherCache", "TopKLogits",
           "attach_projection", "explicit_layer_map", "last_k_layer_map", "load_student",
           "record_teacher", "soft_cross_entropy", "uniform_layer_map"]


def __getattr__(name: str):
    """``EOFDTrainer`` and ``load_student`` import transformers' Trainer: only when asked."""
    if name in ("EOFDTrainer", "load_student"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
