"""The vocab-parallel capability (docs/design.md, "Vocab-parallel"): logits
split over the ranks of a torch.distributed group by vocabulary, as a
tensor-parallel lm_head (column-parallel) leaves them.

Each rank holds a contiguous shard of every row, in group-rank order; shards
may differ in size; labels and a sparse teacher's ids are global ids. Every
forward starts with one fixed-size exchange, the agreement
(:class:`Agreement`): each rank's shard width and a fingerprint of everything
that must be the same on every rank (rows, labels in order, options, dtypes,
num_items_in_batch, a sparse teacher, the hidden states of a fused-linear
loss). Ranks that disagree, or a rank whose inputs were rejected, raise
together, before anything whose size depends on the inputs crosses; the
widths give every rank its column offset.

Then the kernel runs in phases (csrc/parallel_op.h, csrc/sparse_op.h):
each rank reduces its shard to per-row statistics, the ranks exchange those
in one all_gather, and every rank merges them in rank order (the same bits on
every rank), finishes the row's loss, and writes its shard's gradient from
the merged row. With dense teacher logits the statistics are 12 floats a row,
and JSD needs its mixture's two sums over the whole row after the merge: a
second all_gather of 2 floats a row. With a sparse teacher they are 8 floats
and the student's logits at the teacher's kept ids (k a row, each from the
rank that holds the id), after which the k + 1 buckets are complete on every
rank: one exchange for every divergence. Nothing crosses in backward, and the
logits never do.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import ops
from ._autograd import (
    SavedGradientFunction,
    counted_rows,
    entropy_or_none,
    finish_outputs,
    grad_scale_of,
    none_after,
    refuse_double_backward,
    scaled_saved,
)
from ._types import SparseTeacher
from ._validation import DIVERGENCES, REDUCTIONS, TAILS, TEACHER_VOCABS, LinearOptions, LossOptions
from .fused_linear import (
    LinearStudent,
    TeacherSource,
    TeacherTensors,
    chunk_pass,
    default_chunk_size,
    teacher_source,
)


def split_over(group):
    """The group if the vocabulary is split over more than one rank, else None
    (a group of one: the plain loss, the same numbers and no collective)."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    return group


def from_dtensors(student, teacher, labels, process_group):
    """DTensor logits with a Shard(-1) placement: their local shards and the
    group of the mesh dim they are sharded over. A teacher or labels given as
    DTensor too are read likewise (labels replicated); plain ones are taken as
    they are."""
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


# ---- the collectives ---------------------------------------------------------


class Exchange:
    """The collectives of one forward, through the group (tests count them)."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[W, *x.shape]: every rank's x, in group-rank order (one collective)."""
        out = x.new_empty((self.world * x.shape[0], *x.shape[1:]))
        # all_gather_single is all_gather_into_tensor's newer name (torch 2.13).
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x.contiguous(), group=self.group)
        return out.view(self.world, *x.shape)


# ---- the agreement ---------------------------------------------------------------

# Order-sensitive hashes of integer tensors: sum_i (x_i mod P) w_i mod P with
# per-position weights w_i = (a i + b) mod P, P = 2^31 - 1: exact in int64
# (products < 2^62) and in the float64 the agreement travels in.
_P = 2**31 - 1
_HASHES = ((48271, 11), (69621, 7919))
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KINDS = (
    "fused_distill_loss, dense teacher logits",
    "fused_distill_loss, a SparseTeacher",
    "fused_linear_distill_loss, teacher hidden states",
    "fused_linear_distill_loss, teacher logits",
    "fused_linear_distill_loss, a SparseTeacher",
)


def _hashes(x: torch.Tensor) -> list[torch.Tensor]:
    """Two order-sensitive hashes of an integer (or bit-viewed float) tensor,
    as 0-d float64 tensors on its device."""
    v = x.reshape(-1).to(torch.int64).remainder(_P)
    i = torch.arange(v.numel(), device=v.device, dtype=torch.int64)
    return [((v * ((a * i + b) % _P)) % _P).sum().remainder(_P).double() for a, b in _HASHES]


def _bits(x: torch.Tensor) -> torch.Tensor:
    """A floating tensor's bits as integers (int16 / int32 / int64 views)."""
    kind = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.detach().contiguous().view(kind)


def _dtype_code(x) -> float:
    return float(_DTYPES.index(x.dtype)) if x is not None and x.dtype in _DTYPES else -1.0


