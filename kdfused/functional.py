"""The public functions: the one place that validates user input and routes
it to a capability (docs/design.md, "Layers").

Each call validates once (the options as one LossOptions, the tensors),
flattens the leading dims, and hands the validated rows to one capability:
the dense or sparse kernel (kdfused.dense, kdfused.sparse), the chunked
fused-linear loss (kdfused.fused_linear), the vocab-parallel phases
(kdfused.parallel), or the pure-PyTorch reference (kdfused.reference).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import dense, fused_linear, ops, parallel, reference, sparse
from ._autograd import package
from ._types import SparseTeacher
from ._validation import (
    LossOptions,
    check_labels,
    teacher_columns,
    validate_linear_options,
    validate_linear_tensors,
    validate_num_items,
    validate_options,
    validate_sparse_teacher,
    validate_student_logits,
    validate_tensors,
)

# What validation raises; under a process group every rank learns of it.
_INPUT_ERRORS = (ValueError, TypeError, RuntimeError)


def _device_of(group, x) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# The fused-linear loss's inputs that the models' own matmuls take (and
# autocast would cast).
_LINEAR_TENSORS = (
    "student_hidden",
    "student_weight",
    "student_bias",
    "teacher_hidden",
    "teacher_weight",
    "teacher_bias",
)


def _autocast_dtype(x):
    """The dtype torch.autocast casts matmuls to on x's device, or None."""
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


def _entropy_available(opts: LossOptions, sparse_kernel: bool, group) -> None:
    if not opts.student_entropy:
        return
    if sparse_kernel or group is not None:
        what = "a process_group" if group is not None else "a SparseTeacher's kernel"
        raise ValueError(
            f"student_entropy is computed by the dense kernels of one process, not with {what} "
            "(backend='reference' computes it for a sparse teacher)"
        )


def _needs_kernels(opts: LossOptions, device) -> None:
    if opts.backend == "reference" or ops.choose_backend(opts.backend, device) != "kernel":
        raise RuntimeError(
            "kdfused: the vocab-parallel loss (process_group) needs the compiled kernels; "
            "for a reference, gather the logits and call kdfused.reference.distill_loss"
        )


