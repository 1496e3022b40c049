"""fused_distill_loss: validation, flattening, backend choice, autograd."""

from __future__ import annotations

import warnings

import torch

from . import ops, reference
from ._types import DistillLossOutput, SparseTeacher
from ._validation import (
    teacher_columns,
    validate_num_items,
    validate_options,
    validate_tensors,
)

_warned_fallback = False


def choose_backend(backend: str, device: torch.device) -> str:
    """Returns "kernel" or "reference" for these tensors (see DESIGN.md section 2)."""
    global _warned_fallback
    if backend == "reference":
        return "reference"
    if backend == "auto":
        if ops.has_kernel(device.type):
            return "kernel"
        if not _warned_fallback:
            _warned_fallback = True
            why = (
                f"the compiled extension failed to load ({ops.LOAD_ERROR})"
                if ops.LOAD_ERROR is not None
                else f"it was built without a kernel for {device.type} tensors"
            )
            warnings.warn(
                f"kdfused: using the slow pure-PyTorch reference because {why}. "
                "Build it with `pip install --no-build-isolation -e .` (see README).",
                RuntimeWarning,
                stacklevel=3,
            )
        return "reference"
    if device.type != backend:
        raise ValueError(f"backend={backend!r} needs {backend} tensors, got tensors on {device}")
    if not ops.has_kernel(backend):
        how = (
            "install a CUDA build of torch and the CUDA toolkit (or set KDFUSED_FORCE_CUDA=1), "
            "then rebuild with `pip install --no-build-isolation -e .`"
            if backend == "cuda"
            else "build it with `pip install --no-build-isolation -e .`"
        )
        detail = f" (import error: {ops.LOAD_ERROR})" if ops.LOAD_ERROR is not None else ""
        raise RuntimeError(f"kdfused: backend={backend!r} is not built{detail}: {how}")
    return "kernel"


def kernel_dtype_check(name: str, x: torch.Tensor) -> None:
    """The fused kernels' dtypes (the reference takes float64 too)."""
    if x.dtype not in ops.KERNEL_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; the fused kernels take float32, float16 or "
            "bfloat16 (use backend='reference' for float64)"
        )


def counted_rows(labels, n: int, ignore_index: int, device, num_items=None) -> torch.Tensor:
    """The batchmean divisor, as a float32 tensor (no host sync): the rows that
    count, or num_items_in_batch when given (an int or a 0-d tensor: the
    Hugging Face Trainer's count over a whole accumulated batch); at least 1."""
    if num_items is not None:
        count = torch.as_tensor(num_items, device=device).to(torch.float32)
    elif labels is None:
        count = torch.full((), n, dtype=torch.float32, device=device)
    else:
        count = (labels != ignore_index).sum().to(torch.float32)
    return count.clamp(min=1)


def combine_and_reduce(hard, soft, alpha: float, reduction: str, denom):
    """(loss, hard, soft) from the per-row terms: loss_i = alpha hard_i +
    (1 - alpha) soft_i, each reduced ("none": as they are)."""
    # A term whose weight is 0 contributes 0, even where it is inf. (Clones:
    # loss must not be the same tensor as a non-differentiable component.)
    if alpha == 0:
        rows = soft.clone()
    elif alpha == 1:
        rows = hard.clone()
    else:
        rows = alpha * hard + (1 - alpha) * soft

    def reduce(x):
        if reduction == "none":
            return x
        return x.sum() if reduction == "sum" else x.sum() / denom

    return reduce(rows), reduce(hard), reduce(soft)


def upstream_is_one(grad_loss: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether backward may hand back the gradient saved by forward as it is.

    The usual loss.backward() passes 1: the saved gradient is the answer and
    no pass over it is spent. (Autograd may then keep that very buffer as a
    leaf's .grad; a later backward through a retained graph after .grad was
    changed in place is refused by autograd's version check, never silently
    wrong.) On CUDA the test costs one host sync, as Liger-Kernel's does. No
    data-dependent branch inside a compiled graph or a CUDA graph capture
    (reading grad_loss there is not allowed): there the answer is False.
    """
    if torch.compiler.is_compiling() or (grad.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    return bool(grad_loss == 1)


def refuse_double_backward() -> None:
    """Backward with create_graph=True (grad mode on inside backward) would
    build a graph of the gradient formed in forward, a constant: a second
    derivative through it would silently lack its terms. Refused instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "kdfused: the loss cannot be differentiated twice (backward with "
            "create_graph=True): its gradient is formed in the forward pass as a constant. "
            "For higher-order gradients use the pure-PyTorch kdfused.reference losses."
        )


