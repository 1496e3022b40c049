"""Pure-PyTorch definition of the loss (DESIGN.md sections 1 and 5): the test oracle.

Written for clarity, not speed: it materialises several [N, V] tensors. It
computes in the inputs' (promoted) dtype, so float64 inputs give the float64
oracle and fp16/bf16 inputs give "PyTorch's own error" in that dtype. It is
also the fallback when the compiled extension is missing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._types import DistillLossOutput
from ._validation import (
    check_label_range,
    teacher_columns,
    validate_linear_options,
    validate_linear_tensors,
    validate_num_items,
    validate_options,
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

    if labels is None:
        counted = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        hard = torch.zeros(s.shape[0], dtype=out_dtype, device=s.device)
    else:
        y = labels.reshape(-1)
        check_label_range(y, vocab, ignore_index)
        counted = y != ignore_index
        hard = F.cross_entropy(
            s, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
        ).to(out_dtype)

    div = _divergence(s, t, temperature=temperature, divergence=divergence, beta=beta)
    coef = temperature**2 if scale_by_t2 else 1.0
    zero = torch.zeros((), dtype=out_dtype, device=s.device)
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
            count = torch.as_tensor(num_items_in_batch, device=s.device).to(out_dtype)
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
