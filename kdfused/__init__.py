"""kdfused: a fused knowledge-distillation loss for PyTorch (see README.md)."""

from . import reference, sparse
from ._info import __version__, build_info
from ._types import SparseTeacher
from .functional import fused_distill_loss, fused_linear_distill_loss
from .loss import FusedDistillLoss, FusedLinearDistillLoss

__all__ = [
    "FusedDistillLoss",
    "FusedLinearDistillLoss",
    "SparseTeacher",
    "__version__",
    "build_info",
    "fused_distill_loss",
    "fused_linear_distill_loss",
    "reference",
    "sparse",
]
