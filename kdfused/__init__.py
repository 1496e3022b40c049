"""kdfused: a fused knowledge-distillation loss for PyTorch (see README.md)."""

from . import reference
from .functional import fused_distill_loss
from .loss import FusedDistillLoss

__all__ = ["FusedDistillLoss", "fused_distill_loss", "reference"]
