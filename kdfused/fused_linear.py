"""The fused-linear capability: the loss from hidden states and output
weights, chunk by chunk, never holding the [N, V] logits (docs/design.md,
"Fused-linear").

One autograd.Function owns the chunk loop. Per chunk of rows it forms the
student's logits with torch's own matmul (:class:`LinearStudent`), asks the
teacher source for the chunk's loss rows and logits gradient (the fused
kernel runs inside it), and turns that gradient into the gradients of the
hidden states, the weight and the bias with two more matmuls and a sum.

A kind of teacher is one :class:`TeacherSource` subclass: hidden states +
weight (:class:`HiddenTeacher`), dense logits (:class:`LogitsTeacher`), a
sparse top-k teacher (:class:`SparseSource`); the vocab-parallel capability
adds its gradient phase as one more. The loop has no branch per kind.

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

from . import ops
from ._autograd import (
    counted_rows,
    entropy_or_none,
    finish_outputs,
    grad_scale_of,
    none_after,
    refuse_double_backward,
    scaled_saved,
)
from ._types import SparseTeacher
from ._validation import LinearOptions, LossOptions

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


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(
            torch.ops.mkldnn._linear_pointwise.default
        )
    except (AttributeError, RuntimeError):
        return False


# oneDNN's float32 inner product (the op torch.compile's CPU backend forms
# linear layers with), where this torch build has it.
ONEDNN_LINEAR = _onednn_linear_available()


def fresh_logits(hidden, weight, bias) -> bool:
    """Whether a chunk's logits come from oneDNN's float32 inner product, as
    a fresh tensor (no out= form), rather than torch's matmul into a reused
    buffer: float32 CPU tensors, eager. On a 2-core AMD EPYC its brgemm formed
    a 256-row chunk's logits in about 0.6x MKL's time (whose fp32 GEMM there
    takes its generic path), and the fused-linear step went from 1.17-1.33x
    the four matmuls alone to 0.85-1.03x; the same float32 rounding, MKL's
    error about 2.6x smaller in the logits (4.2e-7 against 1.1e-6 relative)."""
    return (
        ONEDNN_LINEAR
        and hidden.device.type == "cpu"
        and hidden.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and not torch.compiler.is_compiling()
    )


def linear_logits(hidden, weight, bias, softcap=None, scale=1.0, out=None):
    """softcap(scale * (hidden @ weight.T + bias)) into `out` (rows x V), as
    the unfused model forms it: a matmul in the inputs' dtype (float32 on the
    CPU: oneDNN's, into a fresh tensor, see fresh_logits), then the scale and
    the cap c tanh(x / c), each applied in place."""
    if fresh_logits(hidden, weight, bias):
        logits = torch.ops.mkldnn._linear_pointwise(
            hidden.contiguous(), weight, bias, "none", [], ""
        )
    elif bias is None:
        logits = torch.mm(hidden, weight.t(), out=out)
    else:
        logits = torch.addmm(bias, hidden, weight.t(), out=out)
    if scale != 1.0:
        logits.mul_(scale)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


class LinearStudent:
    """The student side of the chunk loop: hidden states [N, H], weight
    [V, H], bias [V] or None, and how its logits are formed (softcap, scale)."""

    def __init__(self, hidden, weight, bias, softcap=None, scale=1.0):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.softcap, self.scale = softcap, scale

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def logits(self, start: int, stop: int, out=None) -> torch.Tensor:
        h = self.hidden[start:stop]
        return linear_logits(h, self.weight, self.bias, self.softcap, self.scale, out)

    def to_matmul_gradient(self, g: torch.Tensor, s: torch.Tensor) -> None:
        """g, the gradient of the chunk's logits s, becomes in place that of
        hidden @ weight.T + bias (s is consumed when there is a softcap)."""
        if self.softcap is not None:
            # d/dx c tanh(x / c) = 1 - tanh^2 = 1 - (s / c)^2, from the capped
            # logits themselves (their buffer is free once the kernel has run).
            g.mul_(s.div_(self.softcap).square_().neg_().add_(1))
        if self.scale != 1.0:
            g.mul_(self.scale)

    def label_logit(self, labels: torch.Tensor, offset: int):
        """(the label's logit, 1.0) for rows whose label lies in this weight's
        rows [offset, offset + V) (a vocabulary shard), else (0, 0)."""
        width = self.vocab
        local = labels - offset
        inside = (local >= 0) & (local < width)
        rows = local.clamp(0, width - 1)
        logit = (self.hidden * self.weight[rows]).sum(-1)
        if self.bias is not None:
            logit = logit + self.bias[rows]
        if self.scale != 1.0:
            logit = logit * self.scale
        if self.softcap is not None:
            logit = self.softcap * torch.tanh(logit / self.softcap)
        logit = logit.float()
        return torch.where(inside, logit, torch.zeros_like(logit)), inside.float()


class TeacherSource:
    """What the chunk loop needs of a kind of teacher (one subclass a kind).

    Per chunk of rows [start, stop) with student logits ``s``, :meth:`run`
    returns the chunk's per-row hard and soft terms (float32), the gradient
    of its loss with respect to ``s`` (times ``grad_scale``), and, when
    ``entropy`` is asked for, the rows' student entropy (else None). The
    gradient is written as ``mode`` says (:func:`gradient_mode`):

    - ``"none"``: no gradient (None);
    - ``"new"``: a fresh tensor;
    - ``"inplace"``: over ``s`` itself (only where ``grad_over_logits``);
    - ``"out"``: into ``grad_buffer``, a reused [chunk, V] buffer.

    Class attributes: ``grad_over_logits``, whether the kernel may write the
    gradient over the student's logits; ``own_gradient``, whether run()
    always returns a gradient of its own (then the loop allocates no gradient
    buffer and asks for mode "new"). :meth:`row_bytes` and :meth:`buffer`
    size and make the teacher's own chunk buffer (its logits), if it has one.
    """

    grad_over_logits = False
    own_gradient = False

    def row_bytes(self) -> int:
        """Bytes per row of the buffer :meth:`buffer` makes (0: none)."""
        return 0

    def buffer(self, rows: int):
        """The teacher's chunk buffer for up to `rows` rows, or None."""
        return None

    def run(self, s, start, stop, buffer, labels, grad_scale, mode, grad_buffer, entropy=False):
        raise NotImplementedError


class DenseSource(TeacherSource):
    """A teacher with dense logits per chunk (:meth:`logits`), run through the
    dense kernel."""

    grad_over_logits = True

    def __init__(self, opts: LossOptions):
        self.kernel_options = opts.kernel()

    def logits(self, start: int, stop: int, buffer) -> torch.Tensor:
        raise NotImplementedError

    def run(self, s, start, stop, buffer, labels, grad_scale, mode, grad_buffer, entropy=False):
        t = self.logits(start, stop, buffer)
        opts = dict(self.kernel_options, student_entropy=entropy)
        if mode in ("none", "new"):
            hard, soft, g, *ent = ops.distill_forward(
                s, t, labels, grad_scale, **opts, compute_grad=mode == "new"
            )
        elif mode == "inplace":
            hard, soft, *ent = ops.distill_forward_inplace(s, t, labels, grad_scale, **opts)
            g = s
        else:
            g = grad_buffer[: stop - start]
            hard, soft, *ent = ops.distill_forward_out(s, t, labels, grad_scale, g, **opts)
        return hard, soft, g, (ent[0] if entropy else None)


class HiddenTeacher(DenseSource):
    """The teacher's logits formed chunk by chunk from its hidden states and
    weight (no gradient: the teacher is a constant)."""

    def __init__(self, opts, hidden, weight, bias, softcap=None, scale=1.0):
        super().__init__(opts)
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.softcap, self.scale = softcap, scale

    def row_bytes(self) -> int:
        return self.weight.shape[0] * self.weight.element_size()

    def buffer(self, rows: int) -> torch.Tensor | None:
        if fresh_logits(self.hidden, self.weight, self.bias):
            return None  # every chunk's logits a fresh tensor
        return self.weight.new_empty(rows, self.weight.shape[0])

    def logits(self, start: int, stop: int, buffer) -> torch.Tensor:
        out = None if buffer is None else buffer[: stop - start]
        h = self.hidden[start:stop]
        return linear_logits(h, self.weight, self.bias, self.softcap, self.scale, out)


class LogitsTeacher(DenseSource):
    """Dense teacher logits [N, V], read in place chunk by chunk."""

    def __init__(self, opts, logits):
        super().__init__(opts)
        self.all_logits = logits

    def logits(self, start: int, stop: int, buffer) -> torch.Tensor:
        return self.all_logits[start:stop]


class SparseSource(TeacherSource):
    """A sparse teacher's ids and log-probabilities ([N, k], or ragged rows
    with their offsets), read in place chunk by chunk by the sparse-teacher
    kernel in their own dtypes."""

    def __init__(self, opts: LossOptions, teacher: SparseTeacher):
        flat = teacher.flatten()
        self.indices, self.logprobs = flat.indices, flat.logprobs.detach()
        self.offsets = flat.offsets
        # The row bounds on the host, read once: each chunk slices its entries.
        self._bounds = None if flat.offsets is None else flat.offsets.to("cpu")
        self.kernel_options = dict(
            opts.kernel(), tail=teacher.tail, store_temperature=teacher.store_temperature
        )

    def _rows(self, start, stop):
        """Rows [start, stop): their ids, log-probs and (ragged) offsets from 0."""
        if self.offsets is None:
            return self.indices[start:stop], self.logprobs[start:stop], None
        first, last = int(self._bounds[start]), int(self._bounds[stop])
        offsets = self.offsets[start : stop + 1] - first
        return self.indices[first:last], self.logprobs[first:last], offsets

    def run(self, s, start, stop, buffer, labels, grad_scale, mode, grad_buffer, entropy=False):
        i, lp, offsets = self._rows(start, stop)
        opts = dict(self.kernel_options, offsets=offsets)
        if mode in ("none", "new"):
            return (
                *ops.sparse_distill_forward(
                    s, i, lp, labels, grad_scale, **opts, compute_grad=mode == "new"
                ),
                None,
            )
        g = grad_buffer[: stop - start]
        return (*ops.sparse_distill_forward_out(s, i, lp, labels, grad_scale, g, **opts), g, None)


def teacher_source(opts: LossOptions, lin: LinearOptions, teacher) -> TeacherSource:
    """The source for a validated teacher: a SparseTeacher, dense logits
    [N, V], or (hidden [N, H], weight, bias) of a model."""
    if isinstance(teacher, SparseTeacher):
        return SparseSource(opts, teacher)
    if isinstance(teacher, torch.Tensor):
        return LogitsTeacher(opts, teacher)
    hidden, weight, bias = teacher
    return HiddenTeacher(opts, hidden, weight, bias, lin.teacher_softcap, lin.teacher_logit_scale)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc float32. For 16-bit a and b the product is torch's
    16-bit matmul (float32 accumulation inside, one rounding of the chunk's
    product), added in float32 (CPU matmuls have no float32 output for them)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(torch.mm(a, b))


def gradient_mode(student: LinearStudent, teacher: TeacherSource) -> str:
    """Where the kernel writes a chunk's logits gradient: over the logits
    themselves where that kernel can ("inplace", the CPU's, and only without a
    student softcap, whose derivative needs the logits after the kernel), else
    into a buffer of its own ("out"). Traced by torch.compile, into a fresh
    tensor ("new"): there the op that writes into a reused buffer gave wrong
    weight gradients (torch 2.13.0: test_compile_fullgraph), and a compiled
    graph plans its own buffers anyway."""
    if torch.compiler.is_compiling() or teacher.own_gradient:
        return "new"
    device_type = student.hidden.device.type
    if student.softcap is None and teacher.grad_over_logits and device_type in ops.INPLACE_DEVICES:
        return "inplace"
    return "out"


def chunk_rows(student: LinearStudent, teacher: TeacherSource, chunk_size) -> int:
    """chunk_size, or the default for these buffers (the student's logits,
    their gradient unless it overwrites them, and the teacher's buffer)."""
    if chunk_size is not None:
        return chunk_size
    copies = 1 if gradient_mode(student, teacher) == "inplace" else 2
    row_bytes = student.vocab * copies * student.weight.element_size() + teacher.row_bytes()
    return default_chunk_size(student.rows, row_bytes, student.hidden.device.type)


def chunk_pass(
    student: LinearStudent,
    teacher: TeacherSource,
    labels,
    chunk,
    grad_scale,
    row_weights,
    need,
    entropy=False,
):
    """The chunk loop: per-row hard and soft terms [N] (float32), the
    gradients named by need = (hidden, weight, bias) (else None) and, with
    entropy, the rows' student entropy [N] (else None).

    grad_scale (0-d float32 or None) multiplies every row's gradient inside
    the kernel; row_weights ([N] float32 or None) each row's, after it."""
    n, vocab = student.rows, student.vocab
    s_hidden, s_weight = student.hidden, student.weight
    need_hidden, need_weight, need_bias = need
    compute_grad = need_hidden or need_weight or need_bias
    mode = gradient_mode(student, teacher) if compute_grad else "none"
    hard = s_hidden.new_empty(n, dtype=torch.float32)
    soft = s_hidden.new_empty(n, dtype=torch.float32)
    ent = s_hidden.new_empty(n, dtype=torch.float32) if entropy else None
    rows = min(chunk, n)
    fresh = fresh_logits(s_hidden, s_weight, student.bias)
    s_buffer = None if fresh else s_hidden.new_empty(rows, vocab)
    g_buffer = s_hidden.new_empty(rows, vocab) if mode == "out" else None
    t_buffer = teacher.buffer(rows)
    grad_hidden = torch.empty_like(s_hidden) if need_hidden else None
    # float32 accumulators; a float32 weight accumulates into its own gradient.
    grad_weight = s_weight.new_zeros(s_weight.shape, dtype=torch.float32) if need_weight else None
    grad_bias = s_weight.new_zeros(vocab, dtype=torch.float32) if need_bias else None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        s = student.logits(start, stop, None if fresh else s_buffer[: stop - start])
        y = None if labels is None else labels[start:stop]
        hard[start:stop], soft[start:stop], g, e = teacher.run(
            s, start, stop, t_buffer, y, grad_scale, mode, g_buffer, entropy
        )
        if entropy:
            ent[start:stop] = e
        if compute_grad:
            _chunk_gradients(
                student, g, s, start, stop, row_weights, grad_hidden, grad_weight, grad_bias
            )
        # A fresh chunk's logits (and the gradient over them) go before the
        # next chunk's are formed: one student chunk alive at a time.
        del s, g
    if grad_weight is not None:
        grad_weight = grad_weight.to(s_weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(student.bias.dtype)
    return hard, soft, (grad_hidden, grad_weight, grad_bias), ent


def _chunk_gradients(student, g, s, start, stop, row_weights, grad_hidden, grad_weight, grad_bias):
    """A chunk's logits gradient g (over its logits s) into the gradients of
    the hidden states' rows, the weight and the bias."""
    if row_weights is not None:
        g.mul_(row_weights[start:stop, None])
    student.to_matmul_gradient(g, s)
    if grad_hidden is not None:
        torch.mm(g, student.weight, out=grad_hidden[start:stop])
    if grad_weight is not None:
        _add_product(grad_weight, g.t(), student.hidden[start:stop])
    if grad_bias is not None:
        grad_bias.add_(g.sum(0, dtype=torch.float32))


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
        t0,
        t1,
        t2,
        teacher_kind,
        opts,
        lin,
        num_items,
        need,
    ):
        t_tensors = (t0, t1, t2)
        student = LinearStudent(
            s_hidden, s_weight, s_bias, lin.student_softcap, lin.student_logit_scale
        )
        teacher = teacher_source(opts, lin, teacher_kind.rebuild(t_tensors))
        chunk = chunk_rows(student, teacher, lin.chunk_size)
        denom = counted_rows(labels, student.rows, opts.ignore_index, s_hidden.device, num_items)
        in_forward = need if opts.reduction != "none" else (False, False, False)
        hard, soft, grads, entropy = chunk_pass(
            student,
            teacher,
            labels,
            chunk,
            grad_scale_of(opts.reduction, denom),
            None,
            in_forward,
            opts.student_entropy,
        )
        outputs = finish_outputs(ctx, hard, soft, entropy, opts.alpha, opts.reduction, denom)
        ctx.reduction = opts.reduction
        if opts.reduction == "none":
            ctx.save_for_backward(s_hidden, s_weight, s_bias, labels, *t_tensors)
            ctx.recompute = (teacher_kind, opts, lin, chunk, need)
        else:
            ctx.save_for_backward(*grads)
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, _grad_hard, _grad_soft, _grad_entropy):
        refuse_double_backward()
        if ctx.reduction != "none":
            return scaled_saved(ctx, grad_loss, ctx.saved_tensors)
        s_hidden, s_weight, s_bias, labels, *t_tensors = ctx.saved_tensors
        teacher_kind, opts, lin, chunk, need = ctx.recompute
        student = LinearStudent(
            s_hidden, s_weight, s_bias, lin.student_softcap, lin.student_logit_scale
        )
        teacher = teacher_source(opts, lin, teacher_kind.rebuild(t_tensors))
        grads = chunk_pass(
            student, teacher, labels, chunk, None, grad_loss.to(torch.float32), need
        )[2]
        return none_after(ctx, grads)