def fused_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher,
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
    process_group=None,
    return_components: bool = False,
    student_entropy: bool = False,
):
    r"""Fused knowledge-distillation loss over logits of shape ``[..., V]``.

    Per row i (leading dims flattened), with T = ``temperature``,
    p_s = softmax(s_i / T), p_t = softmax(t_i / T) and c = T^2 if
    ``scale_by_t2`` else 1:

    .. math::

        \mathrm{loss}_i = \alpha \, \mathrm{CE}(s_i, y_i) + (1 - \alpha)\, c\, D_i

    where D_i is ``"forward_kl"``: KL(p_t || p_s), ``"reverse_kl"``:
    KL(p_s || p_t), or ``"jsd"``: beta KL(p_t || m) + (1 - beta) KL(p_s || m)
    with m = beta p_t + (1 - beta) p_s. Rows whose label is ``ignore_index``
    count for nothing. ``reduction`` is ``"batchmean"`` (sum over counted rows /
    their number, 0 when none count), ``"sum"`` or ``"none"`` (shape ``[...]``).

    Args:
        student_logits: ``[..., V]`` float32/float16/bfloat16; gets the gradient.
        teacher_logits: same shape, any of those dtypes; treated as a constant.
            Or a :class:`kdfused.SparseTeacher` (stored top-k log-probabilities,
            docs/design.md "Sparse teacher"): no ``[..., V]`` teacher tensor is
            formed.
        labels: int64 ``[...]`` class indices, or None (then ``alpha`` must be 0).
        backend: ``"auto"`` (the compiled kernel for the tensors' device, else
            the reference with a warning), ``"cpu"``, ``"cuda"`` or ``"reference"``.
        label_smoothing: the hard term's, as ``F.cross_entropy``'s: the
            target is (1 - eps) onehot(y) + eps / V.
        teacher_vocab: ``"exact"`` (a teacher with more columns than the
            student is an error) or ``"truncate"`` (its first V columns, a
            view: for a vocabulary padded for speed).
        num_items_in_batch: with ``"batchmean"``, divide the sum by this count
            (an int or a 0-d tensor, never read on the host) instead of this
            call's counted rows: the Hugging Face Trainer's convention for
            gradient accumulation and data parallelism.
        process_group: a ``torch.distributed`` group over which the vocabulary
            is split (tensor parallelism): each rank passes its contiguous
            shard ``[..., V_r]`` of the student's logits, in group-rank order,
            and of the teacher's (or the same sparse teacher, its ids global),
            and the same global-id labels; every rank gets the whole
            vocabulary's loss and its shard's gradient. A fixed-size agreement
            crosses first (ranks that disagree raise together), then only
            per-row statistics (one all_gather; two for ``"jsd"`` with dense
            teacher logits). Logits that are ``DTensor`` with a ``Shard(-1)``
            placement need no group: it comes from their mesh.
        return_components: also return the reduced, detached hard and soft terms
            as a :class:`DistillLossOutput` ``(loss, hard_loss, soft_loss)``.
        student_entropy: also compute the student's entropy H(softmax(s / T))
            of every counted row in the same kernel pass, reduced like the
            loss: the result is then a DistillLossOutput whose
            ``student_entropy`` holds it (what trainers log; dense teachers,
            one process).

    Returns:
        The float32 loss (or the NamedTuple). The gradient is computed in the
        forward call, so backward costs at most one scaling pass.
    """
    student_logits, teacher_logits, labels, group = parallel.from_dtensors(
        student_logits, teacher_logits, labels, process_group
    )
    group = parallel.split_over(group)
    sparse_teacher = isinstance(teacher_logits, SparseTeacher)
    try:
        opts = validate_options(
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
            student_entropy=student_entropy,
        )
        validate_num_items(num_items_in_batch, reduction)
        if sparse_teacher:
            validate_student_logits(student_logits, sharded=group is not None)
            lead = student_logits.shape[:-1]
            validate_sparse_teacher(
                lead,
                student_logits.device,
                teacher_logits,
                divergence=divergence,
                teacher_vocab=teacher_vocab,
                what=f"student_logits {tuple(student_logits.shape)}",
            )
            check_labels(labels, lead, student_logits.device, alpha=alpha, lead_of="logits")
            teacher = teacher_logits.flatten()
        else:
            validate_tensors(
                student_logits,
                teacher_logits,
                labels,
                alpha=alpha,
                teacher_vocab=teacher_vocab,
                sharded=group is not None,
            )
            lead = student_logits.shape[:-1]
            width = student_logits.shape[-1]
            teacher = teacher_columns(teacher_logits, width).reshape(lead.numel(), width)
        backend_kind = ops.choose_backend(opts.backend, student_logits.device)
        _entropy_available(opts, sparse_teacher and backend_kind == "kernel", group)
        if group is not None:
            _needs_kernels(opts, student_logits.device)
        if backend_kind == "kernel":
            ops.kernel_dtype_check("student_logits", student_logits)
            if not sparse_teacher:
                ops.kernel_dtype_check("teacher_logits", teacher_logits)
    except _INPUT_ERRORS as err:
        if group is not None:
            parallel.reject_together(group, err, _device_of(group, student_logits))
        raise
    # (reshape(-1, 0) is ambiguous for an empty shard)
    student = student_logits.reshape(lead.numel(), student_logits.shape[-1])
    y = None if labels is None else labels.reshape(-1)
    if group is not None:
        rows = parallel.logits_loss(student, teacher, y, opts, num_items_in_batch, group)
    elif backend_kind == "reference":
        capability = reference.sparse_loss if sparse_teacher else reference.dense_loss
        rows = capability(student, teacher, y, opts, num_items_in_batch)
    else:
        capability = sparse.sparse_loss if sparse_teacher else dense.dense_loss
        rows = capability(student, teacher, y, opts, num_items_in_batch)
    return package(*rows, lead, opts.reduction, return_components)


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
    backend: str = "auto",
    teacher_vocab: str = "exact",
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    process_group=None,
    return_components: bool = False,
    student_entropy: bool = False,
):
    r"""The distillation loss of :func:`kdfused.fused_distill_loss` with the
    logits formed from hidden states, chunk by chunk (never all N x V at once).

    The student's logits are ``softcap(student_logit_scale * (student_hidden
    @ student_weight.T + student_bias))`` (``softcap(x) = c tanh(x / c)`` with
    ``c = student_softcap``, the identity when None), the teacher's likewise
    from ``teacher_hidden`` / ``teacher_weight`` / ``teacher_bias`` /
    ``teacher_logit_scale`` / ``teacher_softcap``; or the teacher is given
    whole as ``teacher_logits``, or as a :class:`kdfused.SparseTeacher`
    (``teacher=``, or in ``teacher_logits``): exactly one of the sources.

    Args:
        student_hidden: ``[..., Hs]`` float32/float16/bfloat16; gets a gradient.
        student_weight: ``[V, Hs]`` (an ``nn.Linear`` lm_head's ``.weight``),
            same dtype; gets a gradient, accumulated over the chunks in float32
            and rounded to its dtype once. ``student_bias`` ``[V]`` likewise.
        labels: int64 ``[...]`` (the hidden states' leading dims), or None.
        teacher_hidden, teacher_weight, teacher_bias: ``[..., Ht]``, ``[V, Ht]``,
            ``[V]``; treated as constants.
        teacher_logits: ``[..., V]``, instead of the teacher's hidden states.
        teacher: a :class:`kdfused.SparseTeacher` of the hidden states'
            positions (stored top-k log-probabilities), read by the
            sparse-teacher kernel chunk by chunk.
        teacher_vocab: ``"truncate"`` takes a wider teacher's first V rows of
            its weight and bias (or columns of its logits), views, no copies.
        num_items_in_batch: the batchmean divisor, as in
            :func:`kdfused.fused_distill_loss`.
        chunk_size: rows per chunk; None picks it so that one chunk's buffers
            take at most 64 MiB on the CPU, 256 MiB on a GPU
            (``kdfused.fused_linear.CHUNK_BUDGET_BYTES``). The result does not
            depend on it beyond rounding.
        student_logit_scale, teacher_logit_scale: multipliers of the logits
            before the softcap, as some models form them (``logit_scale``,
            ``1 / logits_scaling``); 1 by default.
        process_group: a ``torch.distributed`` group over which the lm_heads
            are column-parallel: each rank passes its rows ``[V_r, H]`` of
            both weights (and biases, or its shard of ``teacher_logits``, or
            the same sparse teacher with global ids), in group-rank order, and
            the same hidden states and labels (global ids). Every rank gets
            the whole vocabulary's loss, its rows' weight and bias gradients,
            and its shard's part of the hidden states' gradient (summed over
            the group by the layer that feeds the lm_head, as in Megatron-LM).
            The agreement, then one all_gather of per-row statistics per
            forward (two for ``"jsd"`` with a dense teacher); each chunk's
            logits are formed twice, once per phase.
        The other options are :func:`kdfused.fused_distill_loss`'s.

    Returns:
        The float32 loss, or a :class:`DistillLossOutput`. The gradients are
        formed in the forward call; backward scales them (with
        ``reduction="none"`` it runs the chunk loop again, with the per-row
        upstream gradient).
    """
    cast = _autocast_dtype(student_hidden)
    if cast is not None:
        # Under torch.autocast the models form their lm_head products in the
        # autocast dtype; the chunk loop's matmuls write into buffers, which
        # autocast does not see: the inputs are cast here (differentiably)
        # and the loss runs with autocast off.
        call = {k: v for k, v in locals().items() if k != "cast"}
        for name in _LINEAR_TENSORS:
            x = call[name]
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                call[name] = x.to(cast)
        with torch.autocast(student_hidden.device.type, enabled=False):
            return fused_linear_distill_loss(**call)
    group = parallel.split_over(process_group)
    try:
        if isinstance(teacher_logits, SparseTeacher):
            if teacher is not None:
                raise ValueError("pass the sparse teacher once: teacher= or teacher_logits=")
            teacher, teacher_logits = teacher_logits, None
        if teacher is not None and not isinstance(teacher, SparseTeacher):
            raise TypeError(
                f"teacher must be a kdfused.SparseTeacher, got {type(teacher).__name__} (dense "
                "teacher logits go in teacher_logits)"
            )
        opts = validate_options(
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
            sharded=group is not None,
        )
        vocab = student_weight.shape[0]
        lead = student_hidden.shape[:-1]
        n = lead.numel()
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
            source = teacher_columns(teacher_logits, vocab).reshape(n, vocab)
        else:
            t_bias = None if teacher_bias is None else teacher_columns(teacher_bias, vocab, dim=0)
            t_hidden = teacher_hidden.reshape(n, teacher_hidden.shape[-1])
            source = (t_hidden, teacher_columns(teacher_weight, vocab, dim=0), t_bias)
        backend_kind = ops.choose_backend(opts.backend, student_hidden.device)
        _entropy_available(opts, teacher is not None and backend_kind == "kernel", group)
        if group is not None:
            _needs_kernels(opts, student_hidden.device)
        if backend_kind == "kernel":
            ops.kernel_dtype_check("student_hidden", student_hidden)
            if teacher_logits is not None:
                ops.kernel_dtype_check("teacher_logits", teacher_logits)
            elif teacher is None:
                ops.kernel_dtype_check("teacher_hidden", teacher_hidden)
    except _INPUT_ERRORS as err:
        if group is not None:
            parallel.reject_together(group, err, _device_of(group, student_hidden))
        raise
    s_hidden = student_hidden.reshape(n, student_hidden.shape[-1])
    y = None if labels is None else labels.reshape(-1)
    args = (s_hidden, student_weight, student_bias, y, source, opts, lin, num_items_in_batch)
    if group is not None:
        rows = parallel.linear_loss(*args, group)
    elif backend_kind == "reference":
        rows = reference.linear_loss(*args)
    else:
        rows = fused_linear.linear_loss(*args)
    return package(*rows, lead, opts.reduction, return_components)