def _name(choices):
    return lambda v: repr(choices[int(v)]) if 0 <= int(v) < len(choices) else "?"


def _number(v) -> str:
    return repr(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


def _optional(v) -> str:
    return "None" if math.isnan(v) else _number(v)


def _yes_no(v) -> str:
    return "True" if v else "False"


# (field, how a value is shown, what the user should know); "hash" fields are
# compared, never shown.
_FIELDS = (
    ("call", _name(_KINDS), "every rank must call the same loss with the same kind of teacher"),
    ("rows", _number, "every rank passes the same positions"),
    ("temperature", _number, None),
    ("alpha", _number, None),
    ("beta", _number, None),
    ("divergence", _name(DIVERGENCES), None),
    ("reduction", _name(REDUCTIONS), None),
    ("ignore_index", _number, None),
    ("scale_by_t2", _yes_no, None),
    ("label_smoothing", _number, None),
    ("teacher_vocab", _name(TEACHER_VOCABS), None),
    ("the student's dtype", _name(_DTYPES), None),
    ("the teacher's dtype", _name(_DTYPES), None),
    ("labels given", _yes_no, None),
    ("labels", "hash", "every rank passes the same labels, in the same order"),
    ("labels", "hash", "every rank passes the same labels, in the same order"),
    ("num_items_in_batch", _optional, None),
    ("the student's hidden size", _number, None),
    ("the teacher's hidden size", _number, None),
    ("student_hidden", "hash", "the hidden states feeding the lm_head shards are the same"),
    ("student_hidden", "hash", "the hidden states feeding the lm_head shards are the same"),
    ("teacher_hidden", "hash", "the hidden states feeding the lm_head shards are the same"),
    ("teacher_hidden", "hash", "the hidden states feeding the lm_head shards are the same"),
    ("student_bias given", _yes_no, None),
    ("teacher_bias given", _yes_no, None),
    ("student_softcap", _optional, None),
    ("teacher_softcap", _optional, None),
    ("student_logit_scale", _number, None),
    ("teacher_logit_scale", _number, None),
    ("the sparse teacher's k", _number, None),
    ("the sparse teacher's tail", _name(TAILS), None),
    ("the sparse teacher's store_temperature", _number, None),
    ("the sparse teacher's indices", "hash", "every rank passes the same sparse teacher"),
    ("the sparse teacher's indices", "hash", "every rank passes the same sparse teacher"),
    ("the sparse teacher's logprobs", "hash", "every rank passes the same sparse teacher"),
    ("the sparse teacher's logprobs", "hash", "every rank passes the same sparse teacher"),
    ("the sparse teacher's offsets", "hash", "every rank passes the same sparse teacher"),
    ("the sparse teacher's offsets", "hash", "every rank passes the same sparse teacher"),
)
# And two fields that differ by design: whether this rank rejected its
# inputs, and its shard width.
_ERROR, _WIDTH = len(_FIELDS), len(_FIELDS) + 1


class Layout:
    """The group's vocabulary split, learnt in the agreement."""

    def __init__(self, exchange: Exchange, widths: list[int]):
        self.ex = exchange
        self.widths = widths
        self.vocab = sum(widths)
        self.offset = sum(widths[: exchange.rank])
        self.width = widths[exchange.rank]

    def phase_options(self, opts: LossOptions) -> dict:
        """The phase ops' options: the kernel's, column_offset and vocab."""
        return dict(opts.kernel(), column_offset=self.offset, vocab=self.vocab)


def _fingerprint(call, rows, width, opts, lin, labels, num_items, student, teacher, device):
    """The agreement's values for this rank (float64 [F + 2] on device)."""
    nan = math.nan
    values: list = [float(_KINDS.index(call)), float(rows)]
    values += [opts.temperature, opts.alpha, opts.beta]
    values += [float(DIVERGENCES.index(opts.divergence)), float(REDUCTIONS.index(opts.reduction))]
    values += [float(opts.ignore_index), float(opts.scale_by_t2), opts.label_smoothing]
    values += [float(TEACHER_VOCABS.index(opts.teacher_vocab))]
    s_hidden, s_bias = (student[0], student[2]) if isinstance(student, tuple) else (None, None)
    s_tensor = s_hidden if s_hidden is not None else student
    t_hidden = t_bias = None
    if isinstance(teacher, SparseTeacher):
        t_dtype = _dtype_code(teacher.logprobs)
    elif isinstance(teacher, tuple):
        t_hidden, _, t_bias = teacher
        t_dtype = _dtype_code(t_hidden)
    else:
        t_dtype = _dtype_code(teacher)
    values += [_dtype_code(s_tensor), t_dtype, float(labels is not None)]
    values += _hashes(labels) if labels is not None else [0.0, 0.0]
    values += [nan if num_items is None else float(num_items)]
    values += [float(s_hidden.shape[-1]) if s_hidden is not None else 0.0]
    values += [float(t_hidden.shape[-1]) if t_hidden is not None else 0.0]
    values += _hashes(_bits(s_hidden)) if s_hidden is not None else [0.0, 0.0]
    values += _hashes(_bits(t_hidden)) if t_hidden is not None else [0.0, 0.0]
    values += [float(s_bias is not None), float(t_bias is not None)]
    lin = lin or LinearOptions()
    caps = (lin.student_softcap, lin.teacher_softcap)
    values += [nan if c is None else float(c) for c in caps]
    values += [float(lin.student_logit_scale), float(lin.teacher_logit_scale)]
    if isinstance(teacher, SparseTeacher):
        values += [float(teacher.k), float(TAILS.index(teacher.tail)), teacher.store_temperature]
        values += _hashes(teacher.indices) + _hashes(_bits(teacher.logprobs))
        values += _hashes(teacher.offsets) if teacher.ragged else [0.0, 0.0]
    else:
        values += [0.0] * 9
    values += [0.0, float(width)]
    return torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values]
    )