class TeacherTensors:
    """A validated teacher taken apart into three tensor slots (what autograd
    takes as inputs and saves; None where unused) and its kind, and put back
    together: a SparseTeacher, dense logits, or a model's (hidden, weight,
    bias)."""

    def __init__(self, teacher):
        if isinstance(teacher, SparseTeacher):
            self.kind = ("sparse", teacher.tail, teacher.store_temperature)
            self.tensors = (teacher.indices, teacher.logprobs.detach(), teacher.offsets)
        elif isinstance(teacher, torch.Tensor):
            self.kind = ("logits",)
            self.tensors = (teacher.detach(), None, None)
        else:
            self.kind = ("hidden",)
            self.tensors = tuple(None if x is None else x.detach() for x in teacher)

    def rebuild(self, tensors):
        if self.kind[0] == "sparse":
            return SparseTeacher(
                tensors[0], tensors[1], self.kind[1], self.kind[2], offsets=tensors[2]
            )
        if self.kind[0] == "logits":
            return tensors[0]
        return tuple(tensors)


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
    """(loss, hard, soft, entropy) from validated ``[N, H]`` student hidden
    states, its weight and bias, ``[N]`` labels (or None) and a teacher: a
    SparseTeacher of N rows, dense logits [N, V], or a model's (hidden
    [N, Ht], weight, bias); entropy None unless opts.student_entropy."""
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and s_hidden.requires_grad,
        grad_on and s_weight.requires_grad,
        grad_on and s_bias is not None and s_bias.requires_grad,
    )
    parts = TeacherTensors(teacher)
    outputs = _FusedLinearDistillFunction.apply(
        s_hidden,
        s_weight,
        s_bias,
        labels,
        *parts.tensors,
        parts,
        opts,
        lin,
        num_items_in_batch,
        need,
    )
    return entropy_or_none(outputs, opts.student_entropy)
