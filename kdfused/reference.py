"""Pure-PyTorch definition of the loss (docs/design.md): the test oracle.

Written for clarity, not speed: it materialises several [N, V] tensors. It
computes in the inputs' (promoted) dtype, so float64 inputs give the float64
oracle and fp16/bf16 inputs give "PyTorch's own error" in that dtype. It is
also the fallback when the compiled extension is missing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._autograd import package
from ._types import SparseTeacher
from ._validation import (
    LinearOptions,
    LossOptions,
    check_label_range,
    check_labels,
    check_sparse_indices,
    teacher_columns,
    validate_linear_options,
    validate_linear_tensors,
    validate_num_items,
    validate_options,
    validate_sparse_teacher,
    validate_student_logits,
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
    student_entropy: bool = False,
):
    """The distillation loss (docs/design.md, "The loss"), in plain PyTorch.

    Per row i (leading dims flattened), with p_s = softmax(s_i / T),
    p_t = softmax(t_i / T):

        loss_i = alpha * CE(s_i, y_i) + (1 - alpha) * c * D(p_t, p_s),
        c = T^2 if scale_by_t2 else 1,

    D being KL(p_t || p_s), KL(p_s || p_t) or the generalized JSD with weight
    beta. Rows with ``labels == ignore_index`` count for nothing. The teacher
    gets no gradient. Returns float32 (float64 for float64 inputs).
    """
    opts = validate_options(
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
        student_entropy=student_entropy,
    )
    validate_tensors(
        student_logits, teacher_logits, labels, alpha=alpha, teacher_vocab=teacher_vocab
    )
    validate_num_items(num_items_in_batch, reduction)
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    teacher_logits = teacher_columns(teacher_logits, vocab)
    y = None if labels is None else labels.reshape(-1)
    rows = dense_loss(
        student_logits.reshape(-1, vocab),
        teacher_logits.reshape(-1, vocab),
        y,
        opts,
        num_items_in_batch,
    )
    return package(*rows, lead, reduction, return_components)


def dense_loss(student, teacher, labels, opts: LossOptions, num_items_in_batch):
    """(loss, hard, soft) of validated [N, V] logits and [N] labels (or
    None), reduced as opts says ("none": [N] rows); what distill_loss and the
    public functions' reference backend compute."""
    work = torch.promote_types(student.dtype, teacher.dtype)
    out_dtype = torch.float64 if work == torch.float64 else torch.float32
    s = student.to(work)
    t = teacher.to(work).detach()
    hard, counted = _hard_rows(
        s, labels, s.shape[-1], opts.ignore_index, opts.label_smoothing, out_dtype
    )
    div = _divergence(
        s, t, temperature=opts.temperature, divergence=opts.divergence, beta=opts.beta
    )
    entropy = _entropy(s, opts.temperature) if opts.student_entropy else None
    return _combine(hard, div, counted, opts, num_items_in_batch, entropy)


def _entropy(s, temperature):
    """The student's entropy H(softmax(s / T)) of each row, 0 log 0 = 0."""
    log_p = F.log_softmax(s / temperature, dim=-1)
    p = log_p.exp()
    return -torch.where(p != 0, p * log_p, torch.zeros_like(p)).sum(-1)


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


def _combine(hard, div, counted, opts: LossOptions, num_items_in_batch, entropy=None):
    """(loss, hard, soft, entropy) with loss_i = alpha hard_i + (1 - alpha) c
    D_i at counted rows, each reduced ("none": the rows); entropy (rows, or
    None) reduced likewise, 0 at rows that do not count."""
    out_dtype = hard.dtype
    coef = opts.temperature**2 if opts.scale_by_t2 else 1.0
    zero = torch.zeros((), dtype=out_dtype, device=hard.device)
    soft = torch.where(counted, coef * div.to(out_dtype), zero)
    hard = torch.where(counted, hard, zero)
    # A term whose weight is 0 contributes 0, even where it is inf.
    alpha = opts.alpha
    if alpha == 0:
        loss = soft
    elif alpha == 1:
        loss = hard
    else:
        loss = alpha * hard + (1 - alpha) * soft

    def reduce(rows):
        if opts.reduction == "none":
            return rows
        total = rows.sum()
        if opts.reduction == "sum":
            return total
        if num_items_in_batch is not None:
            count = torch.as_tensor(num_items_in_batch, device=hard.device).to(out_dtype)
        else:
            count = counted.sum().to(out_dtype)
        return total / count.clamp(min=1)

    if entropy is not None:
        entropy = reduce(torch.where(counted, entropy.to(out_dtype), zero)).detach()
    return reduce(loss), reduce(hard).detach(), reduce(soft).detach(), entropy


