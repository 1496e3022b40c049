"""Types shared by the public API and the reference."""

from typing import NamedTuple

import torch


class DistillLossOutput(NamedTuple):
    """What ``return_components=True`` returns.

    ``loss`` carries the gradient; ``hard_loss`` (the cross-entropy term) and
    ``soft_loss`` (the divergence term, including the T^2 factor when
    ``scale_by_t2``) are reduced like ``loss`` and detached, for logging:
    ``loss = alpha * hard_loss + (1 - alpha) * soft_loss``.
    """

    loss: torch.Tensor
    hard_loss: torch.Tensor
    soft_loss: torch.Tensor