def _disagreement(fingerprints: torch.Tensor) -> str | None:
    """The first field the ranks disagree on, in the user's words, or None."""
    rows = fingerprints.tolist()
    world = len(rows)
    for f, (field, show, hint) in enumerate(_FIELDS):
        column = [r[f] for r in rows]
        same = all((c == column[0]) or (math.isnan(c) and math.isnan(column[0])) for c in column)
        if same:
            continue
        if show == "hash":
            groups: dict = {}
            for r, c in enumerate(column):
                groups.setdefault(c, []).append(r)
            parts = [", ".join(f"rank {r}" for r in g) for g in groups.values()]
            return f"{field}: {' / '.join(parts)} hold different ones ({hint})"
        shown = ", ".join(f"rank {r} {show(column[r])}" for r in range(world))
        return f"{field}: {shown}" + (f" ({hint})" if hint else "")
    return None


def agree(
    group,
    call,
    *,
    rows,
    width,
    opts,
    lin=None,
    labels,
    num_items,
    student,
    teacher,
    device,
    error=None,
) -> Layout:
    """The agreement (one fixed-size all_gather): every rank's width and
    fingerprint. Raises the same error on every rank if any rank rejected
    its inputs (`error`: that rank's exception, re-raised there) or if the
    ranks disagree; else returns the layout."""
    ex = Exchange(group)
    if error is None:
        mine = _fingerprint(
            call, rows, width, opts, lin, labels, num_items, student, teacher, device
        )
    else:
        mine = torch.zeros(_WIDTH + 1, dtype=torch.float64, device=device)
        mine[_ERROR] = 1.0
    every = ex.all_gather(mine[None])[:, 0].cpu()
    failed = [r for r in range(ex.world) if every[r, _ERROR] != 0]
    if failed:
        if error is not None:
            raise error
        which = ", ".join(f"rank {r}" for r in failed)
        raise ValueError(
            f"kdfused: {which} of the process group rejected its inputs (see the error raised "
            "there); every rank stops with it"
        )
    differ = _disagreement(every[:, :_ERROR])
    if differ is not None:
        raise ValueError(
            f"kdfused: the ranks of the process group disagree on {differ}. Every rank must "
            "pass the same options, rows and labels; only the vocabulary shards differ"
        )
    widths = [int(w) for w in every[:, _WIDTH].tolist()]
    if min(widths) < 1:
        raise ValueError(f"kdfused: every rank's shard needs at least one column, got {widths}")
    return Layout(ex, widths)


def check_labels_in(labels, layout: Layout, ignore_index: int) -> None:
    """The labels (the same on every rank, as agreed) lie in the group's
    vocabulary: the same error on every rank otherwise."""
    if labels is None:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= layout.vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"kdfused: labels[{i}] = {int(labels[i])} is outside the group's vocabulary "
            f"[0, {layout.vocab}) (shards of {layout.widths} columns) and is not "
            f"ignore_index = {ignore_index}"
        )