def scaled(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad times the upstream gradient (a scalar, or one value per row of
    grad), formed in float32 and rounded to grad's dtype once: the scale is
    shaped [N, 1] or [1, 1] (a 0-d float32 scale would be rounded to a
    16-bit grad's dtype first)."""
    scale = grad_loss.reshape(-1, *([1] * (grad.dim() - 1)))
    if torch.compiler.is_compiling():
        return (grad * scale).to(grad.dtype)
    return torch.mul(grad, scale, out=torch.empty_like(grad))


class SavedGradientFunction(torch.autograd.Function):
    """What the logits losses' autograd functions share: forward runs a fused
    kernel that also writes the student gradient of the reduced loss, and
    hands it to finish(); backward only scales that saved gradient by
    grad_output (and returns None for every other input)."""

    @staticmethod
    def finish(ctx, hard, soft, grad, alpha, reduction, denom, inputs: int):
        """(loss, hard, soft) reduced, with grad saved for backward; inputs:
        how many arguments forward took besides ctx."""
        loss, hard, soft = combine_and_reduce(hard, soft, alpha, reduction, denom)
        ctx.mark_non_differentiable(hard, soft)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        ctx.inputs = inputs
        return loss, hard, soft

    @staticmethod
    def backward(ctx, grad_loss, _grad_hard, _grad_soft):
        refuse_double_backward()
        (grad,) = ctx.saved_tensors
        none = (None,) * (ctx.inputs - 1)
        if ctx.reduction != "none" and upstream_is_one(grad_loss, grad):
            return (grad,) + none
        return (scaled(grad, grad_loss),) + none


class _FusedDistillFunction(SavedGradientFunction):
    """The dense teacher's: forward runs distill_forward."""

    @staticmethod
    def forward(
        ctx,
        student,
        teacher,
        labels,
        temperature,
        alpha,
        divergence,
        beta,
        reduction,
        ignore_index,
        scale_by_t2,
        label_smoothing,
        num_items,
        compute_grad,
    ):
        denom = counted_rows(labels, student.shape[0], ignore_index, student.device, num_items)
        grad_scale = denom.reciprocal() if reduction == "batchmean" else None
        hard, soft, grad = ops.distill_forward(
            student,
            teacher,
            labels,
            grad_scale,
            temperature=temperature,
            alpha=alpha,
            divergence=divergence,
            beta=beta,
            ignore_index=ignore_index,
            scale_by_t2=scale_by_t2,
            compute_grad=compute_grad,
            label_smoothing=label_smoothing,
        )
        return SavedGradientFunction.finish(ctx, hard, soft, grad, alpha, reduction, denom, 13)


def fused_distill_loss(
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
    backend: str = "auto",
    teacher_vocab: str = "exact",
    num_items_in_batch: int | torch.Tensor | None = None,
    process_group=None,
    return_components: bool = False,
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
            DESIGN.md section 6): no ``[..., V]`` teacher tensor is formed.
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
            is split (tensor parallelism, DESIGN.md section 7): each rank passes
            its contiguous shard ``[..., V_r]`` of both models' logits, in
            group-rank order, and the same global-id labels; every rank gets
            the whole vocabulary's loss and its shard's gradient. Only per-row
            statistics cross (one all_gather; two for ``"jsd"``). Logits that
            are ``DTensor`` with a ``Shard(-1)`` placement need no group: it
            comes from their mesh.
        return_components: also return the reduced, detached hard and soft terms
            as a :class:`DistillLossOutput` ``(loss, hard_loss, soft_loss)``.

    Returns:
        The float32 loss (or the NamedTuple). The gradient is computed in the
        forward call, so backward costs at most one scaling pass.
    """
    student_logits, teacher_logits, labels, process_group = _from_dtensors(
        student_logits, teacher_logits, labels, process_group
    )
    if process_group is not None:
        from .parallel import split_over

        process_group = split_over(process_group)
    if isinstance(teacher_logits, SparseTeacher):  # DESIGN.md section 6: its own module
        if process_group is not None:
            raise NotImplementedError(
                "kdfused: a sparse teacher with a process_group (vocab-parallel) is not "
                "supported yet"
            )
        from .sparse import sparse_distill_loss

        return sparse_distill_loss(
            student_logits,
            teacher_logits,
            labels,
            temperature=temperature,
            alpha=alpha,
            divergence=divergence,
            beta=beta,
            reduction=reduction,
            ignore_index=ignore_index,
            scale_by_t2=scale_by_t2,
            label_smoothing=label_smoothing,
            backend=backend,
            teacher_vocab=teacher_vocab,
            num_items_in_batch=num_items_in_batch,
            return_components=return_components,
        )
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
    validate_tensors(
        student_logits,
        teacher_logits,
        labels,
        alpha=alpha,
        teacher_vocab=teacher_vocab,
        sharded=process_group is not None,
    )
    validate_num_items(num_items_in_batch, reduction)
    vocab = student_logits.shape[-1]
    teacher_logits = teacher_columns(teacher_logits, vocab)
    options = dict(
        temperature=float(temperature),
        alpha=float(alpha),
        divergence=divergence,
        beta=float(beta),
        reduction=reduction,
        ignore_index=int(ignore_index),
        scale_by_t2=scale_by_t2,
        label_smoothing=float(label_smoothing),
    )
    if process_group is not None:
        return _vocab_parallel(
            student_logits,
            teacher_logits,
            labels,
            process_group=process_group,
            backend=backend,
            teacher_vocab=teacher_vocab,
            num_items_in_batch=num_items_in_batch,
            return_components=return_components,
            **options,
        )
    if choose_backend(backend, student_logits.device) == "reference":
        return reference.distill_loss(
            student_logits,
            teacher_logits,
            labels,
            num_items_in_batch=num_items_in_batch,
            return_components=return_components,
            **options,
        )
    kernel_dtype_check("student_logits", student_logits)
    kernel_dtype_check("teacher_logits", teacher_logits)

    lead = student_logits.shape[:-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    flat_labels = None if labels is None else labels.reshape(-1)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, hard, soft = _FusedDistillFunction.apply(
        student, teacher, flat_labels, *options.values(), num_items_in_batch, compute_grad
    )
    if reduction == "none":
        loss, hard, soft = loss.reshape(lead), hard.reshape(lead), soft.reshape(lead)
    if return_components:
        return DistillLossOutput(loss, hard, soft)
    return loss


def _from_dtensors(student, teacher, labels, process_group):
    """DTensor logits with a Shard(-1) placement: their local shards and the
    group of the mesh dim they are sharded over (DESIGN.md section 7). A
    teacher or labels given as DTensor too are read likewise (labels
    replicated); plain ones are taken as they are."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # a torch built without distributed
        return student, teacher, labels, process_group
    if not isinstance(student, DTensor):
        if isinstance(teacher, DTensor) or isinstance(labels, DTensor):
            raise TypeError("kdfused: a DTensor teacher or labels need DTensor student logits")
        return student, teacher, labels, process_group
    dims = [
        i
        for i, p in enumerate(student.placements)
        if isinstance(p, Shard) and p.dim in (-1, student.dim() - 1)
    ]
    if len(dims) != 1 or len(student.placements) != 1:
        raise ValueError(
            "kdfused: DTensor logits must be sharded over the vocabulary (the last dim) on a "
            f"1-D mesh, placements Shard(-1); got {student.placements}"
        )
    group = student.device_mesh.get_group(dims[0])
    if process_group is not None and process_group != group:
        raise ValueError("kdfused: process_group differs from the DTensor logits' mesh group")
    if isinstance(teacher, DTensor):
        if teacher.placements != student.placements or teacher.shape != student.shape:
            raise ValueError(
                "kdfused: DTensor teacher logits must have the student's shape and placements, "
                f"got {tuple(teacher.shape)} {teacher.placements} and {tuple(student.shape)} "
                f"{student.placements}"
            )
        teacher = teacher.to_local()
    if isinstance(labels, DTensor):
        labels = labels.full_tensor()
    return student.to_local(), teacher, labels, group


def _vocab_parallel(
    student,
    teacher,
    labels,
    *,
    process_group,
    backend,
    teacher_vocab,
    num_items_in_batch,
    return_components,
    reduction,
    **options,
):
    """fused_distill_loss over shards of the vocabulary (kdfused.parallel)."""
    from . import parallel

    if teacher_vocab != "exact":
        raise ValueError("kdfused: teacher_vocab='truncate' does not apply to vocabulary shards")
    if backend == "reference" or choose_backend(backend, student.device) != "kernel":
        raise RuntimeError(
            "kdfused: the vocab-parallel loss (process_group) needs the compiled kernels; "
            "for a reference, gather the logits and call kdfused.reference.distill_loss"
        )
    kernel_dtype_check("student_logits", student)
    kernel_dtype_check("teacher_logits", teacher)
    lead = student.shape[:-1]
    width = student.shape[-1]
    rows = lead.numel()  # (reshape(-1, 0) is ambiguous for an empty shard)
    loss, hard, soft = parallel.vocab_parallel_loss(
        student.reshape(rows, width),
        teacher.reshape(rows, width),
        None if labels is None else labels.reshape(-1),
        process_group=process_group,
        options=options,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )
    if reduction == "none":
        loss, hard, soft = loss.reshape(lead), hard.reshape(lead), soft.reshape(lead)
    if return_components:
        return DistillLossOutput(loss, hard, soft)
    return loss
