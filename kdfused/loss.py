"""FusedDistillLoss: the drop-in nn.Module."""

from __future__ import annotations

import torch

from ._types import SparseTeacher
from ._validation import validate_linear_options, validate_options
from .functional import fused_distill_loss, fused_linear_distill_loss


class _DistillOptions(torch.nn.Module):
    """Holds the loss options, checked at construction (not at the first
    training step)."""

    def __init__(
        self,
        temperature,
        alpha,
        divergence,
        beta,
        reduction,
        ignore_index,
        scale_by_t2,
        backend,
        teacher_vocab,
        label_smoothing,
    ):
        super().__init__()
        validate_options(
            temperature=temperature,
            alpha=alpha,
            divergence=divergence,
            beta=beta,
            reduction=reduction,
            ignore_index=ignore_index,
            scale_by_t2=scale_by_t2,
            backend=backend,
            teacher_vocab=teacher_vocab,
            label_smoothing=label_smoothing,
        )
        self.temperature = temperature
        self.alpha = alpha
        self.divergence = divergence
        self.beta = beta
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.scale_by_t2 = scale_by_t2
        self.backend = backend
        self.teacher_vocab = teacher_vocab
        self.label_smoothing = label_smoothing

    def options(self) -> dict:
        return dict(
            temperature=self.temperature,
            alpha=self.alpha,
            divergence=self.divergence,
            beta=self.beta,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            scale_by_t2=self.scale_by_t2,
            backend=self.backend,
            teacher_vocab=self.teacher_vocab,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        beta = f", beta={self.beta}" if self.divergence == "jsd" else ""
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, "
            f"divergence={self.divergence!r}{beta}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, scale_by_t2={self.scale_by_t2}, "
            f"backend={self.backend!r}, teacher_vocab={self.teacher_vocab!r}, "
            f"label_smoothing={self.label_smoothing}"
        )


class FusedDistillLoss(_DistillOptions):
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
        teacher = kdfused.sparse.topk(teacher_logits, k=64)       # or sparse.load(store, rows)
        loss = loss_fn(student_logits, teacher, labels)           # a stored top-k teacher
        # tensor parallel: each rank's vocabulary shard [..., V_r] of both models' logits
        tp_loss_fn = kdfused.FusedDistillLoss(process_group=tp_group)

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
        teacher_vocab: str = "exact",
        label_smoothing: float = 0.0,
        process_group=None,
    ):
        super().__init__(
            temperature,
            alpha,
            divergence,
            beta,
            reduction,
            ignore_index,
            scale_by_t2,
            backend,
            teacher_vocab,
            label_smoothing,
        )
        # A torch.distributed group over which the vocabulary is split (the
        # logits are each rank's shard), or None.
        self.process_group = process_group

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | SparseTeacher,
        labels: torch.Tensor | None = None,
        return_components: bool = False,
        *,
        num_items_in_batch: int | torch.Tensor | None = None,
        student_entropy: bool = False,
    ):
        return fused_distill_loss(
            student_logits,
            teacher_logits,
            labels,
            num_items_in_batch=num_items_in_batch,
            process_group=self.process_group,
            return_components=return_components,
            student_entropy=student_entropy,
            **self.options(),
        )


class FusedLinearDistillLoss(_DistillOptions):
    r"""The distillation loss from the last hidden states and the output
    (lm_head) weights, never holding the [N, V] logits: the logits are formed
    chunk by chunk, each chunk's loss and gradients computed by the fused
    kernel, and the gradients of the hidden states, weight and bias formed from
    them.

    The arguments come in the order of Liger-Kernel's ``LigerFusedLinearJSDLoss``::

        loss_fn = kdfused.FusedLinearDistillLoss(temperature=2.0, alpha=0.5)
        loss = loss_fn(student_hidden, student.lm_head.weight,
                       teacher_hidden, teacher.lm_head.weight, labels)
        loss = loss_fn(student_hidden, student.lm_head.weight, None, None, labels,
                       teacher_logits=teacher_logits)   # a teacher given as logits
        loss = loss_fn(student_hidden, student.lm_head.weight, None, None, labels,
                       teacher_logits=kdfused.sparse.load(store, rows))  # stored top-k

    Options as :class:`FusedDistillLoss`, plus ``chunk_size`` (rows per chunk;
    None: within a 64 MiB budget on the CPU, 256 MiB on a GPU),
    ``student_softcap`` / ``teacher_softcap`` (Gemma-2's final logit
    softcapping, c tanh(x / c)) and ``student_logit_scale`` /
    ``teacher_logit_scale`` (a multiplier of the logits before the cap). See
    :func:`kdfused.fused_linear_distill_loss`.
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
        teacher_vocab: str = "exact",
        label_smoothing: float = 0.0,
        chunk_size: int | None = None,
        student_softcap: float | None = None,
        teacher_softcap: float | None = None,
        process_group=None,
        student_logit_scale: float = 1.0,
        teacher_logit_scale: float = 1.0,
    ):
        super().__init__(
            temperature,
            alpha,
            divergence,
            beta,
            reduction,
            ignore_index,
            scale_by_t2,
            backend,
            teacher_vocab,
            label_smoothing,
        )
        validate_linear_options(
            chunk_size=chunk_size,
            student_softcap=student_softcap,
            teacher_softcap=teacher_softcap,
            student_logit_scale=student_logit_scale,
            teacher_logit_scale=teacher_logit_scale,
        )
        self.chunk_size = chunk_size
        self.student_softcap = student_softcap
        self.teacher_softcap = teacher_softcap
        self.student_logit_scale = student_logit_scale
        self.teacher_logit_scale = teacher_logit_scale
        self.process_group = process_group  # column-parallel lm_heads

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        *,
        teacher_logits: torch.Tensor | SparseTeacher | None = None,
        teacher: SparseTeacher | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        return_components: bool = False,
        student_entropy: bool = False,
    ):
        return fused_linear_distill_loss(
            student_hidden,
            student_weight,
            labels,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
            student_bias=student_bias,
            teacher_logits=teacher_logits,
            teacher=teacher,
            chunk_size=self.chunk_size,
            student_softcap=self.student_softcap,
            teacher_softcap=self.teacher_softcap,
            student_logit_scale=self.student_logit_scale,
            teacher_logit_scale=self.teacher_logit_scale,
            num_items_in_batch=num_items_in_batch,
            process_group=self.process_group,
            return_components=return_components,
            student_entropy=student_entropy,
            **self.options(),
        )

    def extra_repr(self) -> str:
        caps = "".join(
            f", {name}={value}"
            for name, value, default in (
                ("student_softcap", self.student_softcap, None),
                ("teacher_softcap", self.teacher_softcap, None),
                ("student_logit_scale", self.student_logit_scale, 1.0),
                ("teacher_logit_scale", self.teacher_logit_scale, 1.0),
            )
            if value != default
        )
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}{caps}"