# ---- the phases, per kind of teacher ------------------------------------------------


class DensePhases:
    """Dense teacher logits: statistics (12 floats a row), merge, JSD's sums
    and their merge, gradient (the ops of csrc/parallel_op.h)."""

    def __init__(self, opts: LossOptions, layout: Layout):
        self.opts, self.layout = opts, layout
        self.phase = layout.phase_options(opts)
        self.second = opts.divergence == "jsd"

    def stats(self, s, teacher, labels):
        return ops.distill_stats(s, teacher, labels, **self.phase)

    def empty_stats(self, device):
        return torch.zeros(0, ops.STATS, device=device)

    def merge(self, gathered, labels):
        return ops.distill_merge(gathered, labels, **self.opts.kernel())

    def jsd_sums(self, s, teacher, labels, consts):
        return ops.distill_jsd_sums(s, teacher, labels, consts=consts, **self.phase)

    def jsd_finish(self, consts, gathered, labels):
        o = self.opts
        return ops.distill_jsd_finish(
            consts,
            gathered,
            labels,
            temperature=o.temperature,
            beta=o.beta,
            ignore_index=o.ignore_index,
            scale_by_t2=o.scale_by_t2,
        )

    def grad(self, s, teacher, labels, grad_scale, consts):
        return ops.distill_grad(s, teacher, labels, grad_scale, consts=consts, **self.phase)


class SparsePhases:
    """A sparse teacher (its ids global): statistics (8 floats a row and the
    student's logits at the kept ids this shard holds), merge (the k + 1
    buckets of every row, complete), gradient (the ops of csrc/sparse_op.h).
    The teacher operand of a chunk is its (indices, logprobs) rows."""

    second = False

    def __init__(self, opts: LossOptions, layout: Layout, teacher: SparseTeacher):
        self.opts, self.layout = opts, layout
        self.meta = dict(tail=teacher.tail, store_temperature=teacher.store_temperature)
        self.phase = dict(layout.phase_options(opts), **self.meta)
        self.k = teacher.k

    def stats(self, s, teacher, labels):
        indices, logprobs = teacher
        return ops.sparse_shard_stats(s, indices, logprobs, labels, **self.phase)

    def empty_stats(self, device):
        return torch.zeros(0, ops.SPARSE_STATS + self.k, device=device)

    def merge(self, gathered, labels, teacher):
        indices, logprobs = teacher
        return ops.sparse_shard_merge(
            gathered, indices, logprobs, labels, **self.opts.kernel(), **self.meta
        )

    def grad(self, s, teacher, labels, grad_scale, merged):
        indices, logprobs = teacher
        return ops.sparse_shard_grad(
            s, indices, logprobs, labels, grad_scale, merged=merged, **self.phase
        )


def _merged_rows(phases, layout, stats_of, sums_of, labels, teacher_rows, n, device):
    """The merged row constants and the rows' (hard, soft), from this rank's
    statistics (stats_of()) and, for JSD with dense logits, its sums given the
    first merge (sums_of(consts))."""
    stats = stats_of() if n else phases.empty_stats(device)
    gathered = layout.ex.all_gather(stats)
    if isinstance(phases, SparsePhases):
        return phases.merge(gathered, labels, teacher_rows)
    consts, hard, soft = phases.merge(gathered, labels)
    if phases.second:
        sums = sums_of(consts) if n else torch.zeros(0, 2, device=device)
        consts, soft = phases.jsd_finish(consts, layout.ex.all_gather(sums), labels)
    return consts, hard, soft


def _phases(opts, layout, teacher):
    if isinstance(teacher, SparseTeacher):
        return SparsePhases(opts, layout, teacher)
    return DensePhases(opts, layout)


def _operand(teacher):
    """A teacher's phase operand: dense logits [N, V_r], or a sparse
    teacher's flattened (indices, logprobs)."""
    if isinstance(teacher, SparseTeacher):
        flat = teacher.padded()  # ragged rows padded for the phase kernels
        return flat.indices, flat.logprobs.detach()
    return teacher.detach()


