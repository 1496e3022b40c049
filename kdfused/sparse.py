"""The sparse-teacher capability (docs/design.md, "The sparse teacher"): train
from a teacher's stored top-k log-probabilities instead of its logits.

    teacher = kdfused.sparse.topk(teacher_logits, k=64)          # extract
    kdfused.sparse.save("store/", teacher, vocab_size=V)          # store
    teacher = kdfused.sparse.load("store/", rows=range(0, 4096))  # stream back
    loss = kdfused.FusedDistillLoss()(student_logits, teacher, labels)

This module holds the extraction and the loss's autograd function (which the
public functions call with validated inputs); the safetensors store is
:mod:`kdfused.sparse_store`.
"""

from __future__ import annotations

import torch

from . import ops
from ._autograd import SavedGradientFunction, counted_rows, entropy_or_none, grad_scale_of
from ._types import SparseTeacher
from ._validation import BACKENDS, LossOptions, _check_choice, _check_real, _check_temperature
from .sparse_store import ShardWriter, SparseStore, load, save

__all__ = ["SparseTeacher", "SparseStore", "ShardWriter", "topk", "save", "load"]


def topk(
    teacher_logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    *,
    top_p: float | None = None,
    backend="auto",
):
    """The teacher's k most likely ids per position and their log-probabilities.

    Returns a :class:`SparseTeacher` (``tail="ghost"``, ``store_temperature =
    temperature``) whose ``indices`` (int64) and ``logprobs`` (float32), each
    ``[..., k]``, are the k largest ``log_softmax(teacher_logits / temperature)``
    entries per row, largest first, ties to the lower id. The CPU kernel does
    this in one pass over each row, the CUDA kernel in one launch (up to k =
    2048); no ``[..., V]`` log-softmax is formed. float64 logits, and larger k
    on CUDA, take a stable sort of the log-softmax in plain PyTorch.

    With ``top_p``, row i keeps the shortest prefix of those ids (by
    descending probability, ties to the lower id) whose probability mass
    reaches ``top_p``, at most k, and the result is ragged (one row per
    position of the flattened leading dims, ``offsets`` giving each row's
    entries): a confident row keeps few ids, an uncertain one up to k. The
    prefix is cut from the k entries the same pass found (their masses summed
    in float64), not from another pass over the vocabulary.
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
    temperature = _check_temperature("temperature", temperature)
    _check_choice("backend", backend, BACKENDS)
    if top_p is not None:
        p = _check_real("top_p", top_p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    lead = teacher_logits.shape[:-1]
    rows = teacher_logits.detach().reshape(-1, vocab)
    too_many = rows.is_cuda and k > ops.CUDA_TOPK_MAX_K  # its kernel ranks in shared memory
    if (
        ops.choose_backend(backend, rows.device) == "reference"
        or rows.dtype == torch.float64
        or too_many
    ):
        indices, logprobs = _topk_reference(rows, k, temperature)
    else:
        indices, logprobs = ops.sparse_topk(rows, k, temperature)
    if top_p is not None:
        return _top_p_prefix(indices, logprobs, float(top_p), temperature)
    return SparseTeacher(
        indices.reshape(*lead, k),
        logprobs.reshape(*lead, k),
        tail="ghost",
        store_temperature=temperature,
    )


def _top_p_prefix(indices, logprobs, top_p: float, temperature: float) -> SparseTeacher:
    """The ragged rows of the shortest prefix of each [N, k] row (largest
    first) whose mass reaches top_p; a row that never reaches it keeps all k
    (as does a NaN row, whose log-probabilities stay NaN)."""
    n, k = logprobs.shape
    mass = logprobs.double().exp().cumsum(-1)
    reached = mass >= top_p
    first = reached.to(torch.int8).argmax(-1)  # the first position that reaches top_p
    count = torch.where(reached.any(-1), first + 1, torch.full_like(first, k))
    keep = torch.arange(k, device=logprobs.device)[None, :] < count[:, None]
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=logprobs.device)
    torch.cumsum(count, 0, out=offsets[1:])
    return SparseTeacher(indices[keep], logprobs[keep], "ghost", temperature, offsets=offsets)


def _topk_reference(rows: torch.Tensor, k: int, temperature: float):
    """topk in plain PyTorch: a stable descending sort of the log-softmax
    (equal values keep their id order), then its first k."""
    work = torch.promote_types(rows.dtype, torch.float32)
    log_p = torch.log_softmax(rows.to(work) / temperature, -1)
    values, order = torch.sort(log_p, dim=-1, descending=True, stable=True)
    return order[:, :k], values[:, :k].to(torch.float32)


class _SparseDistillFunction(SavedGradientFunction):
    """Forward runs sparse_distill_forward (loss rows and the student
    gradient of the reduced loss together)."""

    @staticmethod
    def forward(
        ctx, student, indices, logprobs, offsets, labels, meta, opts, num_items, compute_grad
    ):
        denom = counted_rows(labels, student.shape[0], opts.ignore_index, student.device, num_items)
        tail, store_temperature = meta
        hard, soft, grad = ops.sparse_distill_forward(
            student,
            indices,
            logprobs,
            labels,
            grad_scale_of(opts.reduction, denom),
            compute_grad=compute_grad,
            offsets=offsets,
            tail=tail,
            store_temperature=store_temperature,
            **opts.kernel(),
        )
        return SavedGradientFunction.finish(
            ctx, hard, soft, grad, opts.alpha, opts.reduction, denom
        )


def sparse_loss(student, teacher: SparseTeacher, labels, opts: LossOptions, num_items_in_batch):
    """(loss, hard, soft, None) of ``[N, V]`` student logits against a sparse
    teacher of N rows and ``[N]`` labels (or None). Ragged rows go to the
    kernel as they are (their offsets with them), in their own dtypes."""
    flat = teacher.flatten()
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    outputs = _SparseDistillFunction.apply(
        student,
        flat.indices,
        flat.logprobs.detach(),
        flat.offsets,
        labels,
        (teacher.tail, teacher.store_temperature),
        opts,
        num_items_in_batch,
        compute_grad,
    )
    return entropy_or_none(outputs, False)
