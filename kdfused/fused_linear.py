"""fused_linear_distill_loss: the loss from hidden states and output weights,
chunk by chunk, never holding the [N, V] logits (DESIGN.md section 5).

One autograd.Function owns the chunk loop. Per chunk of rows it forms the
student's logits with torch's own matmul, asks the teacher source for the
teacher's logits of the same rows, runs the fused kernel (loss rows and the
logits' gradient in one call), and turns that gradient into the gradients of
the hidden states, the weight and the bias with two more matmuls and a sum.
The teacher source is a small object per kind of teacher (hidden states +
weight, dense logits, a sparse top-k teacher) that runs the kernel for a
chunk, so that the loop has no branch per kind.

Memory beyond the inputs and their gradients: one chunk's student logits, the
kernel's gradient of them and the teacher's logits (none for dense teacher
logits, which are read in place), each a buffer reused by every chunk, plus a
float32 weight-gradient accumulator when the weight is 16-bit (a float32
weight accumulates into its own gradient). On the CPU the kernel writes the
gradient over the student's logits (distill_forward_inplace), one buffer
fewer; on a GPU, or with a student softcap, into its own buffer
(distill_forward_out).
"""

from __future__ import annotations

import torch

from . import ops, reference
from ._types import DistillLossOutput, SparseTeacher
from ._validation import (
    teacher_columns,
    validate_linear_options,
    validate_linear_tensors,
    validate_num_items,
    validate_options,
    validate_sparse_teacher,
)
from .functional import (
    choose_backend,
    combine_and_reduce,
    counted_rows,
    kernel_dtype_check,
    refuse_double_backward,
    scaled,
    upstream_is_one,
)

# chunk_size=None: as many rows as keep one chunk's buffers (student logits,
# their gradient unless it overwrites them, and the teacher's logits, in the
# inputs' dtypes) within this many bytes, rounded down to a multiple of 8 rows.
# On the CPU 64 MiB: 256 rows at V = 32000 in float32 with a hidden-states
# teacher. On a GPU 256 MiB: 344 rows at V = 128256 in bfloat16, as a chunk's
# matmul reads the whole weight and with fewer than a few hundred rows that
# read, not the arithmetic, would set its time.
CHUNK_BUDGET_BYTES = {"cpu": 64 * 2**20, "cuda": 256 * 2**20}


def default_chunk_size(n: int, row_bytes: int, device_type: str = "cpu") -> int:
    """Rows per chunk for N rows whose chunk buffers take row_bytes per row."""
    budget = CHUNK_BUDGET_BYTES.get(device_type, CHUNK_BUDGET_BYTES["cpu"])
    rows = budget // max(row_bytes, 1)
    if rows >= 8:
        rows -= rows % 8
    return max(1, min(n, rows))


def linear_logits(hidden, weight, bias, softcap, out=None):
    """softcap(hidden @ weight.T + bias) into `out` (rows x V), as the unfused
    model forms it: torch's matmul in the inputs' dtype, the cap c tanh(x / c)
    applied in place."""
    if bias is None:
        logits = torch.mm(hidden, weight.t(), out=out)
    else:
        logits = torch.addmm(bias, hidden, weight.t(), out=out)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


class _DenseSource:
    """What the dense teachers share: the dense kernel on a chunk's student
    logits and the teacher's logits of the same rows (self.logits)."""

    inplace = True  # may the kernel write the gradient over the student's logits
    allocates = False  # does distill return a gradient of its own (no chunk buffer for it)

    def distill(self, s, start, stop, buffer, y, grad_scale, options, mode, g_buffer):
        """(hard_rows, soft_rows, gradient or None) of the chunk [start, stop)
        whose student logits are s; mode: see _gradient_mode ("none": no
        gradient)."""
        t = self.logits(start, stop, buffer)
        if mode in ("none", "new"):
            return ops.distill_forward(s, t, y, grad_scale, **options, compute_grad=mode == "new")
        if mode == "inplace":
            return (*ops.distill_forward_inplace(s, t, y, grad_scale, **options), s)
        g = g_buffer[: stop - start]
        return (*ops.distill_forward_out(s, t, y, grad_scale, g, **options), g)


