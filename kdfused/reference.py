"""Pure-PyTorch definition of the loss (DESIGN.md sections 1, 5, 6 and 8): the test oracle.

Written for clarity, not speed: it materialises several [N, V] tensors. It
computes in the inputs' (promoted) dtype, so float64 inputs give the float64
oracle and fp16/bf16 inputs give "PyTorch's own error" in that dtype. It is
also the fallback when the compiled extension is missing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._types import DistillLossOutput, SparseTeacher
from ._validation import (
    _check_labels,
    check_label_range,
    check_sparse_indices,
    teacher_columns,
    validate_linear_options,
    validate_linear_tensors,
    validate_num_items,
    validate_options,
    validate_sparse_fields,
    validate_sparse_teacher,
    validate_tensors,
)


def _kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p * (log p - log q) over the last dim, with 0 * log 0 = 0.

    The inner where keeps -inf - -inf (masked entries) out of both the value
    and the gradient; NaN in p is != 0 and so propagates.
    """
    live = p != 0
    diff = torch.where(live, log_p - log_q, torch.zeros_like(p))
    return (p * diff).sum(-1)


def _divergence(s, t, *, temperature, divergence, beta):
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    return _divergence_of(log_ps, log_pt, divergence=divergence, beta=beta)


def _divergence_of(log_ps, log_pt, *, divergence, beta):
    """D of section 1 between two distributions given as log-probabilities
    over the last dim (the vocabulary, or a sparse teacher's buckets)."""
    ps, pt = log_ps.exp(), log_pt.exp()
    if divergence == "forward_kl":
        return _kl(pt, log_pt, log_ps)
    if divergence == "reverse_kl":
        return _kl(ps, log_ps, log_pt)
    # JSD: log m = log(beta p_t + (1 - beta) p_s) as a log-add-exp, with entries
    # where both probabilities are 0 kept out of the gradient.
    live = (ps != 0) | (pt != 0)
    zero = torch.zeros_like(ps)
    log_m = torch.logaddexp(
        torch.where(live, log_pt, zero) + math.log(beta),
        torch.where(live, log_ps, zero) + math.log1p(-beta),
    )
    log_m = torch.where(live, log_m, torch.full_like(ps, -math.inf))
    return beta * _kl(pt, log_pt, log_m) + (1 - beta) * _kl(ps, log_ps, log_m)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
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
    teacher_vocab: str = "exact",
    num_items_in_batch: int | torch.Tensor | None = None,
    return_components: bool = False,
):
    """The distillation loss of DESIGN.md sections 1 and 8, in plain PyTorch.

    Per row i (leading dims flattened), with p_s = softmax(s_i / T),
    p_t = softmax(t_i / T):

        loss_i = alpha * CE(s_i, y_i) + (1 - alpha) * c * D(p_t, p_s),
        c = T^2 if scale_by_t2 else 1,

    D being KL(p_t || p_s), KL(p_s || p_t) or the generalized JSD with weight
    beta. Rows with ``labels == ignore_index`` count for nothing. The teacher
    gets no gradient. Returns float32 (float64 for float64 inputs).
    """
    validate_options(
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        reduction=reduction,
        ignore_index=ignore_index,
        scale_by_t2=scale_by_t2,
        backend="reference",
        teacher_vocab=teacher_vocab,
        label_smoothing=label_smoothing,
    )
    validate_tensors(
        student_logits, teacher_logits, labels, alpha=alpha, teacher_vocab=teacher_vocab
    )
    validate_num_items(num_items_in_batch, reduction)
    vocab = student_logits.shape[-1]
    teacher_logits = teacher_columns(teacher_logits, vocab)
    lead = student_logits.shape[:-1]
    work = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    out_dtype = torch.float64 if work == torch.float64 else torch.float32
    s = student_logits.reshape(-1, vocab).to(work)
    t = teacher_logits.reshape(-1, vocab).to(work).detach()

    hard, counted = _hard_rows(s, labels, vocab, ignore_index, label_smoothing, out_dtype)
    div = _divergence(s, t, temperature=temperature, divergence=divergence, beta=beta)
    return _combine(
        hard,
        div,
        counted,
        lead=lead,
        temperature=temperature,
        alpha=alpha,
        scale_by_t2=scale_by_t2,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        return_components=return_components,
    )


