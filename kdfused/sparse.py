"""The sparse teacher (DESIGN.md section 6): train from a teacher's stored
top-k log-probabilities instead of its logits.

    teacher = kdfused.sparse.topk(teacher_logits, k=64)          # extract
    kdfused.sparse.save("store/", teacher, vocab_size=V)          # store
    teacher = kdfused.sparse.load("store/", rows=range(0, 4096))  # stream back
    loss = kdfused.FusedDistillLoss()(student_logits, teacher, labels)

This module holds the extraction and the loss's autograd function; the
safetensors store is :mod:`kdfused.sparse_store`.
"""

from __future__ import annotations

import torch

from . import ops, reference
from ._types import DistillLossOutput, SparseTeacher
from ._validation import (
    _check_labels,
    validate_num_items,
    validate_options,
    validate_sparse_teacher,
)
from .functional import SavedGradientFunction, choose_backend, counted_rows, kernel_dtype_check
from .sparse_store import ShardWriter, SparseStore, load, save

__all__ = [
    "SparseTeacher",
    "SparseStore",
    "ShardWriter",
    "topk",
    "save",
    "load",
    "sparse_distill_loss",
]


def topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, *, backend="auto"):
    """The teacher's k most likely ids per position and their log-probabilities.

    Returns a :class:`SparseTeacher` (``tail="ghost"``, ``store_temperature =
    temperature``) whose ``indices`` (int64) and ``logprobs`` (float32), each
    ``[..., k]``, are the k largest ``log_softmax(teacher_logits / temperature)``
    entries per row, largest first, ties to the lower id. The CPU kernel does
    this in one pass over each row, the CUDA kernel in one launch (up to k =
    2048); no ``[..., V]`` log-softmax is formed. float64 logits, and larger k
    on CUDA, take a stable sort of the log-softmax in plain PyTorch.
    """
    if not isinstance(teacher_logits, torch.Tensor) or not teacher_logits.is_floating_point():
        raise TypeError("teacher_logits must be a floating-point tensor [..., V]")
    if teacher_logits.dim() < 1 or teacher_logits.shape[-1] == 0:
        raise ValueError(
            f"teacher_logits must be [..., V] with V > 0, got shape {tuple(teacher_logits.shape)}"
        )
    vocab = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, V] with V = {vocab}, got {k!r}")
    validate_options(
        temperature=temperature,
        alpha=0.0,
        divergence="forward_kl",
        beta=0.5,
        reduction="sum",
        ignore_index=-100,
        scale_by_t2=True,
        backend=backend,
    )
    lead = teacher_logits.shape[:-1]
    rows = teacher_logits.detach().reshape(-1, vocab)
    too_many = rows.is_cuda and k > ops.CUDA_TOPK_MAX_K  # its kernel ranks in shared memory
    if (
        choose_backend(backend, rows.device) == "reference"
        or rows.dtype == torch.float64
        or too_many
    ):
        indices, logprobs = _topk_reference(rows, k, temperature)
    else:
        indices, logprobs = ops.sparse_topk(rows, k, temperature)
    return SparseTeacher(
        indices.reshape(*lead, k),
        logprobs.reshape(*lead, k),
        tail="ghost",
        store_temperature=temperature,
    )


def _topk_reference(rows: torch.Tensor, k: int, temperature: float):
    """topk in plain PyTorch: a stable descending sort of the log-softmax
    (equal values keep their id order), then its first k."""
    work = torch.promote_types(rows.dtype, torch.float32)
    log_p = torch.log_softmax(rows.to(work) / temperature, -1)
    values, order = torch.sort(log_p, dim=-1, descending=True, stable=True)
    return order[:, :k], values[:, :k].to(torch.float32)


class _SparseDistillFunction(SavedGradientFunction):
    """The sparse teacher's: forward runs sparse_distill_forward."""

    @staticmethod
    def forward(ctx, student, indices, logprobs, labels, options, num_items, compute_grad):
        reduction = options["reduction"]
        denom = counted_rows(
            labels, student.shape[0], options["ignore_index"], student.device, num_items
        )
        grad_scale = denom.reciprocal() if reduction == "batchmean" else None
        kernel_options = {k: v for k, v in options.items() if k != "reduction"}
        hard, soft, grad = ops.sparse_distill_forward(
            student,
            indices,
            logprobs,
            labels,
            grad_scale,
            compute_grad=compute_grad,
            **kernel_options,
        )
        alpha = options["alpha"]
        return SavedGradientFunction.finish(ctx, hard, soft, grad, alpha, reduction, denom, 7)


def sparse_distill_loss(
    student_logits: torch.Tensor,
    teacher: SparseTeacher,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    scale_by_t2: bool = True,
    label_smoothing: float = 0.0,
    backend: str = "auto",
    teacher_vocab: str = "exact",
    num_items_in_batch: int | torch.Tensor | None = None,
    return_components: bool = False,
):
    """:func:`kdfused.fused_distill_loss` with a :class:`SparseTeacher` (which
    calls this): the loss of DESIGN.md section 6, fused. Its options are
    fused_distill_loss's; the tail rule and store temperature are the
    teacher's."""
    validate_options(
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        reduction=reduction,
        ignore_index=ignore_index,
        scale_by_t2=scale_by_t2,
        backend=backend,
        label_smoothing=label_smoothing,
    )
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        raise TypeError("student_logits must be a floating-point tensor [..., V]")
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError(
            f"student_logits must be [..., V] with V > 0, got shape {tuple(student_logits.shape)}"
        )
    lead = student_logits.shape[:-1]
    validate_sparse_teacher(
        lead,
        student_logits.device,
        teacher,
        divergence=divergence,
        teacher_vocab=teacher_vocab,
        what=f"student_logits {tuple(student_logits.shape)}",
    )
    _check_labels(labels, lead, student_logits.device, alpha=alpha, lead_of="logits")
    validate_num_items(num_items_in_batch, reduction)
    options = dict(
        temperature=float(temperature),
        store_temperature=teacher.store_temperature,
        tail=teacher.tail,
        alpha=float(alpha),
        divergence=divergence,
        beta=float(beta),
        ignore_index=int(ignore_index),
        scale_by_t2=scale_by_t2,
        label_smoothing=float(label_smoothing),
    )
    if choose_backend(backend, student_logits.device) == "reference":
        return reference.sparse_distill_loss(
            student_logits,
            teacher.indices,
            teacher.logprobs,
            labels,
            reduction=reduction,
            num_items_in_batch=num_items_in_batch,
            return_components=return_components,
            **options,
        )
    kernel_dtype_check("student_logits", student_logits)
    vocab = student_logits.shape[-1]
    flat = teacher.flatten()
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, hard, soft = _SparseDistillFunction.apply(
        student_logits.reshape(-1, vocab),
        flat.indices,
        flat.logprobs.detach(),
        None if labels is None else labels.reshape(-1),
        dict(options, reduction=reduction),
        num_items_in_batch,
        compute_grad,
    )
    if reduction == "none":
        loss, hard, soft = loss.reshape(lead), hard.reshape(lead), soft.reshape(lead)
    if return_components:
        return DistillLossOutput(loss, hard, soft)
    return loss