class _VocabParallelFunction(SavedGradientFunction):
    """The logits loss over shards: statistics, one exchange, merge (JSD with
    dense logits: its sums and a second exchange), gradient. Backward scales
    the saved gradient."""

    @staticmethod
    def forward(
        ctx, student, t0, t1, t2, teacher_kind, labels, opts, layout, num_items, compute_grad
    ):
        teacher = teacher_kind.rebuild((t0, t1, t2))
        phases = _phases(opts, layout, teacher)
        operand = _operand(teacher)
        n = student.shape[0]
        consts, hard, soft = _merged_rows(
            phases,
            layout,
            lambda: phases.stats(student, operand, labels),
            lambda c: phases.jsd_sums(student, operand, labels, c),
            labels,
            operand,
            n,
            student.device,
        )
        denom = counted_rows(labels, n, opts.ignore_index, student.device, num_items)
        if compute_grad:
            scale = grad_scale_of(opts.reduction, denom)
            grad = phases.grad(student, operand, labels, scale, consts)
        else:
            grad = student.new_empty(0)
        return SavedGradientFunction.finish(
            ctx, hard, soft, grad, opts.alpha, opts.reduction, denom
        )


def logits_loss(student, teacher, labels, opts: LossOptions, num_items_in_batch, group):
    """(loss, hard, soft) of [N, V_r] student logits against this rank's
    shard [N, V_r] of dense teacher logits or a sparse teacher of N rows
    (validated by the caller): the agreement first, then the phases."""
    n, width = student.shape
    call = _KINDS[1] if isinstance(teacher, SparseTeacher) else _KINDS[0]
    layout = agree(
        group,
        call,
        rows=n,
        width=width,
        opts=opts,
        labels=labels,
        num_items=num_items_in_batch,
        student=student,
        teacher=teacher,
        device=student.device,
    )
    check_labels_in(labels, layout, opts.ignore_index)
    if not isinstance(teacher, SparseTeacher):
        ops.kernel_dtype_check("teacher_logits", teacher)
    parts = TeacherTensors(teacher)
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    t0, t1, t2 = parts.tensors
    outputs = _VocabParallelFunction.apply(
        student, t0, t1, t2, parts, labels, opts, layout, num_items_in_batch, compute_grad
    )
    return entropy_or_none(outputs, False)


def reject_together(group, error: Exception, device) -> None:
    """A rank whose inputs were rejected before the agreement: it takes part
    in the agreement (so that no other rank waits in a collective for it),
    and every rank raises; here, `error`."""
    agree(
        group,
        _KINDS[0],
        rows=0,
        width=0,
        opts=None,
        labels=None,
        num_items=None,
        student=None,
        teacher=None,
        device=device,
        error=error,
    )
    raise error  # not reached: agree raises


# ---- the fused-linear loss over a column-parallel lm_head ----------------------


class ShardGradient(TeacherSource):
    """The gradient phase as a teacher source of the fused-linear chunk
    loop: per chunk, this shard's gradient from the merged row constants (the
    rows' losses are known already: zeros here). The loop then forms the
    weight and bias rows' gradients and this shard's part of the hidden
    states' gradient (summed over the group by the layer that feeds the
    lm_head, as Megatron-LM's column-parallel layers do)."""

    own_gradient = True

    def __init__(self, phases, operands, consts):
        self.phases, self.operands, self.consts = phases, operands, consts

    def row_bytes(self) -> int:
        return self.operands.row_bytes()

    def buffer(self, rows: int):
        return self.operands.buffer(rows)

    def run(self, s, start, stop, buffer, labels, grad_scale, mode, grad_buffer, entropy=False):
        t = self.operands.operand(start, stop, buffer)
        g = self.phases.grad(s, t, labels, grad_scale, self.consts[start:stop].contiguous())
        rows = s.new_zeros(stop - start, dtype=torch.float32)
        return rows, rows, g, None


class Operands:
    """A teacher's phase operand chunk by chunk: dense logits (formed from
    hidden states, or slices of given logits), or a sparse teacher's rows."""

    def __init__(self, source: TeacherSource, sparse: tuple | None):
        self.source, self.sparse = source, sparse

    def row_bytes(self) -> int:
        return self.source.row_bytes()

    def buffer(self, rows: int):
        return self.source.buffer(rows)

    def operand(self, start, stop, buffer):
        if self.sparse is not None:
            return self.sparse[0][start:stop], self.sparse[1][start:stop]
        return self.source.logits(start, stop, buffer)