def _hard_rows(s, labels, vocab, ignore_index, label_smoothing, out_dtype):
    """The per-row cross-entropy (0 without labels) and which rows count."""
    if labels is None:
        counted = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        return torch.zeros(s.shape[0], dtype=out_dtype, device=s.device), counted
    y = labels.reshape(-1)
    check_label_range(y, vocab, ignore_index)
    hard = F.cross_entropy(
        s, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    return hard.to(out_dtype), y != ignore_index


def _combine(
    hard,
    div,
    counted,
    *,
    lead,
    temperature,
    alpha,
    scale_by_t2,
    reduction,
    num_items_in_batch,
    return_components,
):
    """loss_i = alpha hard_i + (1 - alpha) c D_i at counted rows, reduced."""
    out_dtype = hard.dtype
    coef = temperature**2 if scale_by_t2 else 1.0
    zero = torch.zeros((), dtype=out_dtype, device=hard.device)
    soft = torch.where(counted, coef * div.to(out_dtype), zero)
    hard = torch.where(counted, hard, zero)
    # A term whose weight is 0 contributes 0, even where it is inf.
    if alpha == 0:
        loss = soft
    elif alpha == 1:
        loss = hard
    else:
        loss = alpha * hard + (1 - alpha) * soft

    def reduce(rows):
        if reduction == "none":
            return rows.reshape(lead)
        total = rows.sum()
        if reduction == "sum":
            return total
        if num_items_in_batch is not None:
            count = torch.as_tensor(num_items_in_batch, device=hard.device).to(out_dtype)
        else:
            count = counted.sum().to(out_dtype)
        return total / count.clamp(min=1)

    if not return_components:
        return reduce(loss)
    return DistillLossOutput(reduce(loss), reduce(hard).detach(), reduce(soft).detach())


def _softcapped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else cap * torch.tanh(logits / cap)


def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    scale_by_t2: bool = True,
    label_smoothing: float = 0.0,
    teacher_vocab: str = "exact",
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    return_components: bool = False,
):
    """The fused-linear loss of DESIGN.md section 5, unfused: the whole [N, V]
    logits materialised as the model would form them (``F.linear`` in the
    inputs' dtype, then the softcap), then :func:`distill_loss`. chunk_size is
    checked and otherwise unused (there are no chunks here)."""
    validate_linear_options(
        chunk_size=chunk_size, student_softcap=student_softcap, teacher_softcap=teacher_softcap
    )
    validate_linear_tensors(
        student_hidden,
        student_weight,
        labels,
        student_bias=student_bias,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        teacher_logits=teacher_logits,
        alpha=alpha,
        teacher_vocab=teacher_vocab,
    )
    if teacher_weight is not None:
        teacher_weight = teacher_columns(teacher_weight, student_weight.shape[0], dim=0)
        if teacher_bias is not None:
            teacher_bias = teacher_columns(teacher_bias, student_weight.shape[0], dim=0)
    s = _softcapped(F.linear(student_hidden, student_weight, student_bias), student_softcap)
    if teacher_logits is None:
        with torch.no_grad():
            t = F.linear(teacher_hidden, teacher_weight, teacher_bias)
            teacher_logits = _softcapped(t, teacher_softcap)
    if isinstance(teacher_logits, SparseTeacher):  # DESIGN.md section 6
        if teacher_vocab != "exact":
            raise ValueError("teacher_vocab applies to dense teacher logits, not a sparse teacher")
        return sparse_distill_loss(
            s,
            teacher_logits.indices,
            teacher_logits.logprobs,
            labels,
            tail=teacher_logits.tail,
            store_temperature=teacher_logits.store_temperature,
            temperature=temperature,
            alpha=alpha,
            divergence=divergence,
            beta=beta,
            reduction=reduction,
            ignore_index=ignore_index,
            scale_by_t2=scale_by_t2,
            label_smoothing=label_smoothing,
            num_items_in_batch=num_items_in_batch,
            return_components=return_components,
        )
    return distill_loss(
        s,
        teacher_logits.detach(),
        labels,
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        reduction=reduction,
        ignore_index=ignore_index,
        scale_by_t2=scale_by_t2,
        label_smoothing=label_smoothing,
        teacher_vocab=teacher_vocab,
        num_items_in_batch=num_items_in_batch,
        return_components=return_components,
    )