class _HiddenTeacher(_DenseSource):
    """The teacher's logits formed chunk by chunk from its hidden states and
    weight (no gradient: the teacher is a constant)."""

    def __init__(self, hidden, weight, bias, softcap):
        self.hidden, self.weight, self.bias, self.softcap = hidden, weight, bias, softcap

    def row_bytes(self) -> int:
        return self.weight.shape[0] * self.weight.element_size()

    def buffer(self, rows: int) -> torch.Tensor:
        return self.weight.new_empty(rows, self.weight.shape[0])

    def logits(self, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        out = buffer[: stop - start]
        return linear_logits(self.hidden[start:stop], self.weight, self.bias, self.softcap, out)


class _LogitsTeacher(_DenseSource):
    """Dense teacher logits [N, V], read in place chunk by chunk."""

    def __init__(self, logits):
        self.logits2d = logits

    def row_bytes(self) -> int:
        return 0

    def buffer(self, rows: int) -> None:
        return None

    def logits(self, start: int, stop: int, buffer) -> torch.Tensor:
        return self.logits2d[start:stop]


class _SparseSource:
    """A sparse teacher's [N, k] ids and log-probabilities (DESIGN.md section
    6), read in place chunk by chunk by the sparse-teacher kernel."""

    inplace = False
    allocates = False

    def __init__(self, indices, logprobs, tail, store_temperature):
        self.indices, self.logprobs = indices, logprobs
        self.meta = dict(tail=tail, store_temperature=store_temperature)

    def row_bytes(self) -> int:
        return 0

    def buffer(self, rows: int) -> None:
        return None

    def distill(self, s, start, stop, buffer, y, grad_scale, options, mode, g_buffer):
        i, lp = self.indices[start:stop], self.logprobs[start:stop]
        opts = {**options, **self.meta}
        if mode in ("none", "new"):
            return ops.sparse_distill_forward(
                s, i, lp, y, grad_scale, **opts, compute_grad=mode == "new"
            )
        g = g_buffer[: stop - start]
        return (*ops.sparse_distill_forward_out(s, i, lp, y, grad_scale, g, **opts), g)


def _teacher_source(t_hidden, t_weight, t_bias, t_logits, t_cap, t_indices, t_logprobs, t_sparse):
    if t_sparse is not None:
        return _SparseSource(t_indices, t_logprobs, *t_sparse)
    if t_logits is not None:
        return _LogitsTeacher(t_logits)
    return _HiddenTeacher(t_hidden, t_weight, t_bias, t_cap)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc float32. For 16-bit a and b the product is torch's
    16-bit matmul (float32 accumulation inside, one rounding of the chunk's
    product), added in float32 (CPU matmuls have no float32 output for them)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(torch.mm(a, b))


def _gradient_mode(device_type: str, s_cap, teacher) -> str:
    """Where the kernel writes a chunk's logits gradient: over the logits
    themselves where that kernel can ("inplace", the CPU's, and only without a
    student softcap, whose derivative needs the logits after the kernel), else
    into a buffer of its own ("out"). Traced by torch.compile, into a fresh
    tensor ("new"): there the op that writes into a reused buffer gave wrong
    weight gradients (torch 2.13.0: test_compile_fullgraph), and a compiled
    graph plans its own buffers anyway."""
    if torch.compiler.is_compiling() or teacher.allocates:
        return "new"
    if s_cap is None and teacher.inplace and device_type in ops.INPLACE_DEVICES:
        return "inplace"
    return "out"


def _chunk_pass(
    s_hidden,
    s_weight,
    s_bias,
    s_cap,
    labels,
    teacher,
    kernel_options,
    chunk,
    grad_scale,
    row_weights,
    need,
):
    """The chunk loop: per-row hard and soft terms [N] (float32) and the
    gradients named by need = (hidden, weight, bias) (else None).

    grad_scale (0-d float32 or None) multiplies every row's gradient inside
    the kernel; row_weights ([N] float32 or None) each row's, after it."""
    n, vocab = s_hidden.shape[0], s_weight.shape[0]
    need_hidden, need_weight, need_bias = need
    compute_grad = need_hidden or need_weight or need_bias
    mode = _gradient_mode(s_hidden.device.type, s_cap, teacher) if compute_grad else "none"
    hard = s_hidden.new_empty(n, dtype=torch.float32)
    soft = s_hidden.new_empty(n, dtype=torch.float32)
    rows = min(chunk, n)
    s_buffer = s_hidden.new_empty(rows, vocab)
    g_buffer = s_hidden.new_empty(rows, vocab) if compute_grad and mode == "out" else None
    t_buffer = teacher.buffer(rows)
    grad_hidden = torch.empty_like(s_hidden) if need_hidden else None
    # float32 accumulators; a float32 weight accumulates into its own gradient.
    grad_weight = s_weight.new_zeros(s_weight.shape, dtype=torch.float32) if need_weight else None
    grad_bias = s_weight.new_zeros(vocab, dtype=torch.float32) if need_bias else None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        h = s_hidden[start:stop]
        s = linear_logits(h, s_weight, s_bias, s_cap, s_buffer[: stop - start])
        y = None if labels is None else labels[start:stop]
        hard[start:stop], soft[start:stop], g = teacher.distill(
            s, start, stop, t_buffer, y, grad_scale, kernel_options, mode, g_buffer
        )
        if not compute_grad:
            continue
        if row_weights is not None:
            g.mul_(row_weights[start:stop, None])
        if s_cap is not None:
            # d/dx c tanh(x / c) = 1 - tanh^2 = 1 - (s / c)^2, from the capped
            # logits themselves (their buffer is free once the kernel has run).
            g.mul_(s.div_(s_cap).square_().neg_().add_(1))
        if grad_hidden is not None:
            torch.mm(g, s_weight, out=grad_hidden[start:stop])
        if grad_weight is not None:
            _add_product(grad_weight, g.t(), h)
        if grad_bias is not None:
            grad_bias.add_(g.sum(0, dtype=torch.float32))
    if grad_weight is not None:
        grad_weight = grad_weight.to(s_weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(s_bias.dtype)
    return hard, soft, (grad_hidden, grad_weight, grad_bias)


class _FusedLinearDistillFunction(torch.autograd.Function):
    """Forward runs the chunk loop, which also forms the gradients of the
    reduced loss; backward only scales them by grad_output. With
    reduction="none" the per-row upstream gradient cannot be folded into a
    weight gradient formed in advance, so backward runs the loop again."""

    @staticmethod
    def forward(
        ctx,
        s_hidden,
        s_weight,
        s_bias,
        labels,
        t_hidden,
        t_weight,
        t_bias,
        t_logits,
        t_indices,
        t_logprobs,
        t_sparse,
        temperature,
        alpha,
        divergence,
        beta,
        reduction,
        ignore_index,
        scale_by_t2,
        label_smoothing,
        num_items,
        s_cap,
        t_cap,
        chunk_size,
        need_hidden,
        need_weight,
        need_bias,
    ):
        teacher = _teacher_source(
            t_hidden, t_weight, t_bias, t_logits, t_cap, t_indices, t_logprobs, t_sparse
        )
        n = s_hidden.shape[0]
        if chunk_size is None:
            # The student's logits, their gradient unless it overwrites them,
            # and the teacher's logits.
            mode = _gradient_mode(s_hidden.device.type, s_cap, teacher)
            s_copies = 1 if mode == "inplace" else 2
            row_bytes = s_weight.shape[0] * s_copies * s_weight.element_size()
            chunk_size = default_chunk_size(
                n, row_bytes + teacher.row_bytes(), s_hidden.device.type
            )
        kernel_options = dict(
            temperature=temperature,
            alpha=alpha,
            divergence=divergence,
            beta=beta,
            ignore_index=ignore_index,
            scale_by_t2=scale_by_t2,
            label_smoothing=label_smoothing,
        )
        need = (need_hidden, need_weight, need_bias)
        denom = counted_rows(labels, n, ignore_index, s_hidden.device, num_items)
        grad_scale = denom.reciprocal() if reduction == "batchmean" else None
        in_forward = need if reduction != "none" else (False, False, False)
        hard, soft, grads = _chunk_pass(
            s_hidden,
            s_weight,
            s_bias,
            s_cap,
            labels,
            teacher,
            kernel_options,
            chunk_size,
            grad_scale,
            None,
            in_forward,
        )
        loss, hard, soft = combine_and_reduce(hard, soft, alpha, reduction, denom)
        ctx.mark_non_differentiable(hard, soft)
        ctx.reduction = reduction
        if reduction == "none":
            ctx.save_for_backward(
                s_hidden,
                s_weight,
                s_bias,
                labels,
                t_hidden,
                t_weight,
                t_bias,
                t_logits,
                t_indices,
                t_logprobs,
            )
            ctx.recompute = (s_cap, t_cap, t_sparse, kernel_options, chunk_size, need)
        else:
            ctx.save_for_backward(*grads)
        return loss, hard, soft

    @staticmethod
    def backward(ctx, grad_loss, _grad_hard, _grad_soft):
        refuse_double_backward()
        none = (None,) * 23
        if ctx.reduction == "none":
            s_hidden, s_weight, s_bias, labels, *t_tensors = ctx.saved_tensors
            t_hidden, t_weight, t_bias, t_logits, t_indices, t_logprobs = t_tensors
            s_cap, t_cap, t_sparse, kernel_options, chunk_size, need = ctx.recompute
            teacher = _teacher_source(
                t_hidden, t_weight, t_bias, t_logits, t_cap, t_indices, t_logprobs, t_sparse
            )
            _, _, grads = _chunk_pass(
                s_hidden,
                s_weight,
                s_bias,
                s_cap,
                labels,
                teacher,
                kernel_options,
                chunk_size,
                None,
                grad_loss.to(torch.float32),
                need,
            )
            return grads + none
        grads = ctx.saved_tensors
        present = [g for g in grads if g is not None]
        if present and upstream_is_one(grad_loss, present[0]):
            return tuple(grads) + none
        return tuple(None if g is None else scaled(g, grad_loss) for g in grads) + none


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
    process_group=None,
    return_components: bool = False,
):
    r"""The distillation loss of :func:`kdfused.fused_distill_loss` with the
    logits formed from hidden states, chunk by chunk (never all N x V at once).

    The student's logits are ``softcap(student_hidden @ student_weight.T +
    student_bias)`` (``softcap(x) = c tanh(x / c)`` with ``c =
    student_softcap``, the identity when None), the teacher's likewise from
    ``teacher_hidden`` / ``teacher_weight`` / ``teacher_bias`` /
    ``teacher_softcap``, or given whole as ``teacher_logits``: exactly one of
    the two sources.

    Args:
        student_hidden: ``[..., Hs]`` float32/float16/bfloat16; gets a gradient.
        student_weight: ``[V, Hs]`` (an ``nn.Linear`` lm_head's ``.weight``),
            same dtype; gets a gradient, accumulated over the chunks in float32
            and rounded to its dtype once. ``student_bias`` ``[V]`` likewise.
        labels: int64 ``[...]`` (the hidden states' leading dims), or None.
        teacher_hidden, teacher_weight, teacher_bias: ``[..., Ht]``, ``[V, Ht]``,
            ``[V]``; treated as constants.
        teacher_logits: ``[..., V]``, instead of the teacher's hidden states;
            or a :class:`kdfused.SparseTeacher` (stored top-k log-probabilities,
            DESIGN.md section 6), read by the sparse-teacher kernel chunk by
            chunk.
        teacher_vocab: ``"truncate"`` takes a wider teacher's first V rows of
            its weight and bias (or columns of its logits), views, no copies.
        num_items_in_batch: the batchmean divisor, as in
            :func:`kdfused.fused_distill_loss`.
        chunk_size: rows per chunk; None picks it so that one chunk's buffers
            take at most 64 MiB on the CPU, 256 MiB on a GPU
            (:data:`CHUNK_BUDGET_BYTES`). The result does not depend on it
            beyond rounding.
        process_group: a ``torch.distributed`` group over which the lm_heads
            are column-parallel (DESIGN.md section 7): each rank passes its
            rows ``[V_r, H]`` of both weights (and biases, or its shard of
            ``teacher_logits``), in group-rank order, and the same hidden
            states and labels (global ids). Every rank gets the whole
            vocabulary's loss, its rows' weight and bias gradients, and its
            shard's part of the hidden states' gradient (summed over the group
            by the layer that feeds the lm_head, as in Megatron-LM). One
            all_gather of per-row statistics per forward (two for ``"jsd"``);
            each chunk's logits are formed twice, once per phase.
        The other options are :func:`kdfused.fused_distill_loss`'s.

    Returns:
        The float32 loss, or a :class:`DistillLossOutput`. The gradients are
        formed in the forward call; backward scales them (with
        ``reduction="none"`` it runs the chunk loop again, with the per-row
        upstream gradient).
    """
    options = dict(
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        reduction=reduction,
        ignore_index=ignore_index,
        scale_by_t2=scale_by_t2,
        label_smoothing=label_smoothing,
    )
    validate_options(**options, backend=backend, teacher_vocab=teacher_vocab)
    validate_num_items(num_items_in_batch, reduction)
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
    vocab = student_weight.shape[0]
    sparse_teacher = teacher_logits if isinstance(teacher_logits, SparseTeacher) else None
    if sparse_teacher is not None:
        validate_sparse_teacher(
            student_hidden.shape[:-1],
            student_hidden.device,
            sparse_teacher,
            divergence=divergence,
            teacher_vocab=teacher_vocab,
            what=f"student_hidden {tuple(student_hidden.shape)}",
        )
    elif teacher_logits is not None:
        teacher_logits = teacher_columns(teacher_logits, vocab)
    else:
        teacher_weight = teacher_columns(teacher_weight, vocab, dim=0)
        if teacher_bias is not None:
            teacher_bias = teacher_columns(teacher_bias, vocab, dim=0)
    for name in ("temperature", "alpha", "beta", "label_smoothing"):
        options[name] = float(options[name])
    options["ignore_index"] = int(ignore_index)
    caps = dict(
        student_softcap=None if student_softcap is None else float(student_softcap),
        teacher_softcap=None if teacher_softcap is None else float(teacher_softcap),
    )
    if process_group is not None:
        from .parallel import split_over

        process_group = split_over(process_group)
    if process_group is not None:
        if sparse_teacher is not None or teacher_vocab != "exact":
            raise NotImplementedError(
                "kdfused: a process_group (vocab-parallel) with a sparse teacher or "
                "teacher_vocab='truncate' is not supported yet"
            )
        if choose_backend(backend, student_hidden.device) != "kernel":
            raise RuntimeError(
                "kdfused: the vocab-parallel loss (process_group) needs the compiled kernels"
            )
    if choose_backend(backend, student_hidden.device) == "reference":
        return reference.fused_linear_distill_loss(
            student_hidden,
            student_weight,
            labels,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
            student_bias=student_bias,
            teacher_logits=teacher_logits,
            num_items_in_batch=num_items_in_batch,
            return_components=return_components,
            **options,
            **caps,
        )
    kernel_dtype_check("student_hidden", student_hidden)
    if sparse_teacher is None:
        kernel_dtype_check(
            *(
                ("teacher_logits", teacher_logits)
                if teacher_logits is not None
                else ("teacher_hidden", teacher_hidden)
            )
        )

    hs = student_hidden.shape[-1]
    lead = student_hidden.shape[:-1]
    s_hidden = student_hidden.reshape(-1, hs)
    t_hidden = (
        None
        if teacher_hidden is None
        else teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    )
    t_logits = t_indices = t_logprobs = t_sparse = None
    if sparse_teacher is not None:
        flat = sparse_teacher.flatten()
        t_indices, t_logprobs = flat.indices, flat.logprobs.detach()
        t_sparse = (sparse_teacher.tail, sparse_teacher.store_temperature)
    elif teacher_logits is not None:
        t_logits = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    detach = lambda x: None if x is None else x.detach()  # noqa: E731
    flat_labels = None if labels is None else labels.reshape(-1)
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and student_hidden.requires_grad,
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    if process_group is not None:
        from . import parallel

        kernel_options = {k: v for k, v in options.items() if k != "reduction"}
        args = (
            kernel_options,
            reduction,
            num_items_in_batch,
            caps["student_softcap"],
            caps["teacher_softcap"],
            chunk_size,
            process_group,
            needs,
        )
        loss, hard, soft = parallel.vocab_parallel_linear_loss(
            s_hidden,
            student_weight,
            student_bias,
            flat_labels,
            t_hidden,
            detach(teacher_weight),
            detach(teacher_bias),
            t_logits,
            args=args,
        )
    else:
        loss, hard, soft = _FusedLinearDistillFunction.apply(
            s_hidden,
            student_weight,
            student_bias,
            flat_labels,
            t_hidden,
            detach(teacher_weight),
            detach(teacher_bias),
            t_logits,
            t_indices,
            t_logprobs,
            t_sparse,
            *options.values(),
            num_items_in_batch,
            caps["student_softcap"],
            caps["teacher_softcap"],
            chunk_size,
            *needs,
        )
    if reduction == "none":
        loss, hard, soft = loss.reshape(lead), hard.reshape(lead), soft.reshape(lead)
    if return_components:
        return DistillLossOutput(loss, hard, soft)
    return loss