def linear_logits(hidden, weight, bias, softcap=None, scale=1.0):
    """softcap(scale * (hidden @ weight.T + bias)), as the unfused model forms
    it: F.linear in the inputs' dtype, then the scale, then the cap."""
    logits = F.linear(hidden, weight, bias)
    if scale != 1.0:
        logits = logits * scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | SparseTeacher | None = None,
    teacher: SparseTeacher | None = None,
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
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    return_components: bool = False,
    student_entropy: bool = False,
):
    """The fused-linear loss (docs/design.md, "The fused-linear loss"), unfused: the
    whole [N, V] logits materialised as the model would form them
    (:func:`linear_logits`), then :func:`distill_loss` (or the sparse
    teacher's loss). chunk_size is checked and otherwise unused."""
    if isinstance(teacher_logits, SparseTeacher):
        teacher, teacher_logits = teacher_logits, teacher
    opts = validate_options(
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
        student_entropy=student_entropy,
    )
    lin = validate_linear_options(
        chunk_size=chunk_size,
        student_softcap=student_softcap,
        teacher_softcap=teacher_softcap,
        student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale,
    )
    validate_num_items(num_items_in_batch, reduction)
    validate_linear_tensors(
        student_hidden,
        student_weight,
        labels,
        student_bias=student_bias,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        teacher_logits=teacher_logits,
        sparse_teacher=teacher,
        alpha=alpha,
        teacher_vocab=teacher_vocab,
    )
    vocab = student_weight.shape[0]
    lead = student_hidden.shape[:-1]
    if teacher is not None:
        validate_sparse_teacher(
            lead,
            student_hidden.device,
            teacher,
            divergence=divergence,
            teacher_vocab=teacher_vocab,
            what=f"student_hidden {tuple(student_hidden.shape)}",
        )
        source = teacher.flatten()
    elif teacher_logits is not None:
        source = teacher_columns(teacher_logits, vocab).reshape(-1, vocab)
    else:
        bias = None if teacher_bias is None else teacher_columns(teacher_bias, vocab, dim=0)
        t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        source = (t_hidden, teacher_columns(teacher_weight, vocab, dim=0), bias)
    y = None if labels is None else labels.reshape(-1)
    rows = linear_loss(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_weight,
        student_bias,
        y,
        source,
        opts,
        lin,
        num_items_in_batch,
    )
    return package(*rows, lead, reduction, return_components)


def linear_loss(
    s_hidden,
    s_weight,
    s_bias,
    labels,
    teacher,
    opts: LossOptions,
    lin: LinearOptions,
    num_items_in_batch,
):
    """(loss, hard, soft) of validated [N, H] student hidden states, weight and
    bias against a teacher: a SparseTeacher of N rows, [N, V] logits, or a
    model's (hidden [N, Ht], weight, bias)."""
    s = linear_logits(s_hidden, s_weight, s_bias, lin.student_softcap, lin.student_logit_scale)
    if isinstance(teacher, SparseTeacher):
        return sparse_loss(s, teacher, labels, opts, num_items_in_batch)
    if isinstance(teacher, tuple):
        with torch.no_grad():
            teacher = linear_logits(*teacher, lin.teacher_softcap, lin.teacher_logit_scale)
    return dense_loss(s, teacher.detach(), labels, opts, num_items_in_batch)


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
    offsets: torch.Tensor | None = None,
):
    """The sparse-teacher loss (docs/design.md, "The sparse teacher") in plain
    PyTorch (``offsets``: ragged rows, as :class:`kdfused.SparseTeacher`'s).

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
    opts = validate_options(
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
    teacher = SparseTeacher(indices, logprobs, tail, store_temperature, offsets=offsets)
    validate_student_logits(student_logits)
    lead = student_logits.shape[:-1]
    validate_sparse_teacher(
        lead,
        student_logits.device,
        teacher,
        divergence=divergence,
        teacher_vocab="exact",
        what=f"student_logits {tuple(student_logits.shape)}",
    )
    check_labels(labels, lead, student_logits.device, alpha=alpha, lead_of="logits")
    validate_num_items(num_items_in_batch, reduction)
    vocab = student_logits.shape[-1]
    y = None if labels is None else labels.reshape(-1)
    rows = sparse_loss(
        student_logits.reshape(-1, vocab), teacher.flatten(), y, opts, num_items_in_batch
    )
    return package(*rows, lead, reduction, return_components)


def sparse_loss(student, teacher: SparseTeacher, labels, opts: LossOptions, num_items_in_batch):
    """(loss, hard, soft) of validated [N, V] student logits against a sparse
    teacher of N rows (its ids checked here) and [N] labels (or None)."""
    vocab = student.shape[-1]
    teacher = teacher.padded()  # ragged rows: the same rows padded
    check_sparse_indices(teacher.indices, vocab)
    work = torch.promote_types(student.dtype, teacher.logprobs.dtype)
    out_dtype = torch.float64 if work == torch.float64 else torch.float32
    s = student.to(work)
    k = teacher.k
    idx = teacher.indices.reshape(-1, k).to(torch.int64)
    lp = teacher.logprobs.reshape(-1, k).to(work).detach()
    hard, counted = _hard_rows(s, labels, vocab, opts.ignore_index, opts.label_smoothing, out_dtype)
    div = _sparse_divergence(
        s,
        idx,
        lp,
        tail=teacher.tail,
        store_temperature=teacher.store_temperature,
        temperature=opts.temperature,
        divergence=opts.divergence,
        beta=opts.beta,
    )
    entropy = _entropy(s, opts.temperature) if opts.student_entropy else None
    return _combine(hard, div, counted, opts, num_items_in_batch, entropy)


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