def sparse_distill_loss(
    student_logits: torch.Tensor,
    indices: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    tail: str = "ghost",
    store_temperature: float = 1.0,
    temperature: float = 2.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    scale_by_t2: bool = True,
    label_smoothing: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    return_components: bool = False,
):
    """The sparse-teacher loss of DESIGN.md section 6 in plain PyTorch.

    The teacher keeps ``indices [..., k]`` (-1 pads) with log-probabilities
    ``logprobs`` at ``store_temperature``. At the loss temperature T its kept
    log-weights are ``logprobs * store_temperature / T``; with ``tail="ghost"``
    the dropped mass ``g = 1 - sum exp(logprobs)`` (clamped to [0, 1], 0 when
    all V ids are kept) is one more bucket, weighted ``log(g) *
    store_temperature / T``, and the student's buckets are ``p_s`` at the kept
    ids and its mass outside them (``p_s = softmax(s / T)``). The divergence is
    section 1's over these k + 1 buckets; ``tail="renormalize"`` drops the
    tail bucket (forward KL only). The hard term is section 1's.
    """
    validate_options(
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        reduction=reduction,
        ignore_index=ignore_index,
        scale_by_t2=scale_by_t2,
        backend="reference",
        label_smoothing=label_smoothing,
    )
    validate_sparse_fields(indices, logprobs, tail, store_temperature)
    _check_floating_student(student_logits)
    teacher = SparseTeacher(indices, logprobs, tail, store_temperature)
    lead = student_logits.shape[:-1]
    validate_sparse_teacher(
        lead,
        student_logits.device,
        teacher,
        divergence=divergence,
        teacher_vocab="exact",
        what=f"student_logits {tuple(student_logits.shape)}",
    )
    _check_labels(labels, lead, student_logits.device, alpha=alpha, lead_of="logits")
    validate_num_items(num_items_in_batch, reduction)
    vocab = student_logits.shape[-1]
    check_sparse_indices(indices, vocab)
    work = torch.promote_types(student_logits.dtype, logprobs.dtype)
    out_dtype = torch.float64 if work == torch.float64 else torch.float32
    s = student_logits.reshape(-1, vocab).to(work)
    k = indices.shape[-1]
    idx = indices.reshape(-1, k).to(torch.int64)
    lp = logprobs.reshape(-1, k).to(work).detach()

    hard, counted = _hard_rows(s, labels, vocab, ignore_index, label_smoothing, out_dtype)
    div = _sparse_divergence(
        s,
        idx,
        lp,
        tail=tail,
        store_temperature=store_temperature,
        temperature=temperature,
        divergence=divergence,
        beta=beta,
    )
    return _combine(
        hard,
        div,
        counted,
        lead=lead,
        temperature=temperature,
        alpha=alpha,
        scale_by_t2=scale_by_t2,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        return_components=return_components,
    )


def _check_floating_student(x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("student_logits must be a floating-point tensor [..., V]")
    if x.shape[-1] == 0:
        raise ValueError(f"the vocabulary dim V must be > 0, got logits of shape {tuple(x.shape)}")


def _sparse_divergence(s, idx, lp, *, tail, store_temperature, temperature, divergence, beta):
    """D over the k + 1 buckets of each row (section 6), [N]."""
    n, vocab = s.shape
    inf = torch.full((), -math.inf, dtype=s.dtype, device=s.device)
    valid = idx >= 0
    safe = idx.clamp(min=0)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    # The student's buckets: p_s at the kept ids, and its mass outside them.
    kept = torch.zeros(n, vocab, dtype=torch.int64, device=s.device)
    kept = kept.scatter_add(1, safe, valid.to(torch.int64)) > 0
    student_tail = torch.logsumexp(torch.where(kept, inf, log_ps), dim=-1)
    student = torch.cat([torch.where(valid, log_ps.gather(1, safe), inf), student_tail[:, None]], 1)
    # The teacher's: its re-tempered kept weights and its tail.
    lpv = torch.where(valid, lp, inf)
    all_kept = valid.sum(-1) == vocab
    mass = (1 - lpv.exp().sum(-1)).clamp(0, 1)
    mass = torch.where(all_kept, torch.zeros_like(mass), mass)
    ratio = store_temperature / temperature
    if tail == "ghost":
        teacher_tail = torch.log(mass) * ratio
    else:
        teacher_tail = inf.expand(n)
    weights = torch.cat([lpv * ratio, teacher_tail[:, None]], 1)
    # A renormalized row that keeps nothing has no teacher: D = 0 there.
    no_teacher = torch.isinf(weights).all(-1) & (weights < 0).all(-1)
    weights = torch.where(no_teacher[:, None], torch.zeros_like(weights), weights)
    teacher = F.log_softmax(weights, dim=-1)
    div = _divergence_of(student, teacher, divergence=divergence, beta=beta)
    return torch.where(no_teacher, torch.zeros_like(div), div)