class _VocabParallelLinearFunction(torch.autograd.Function):
    """The fused-linear loss with each rank holding rows [V_r, H] of the
    lm_head weights: the chunk loop runs the statistics phase, one exchange
    for the whole batch (not one per chunk), and the gradient phase over the
    chunks again (each chunk's logits formed twice: the price of the single
    exchange). Backward scales the gradients; with reduction="none" it runs
    the gradient phase again from the saved constants (no collective)."""

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
        layout,
        num_items,
        need,
    ):
        teacher = teacher_kind.rebuild((t0, t1, t2))
        student = LinearStudent(
            s_hidden, s_weight, s_bias, lin.student_softcap, lin.student_logit_scale
        )
        source = teacher_source(opts, lin, teacher)
        phases = _phases(opts, layout, teacher)
        sparse = _operand(teacher) if isinstance(teacher, SparseTeacher) else None
        operands = Operands(source, sparse)
        n = student.rows
        chunk = lin.chunk_size
        if chunk is None:
            row_bytes = 2 * student.vocab * s_weight.element_size() + source.row_bytes()
            chunk = default_chunk_size(n, row_bytes, s_hidden.device.type)
        chunk = max(1, min(chunk, n)) if n else 1
        t_buffer = operands.buffer(min(chunk, n))

        def over_chunks(phase_fn):
            outs = []
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                s = student.logits(start, stop)
                t = operands.operand(start, stop, t_buffer)
                y = None if labels is None else labels[start:stop]
                outs.append(phase_fn(s, t, y, start, stop))
            return torch.cat(outs)

        consts, hard, soft = _merged_rows(
            phases,
            layout,
            lambda: over_chunks(lambda s, t, y, a, b: phases.stats(s, t, y)),
            lambda c: over_chunks(
                lambda s, t, y, a, b: phases.jsd_sums(s, t, y, c[a:b].contiguous())
            ),
            labels,
            sparse,
            n,
            s_hidden.device,
        )
        denom = counted_rows(labels, n, opts.ignore_index, s_hidden.device, num_items)
        outputs = finish_outputs(ctx, hard, soft, None, opts.alpha, opts.reduction, denom)
        ctx.reduction = opts.reduction
        grad_source = ShardGradient(phases, operands, consts)
        if opts.reduction == "none":  # the gradient phase runs in backward
            ctx.recompute = (student, grad_source, labels, chunk, need)
        elif any(need):
            scale = grad_scale_of(opts.reduction, denom)
            grads = chunk_pass(student, grad_source, labels, chunk, scale, None, need)[2]
            ctx.save_for_backward(*grads)
        else:
            ctx.save_for_backward(None, None, None)
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, _grad_hard, _grad_soft, _grad_entropy):
        refuse_double_backward()
        if ctx.reduction != "none":
            return scaled_saved(ctx, grad_loss, ctx.saved_tensors)
        student, grad_source, labels, chunk, need = ctx.recompute
        row_weights = grad_loss.to(torch.float32)
        grads = chunk_pass(student, grad_source, labels, chunk, None, row_weights, need)[2]
        return none_after(ctx, grads)


def linear_loss(
    s_hidden,
    s_weight,
    s_bias,
    labels,
    teacher,
    opts: LossOptions,
    lin: LinearOptions,
    num_items_in_batch,
    group,
):
    """The fused-linear loss's (loss, hard, soft) over a column-parallel
    lm_head (validated by the caller): each rank's rows [V_r, H] of the
    student weight (and bias), and the teacher's rows of its weight, its
    shard of dense teacher logits, or a sparse teacher with global ids."""
    if isinstance(teacher, SparseTeacher):
        call = _KINDS[4]
    elif isinstance(teacher, torch.Tensor):
        call = _KINDS[3]
    else:
        call = _KINDS[2]
    layout = agree(
        group,
        call,
        rows=s_hidden.shape[0],
        width=s_weight.shape[0],
        opts=opts,
        lin=lin,
        labels=labels,
        num_items=num_items_in_batch,
        student=(s_hidden, s_weight, s_bias),
        teacher=teacher,
        device=s_hidden.device,
    )
    check_labels_in(labels, layout, opts.ignore_index)
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and s_hidden.requires_grad,
        grad_on and s_weight.requires_grad,
        grad_on and s_bias is not None and s_bias.requires_grad,
    )
    parts = TeacherTensors(teacher)
    outputs = _VocabParallelLinearFunction.apply(
        s_hidden,
        s_weight,
        s_bias,
        labels,
        *parts.tensors,
        parts,
        opts,
        lin,
        layout,
        num_items_in_batch,
        need,
    )
    return entropy_or_none(outputs, False)
