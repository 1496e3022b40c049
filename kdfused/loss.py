"""FusedDistillLoss: the drop-in nn.Module."""

from __future__ import annotations

import torch

from ._validation import validate_options
from .functional import fused_distill_loss


class FusedDistillLoss(torch.nn.Module):
    r"""Knowledge-distillation loss, fused: hard cross-entropy plus a divergence
    between temperature-softened teacher and student distributions.

    Per row i, with p_s = softmax(s_i / T), p_t = softmax(t_i / T) and
    c = T^2 if ``scale_by_t2`` else 1 (Hinton et al. 2015):

    .. math::

        \mathrm{loss}_i = \alpha \, \mathrm{CE}(s_i, y_i) + (1 - \alpha)\, c\, D(p_t, p_s)

    with D = KL(p_t || p_s) (``"forward_kl"``), KL(p_s || p_t) (``"reverse_kl"``)
    or beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s
    (``"jsd"``). Rows labelled ``ignore_index`` are ignored; ``reduction`` is
    ``"batchmean"`` (per counted row, unlike ``KLDivLoss(reduction="mean")``,
    which also divides by V), ``"sum"`` or ``"none"``.

    Example::

        loss_fn = kdfused.FusedDistillLoss(temperature=2.0, alpha=0.5)
        loss = loss_fn(student_logits, teacher_logits, labels)   # [..., V], [..., V], [...]
        loss.backward()

    See :func:`kdfused.fused_distill_loss` for the arguments.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        alpha: float = 0.5,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        scale_by_t2: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        # Fail at construction, not at the first training step.
        validate_options(
            temperature=temperature,
            alpha=alpha,
            divergence=divergence,
            beta=beta,
            reduction=reduction,
            ignore_index=ignore_index,
            scale_by_t2=scale_by_t2,
            backend=backend,
        )
        self.temperature = temperature
        self.alpha = alpha
        self.divergence = divergence
        self.beta = beta
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.scale_by_t2 = scale_by_t2
        self.backend = backend

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_components: bool = False,
    ):
        return fused_distill_loss(
            student_logits,
            teacher_logits,
            labels,
            temperature=self.temperature,
            alpha=self.alpha,
            divergence=self.divergence,
            beta=self.beta,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            scale_by_t2=self.scale_by_t2,
            backend=self.backend,
            return_components=return_components,
        )

    def extra_repr(self) -> str:
        beta = f", beta={self.beta}" if self.divergence == "jsd" else ""
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, "
            f"divergence={self.divergence!r}{beta}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, scale_by_t2={self.scale_by_t2}, "
            f"backend={self.backend!r}"
        )
