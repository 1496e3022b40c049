"""The vocab-parallel loss (DESIGN.md section 7): logits split over the ranks
of a torch.distributed group by vocabulary, as a tensor-parallel lm_head
(column-parallel) leaves them.

Each rank holds a contiguous shard of every row, in group-rank order; shards
may differ in size; labels are global ids. The fused kernel runs in three
phases (csrc/parallel_op.h): each rank reduces its shard to per-row
statistics (12 floats a row), the ranks exchange those in one all_gather, and
every rank merges them in rank order (the same bits on every rank), finishes
the row's loss, and writes its shard's gradient from the merged constants.
JSD needs its mixture's two sums over the whole row, which need the merged
statistics first: a second all_gather of 2 floats a row. Nothing crosses in
backward, and the logits never do.

The exchanged tensor carries one more row: a fingerprint of the options,
labels and shard width, so that ranks that disagree raise the same error
together (none is left waiting in a collective). A rank's column offset comes
from the other ranks' widths, learnt in the exchange and remembered per
group; the first call with a group (or after its layout changed) cannot know
it in advance and exchanges the label's logit in a second collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import ops
from ._validation import DIVERGENCES, REDUCTIONS
from .functional import (
    SavedGradientFunction,
    combine_and_reduce,
    counted_rows,
    refuse_double_backward,
    scaled,
    upstream_is_one,
)

STATS = 12  # floats per row of a rank's statistics (ShardStats)
FINGERPRINT = (
    "temperature",
    "alpha",
    "beta",
    "divergence",
    "ignore_index",
    "scale_by_t2",
    "label_smoothing",
    "reduction",
    "rows",
    "labels",
    "label checksum",
)  # and, last, the rank's own shard width (which may differ)

# The shard widths of each group's ranks, as learnt from the last exchange.
_layouts: dict = {}


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


def _fingerprint(n, width, labels, options, reduction, device) -> torch.Tensor:
    """What every rank must agree on, and last its own shard width, as 12
    floats (exact in float32 for the values options take)."""
    ignore_index = options["ignore_index"]
    if labels is None:
        count, checksum = 0.0, 0.0
    else:
        count = 1.0 + float((labels != ignore_index).sum())
        checksum = float((labels.to(torch.int64) % 65521).sum() % 65521)
    values = [
        options["temperature"],
        options["alpha"],
        options["beta"],
        float(DIVERGENCES.index(options["divergence"])),
        float(ignore_index % 65521),
        float(options["scale_by_t2"]),
        options["label_smoothing"],
        float(REDUCTIONS.index(reduction)),
        float(n),
        count,
        checksum,
        float(width),
    ]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _check_agreement(fingerprints: torch.Tensor) -> list[int]:
    """The ranks' shard widths; raises the same ValueError on every rank if
    the ranks disagree on anything else."""
    widths = [int(w) for w in fingerprints[:, -1].tolist()]
    fingerprints = fingerprints[:, :-1]
    first = fingerprints[0]
    for r in range(1, fingerprints.shape[0]):
        differ = (fingerprints[r] != first).nonzero()
        if differ.numel():
            field = FINGERPRINT[int(differ[0, 0])]
            raise ValueError(
                f"kdfused: the ranks of the process group disagree on {field}: rank 0 has "
                f"{float(first[differ[0, 0]])}, rank {r} has {float(fingerprints[r, differ[0, 0]])}"
                " (every rank must pass the same options, rows and labels)"
            )
    if min(widths) < 1:
        raise ValueError(f"kdfused: every rank's shard needs at least one column, got {widths}")
    return widths


def _label_logits(student, labels, offset: int):
    """(the label's logit, 1.0) where the label lies in this shard, else (0, 0)."""
    width = student.shape[1]
    local = labels - offset
    inside = (local >= 0) & (local < width)
    picked = student.gather(1, local.clamp(0, width - 1)[:, None])[:, 0].float()
    return torch.where(inside, picked, torch.zeros_like(picked)), inside.float()


class RowExchange:
    """One forward's exchange of per-row statistics over a group, in the
    order the phases need it: guess this rank's columns from the remembered
    layout (the statistics phase needs the offset to find the label), exchange
    and merge, then JSD's sums. The vocab-parallel losses (logits here, the
    fused-linear chunk loop in kdfused.fused_linear) share it.

    labels: [N] global ids or None; width: this rank's shard width."""

    def __init__(self, group, n, width, labels, options, reduction):
        self.ex = Exchange(group)
        self.group, self.n, self.width = group, n, width
        self.labels, self.options, self.reduction = labels, options, reduction
        layout = _layouts.get(group)
        self.known = layout is not None and len(layout) == self.ex.world
        self.known = self.known and layout[self.ex.rank] == width
        self.guessed = layout if self.known else None
        self.offset = sum(layout[: self.ex.rank]) if self.known else 0
        self.vocab = sum(layout) if self.known else max(width, 1)
        # Nothing may raise on one rank before the exchange (the others would
        # wait in it): labels outside the vocabulary are clamped for the
        # statistics (which they do not change) and reported after it.
        ignore_index = options["ignore_index"]
        self.safe_labels = labels
        if labels is not None:
            clamped = labels.clamp(0, self.vocab - 1)
            self.safe_labels = torch.where(labels == ignore_index, labels, clamped)

    def phase_options(self) -> dict:
        """The phase ops' options: the loss options, column_offset, vocab."""
        return dict(self.options, column_offset=self.offset, vocab=self.vocab)

    def merge(self, stats, label_logits, device):
        """(consts [N, 11], hard, soft) from this rank's [N, 12] statistics
        (computed with phase_options() and safe_labels; None when width is 0).
        label_logits(offset) gives (the label's logit, 1.0) where the label
        lies in [offset, offset + width), else (0, 0): called only when the
        offset was not known in advance."""
        n, labels, options = self.n, self.labels, self.options
        ignore_index = options["ignore_index"]
        if stats is None:  # an empty shard: refused by every rank together, below
            stats = torch.zeros(n, STATS, device=device)
        if not self.known and labels is not None:
            stats[:, 10] = 0.0  # the label's owner is not known yet
        fingerprint = _fingerprint(n, self.width, labels, options, self.reduction, device)
        gathered = self.ex.all_gather(torch.cat([stats, fingerprint[None]]))
        layout = tuple(_check_agreement(gathered[:, n]))
        shards = gathered[:, :n].contiguous()
        self.vocab = sum(layout)
        self.offset = sum(layout[: self.ex.rank])
        if labels is not None:
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= self.vocab))
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"kdfused: labels[{i}] = {int(labels[i])} is outside the group's vocabulary "
                    f"[0, {self.vocab}) (shards of {list(layout)} columns) and is not "
                    f"ignore_index = {ignore_index}"
                )
        if labels is not None and self.guessed != layout:
            # The offsets used before the exchange were unknown or stale: the
            # label's logit crosses once more (every rank decides alike).
            shards[:, :, 9:11] = self.ex.all_gather(torch.stack(label_logits(self.offset), 1))
        _layouts[self.group] = layout
        merge_options = {k: options[k] for k in _MERGE_OPTIONS}
        return ops.distill_merge(shards, labels, **merge_options)

    def jsd_finish(self, consts, sums):
        """(consts, soft) once every rank's [N, 2] JSD sums are in."""
        return ops.distill_jsd_finish(
            consts,
            self.ex.all_gather(sums),
            self.labels,
            temperature=self.options["temperature"],
            beta=self.options["beta"],
            ignore_index=self.options["ignore_index"],
            scale_by_t2=self.options["scale_by_t2"],
        )


class _VocabParallelFunction(SavedGradientFunction):
    """Forward: statistics phase, one exchange, merge (JSD: its sums and a
    second exchange), gradient phase. Backward scales the saved gradient."""

    @staticmethod
    def forward(ctx, student, teacher, labels, options, reduction, num_items, group, compute_grad):
        n, width = student.shape
        rx = RowExchange(group, n, width, labels, options, reduction)
        stats = None
        if width:
            stats = ops.distill_stats(student, teacher, rx.safe_labels, **rx.phase_options())
        consts, hard, soft = rx.merge(
            stats, lambda offset: _label_logits(student, labels, offset), student.device
        )
        if options["divergence"] == "jsd":
            sums = ops.distill_jsd_sums(
                student, teacher, labels, consts=consts, **rx.phase_options()
            )
            consts, soft = rx.jsd_finish(consts, sums)
        denom = counted_rows(labels, n, options["ignore_index"], student.device, num_items)
        if compute_grad:
            scale = denom.reciprocal() if reduction == "batchmean" else None
            grad = ops.distill_grad(
                student, teacher, labels, scale, consts=consts, **rx.phase_options()
            )
        else:
            grad = student.new_empty(0)
        alpha = options["alpha"]
        return SavedGradientFunction.finish(ctx, hard, soft, grad, alpha, reduction, denom, 8)


_MERGE_OPTIONS = (
    "temperature",
    "alpha",
    "divergence",
    "beta",
    "ignore_index",
    "scale_by_t2",
    "label_smoothing",
)


def vocab_parallel_loss(
    student, teacher, labels, *, process_group, options, reduction, num_items_in_batch
):
    """(loss, hard, soft) of [N, V_r] shards (validated by the caller):
    every rank gets the whole vocabulary's loss and its shard's gradient."""
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    return _VocabParallelFunction.apply(
        student,
        teacher.detach(),
        labels,
        options,
        reduction,
        num_items_in_batch,
        process_group,
        compute_grad,
    )


def split_over(group):
    """The group if the vocabulary is split over more than one rank, else None
    (a group of one: the plain loss, the same numbers and no collective)."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    return group


def forget_layouts() -> None:
    """Drops the remembered shard layouts (the next call with each group
    exchanges the label's logit once more)."""
    _layouts.clear()


# ---- the fused-linear loss over a column-parallel lm_head ----------------------


def _linear_label_logits(hidden, weight, bias, cap, labels, offset):
    """The label's logit formed from the hidden states where the label lies
    in this rank's rows of the weight [offset, offset + V_r)."""
    width = weight.shape[0]
    local = labels - offset
    inside = (local >= 0) & (local < width)
    rows = local.clamp(0, width - 1)
    logit = (hidden * weight[rows]).sum(-1)
    if bias is not None:
        logit = logit + bias[rows]
    if cap is not None:
        logit = cap * torch.tanh(logit / cap)
    logit = logit.float()
    return torch.where(inside, logit, torch.zeros_like(logit)), inside.float()


class _ShardGradient:
    """The gradient phase as a teacher source of kdfused.fused_linear's chunk
    loop: per chunk, the dense teacher's logits and this shard's gradient from
    the merged row constants (the rows' losses are known already: zeros here).
    The loop then forms the weight and bias rows' gradients and this shard's
    part of the hidden states' gradient (summed over the group by the layer
    that feeds the lm_head, as Megatron-LM's column-parallel layers do)."""

    inplace = False
    allocates = True

    def __init__(self, teacher, consts, phase_options):
        self.teacher, self.consts, self.phase = teacher, consts, phase_options

    def row_bytes(self) -> int:
        return self.teacher.row_bytes()

    def buffer(self, rows: int):
        return self.teacher.buffer(rows)

    def distill(self, s, start, stop, buffer, y, grad_scale, options, mode, g_buffer):
        t = self.teacher.logits(start, stop, buffer)
        consts = self.consts[start:stop].contiguous()
        g = ops.distill_grad(s, t, y, grad_scale, consts=consts, **self.phase)
        rows = s.new_zeros(stop - start, dtype=torch.float32)
        return rows, rows, g


def _linear_grads(tensors, teacher, rx, consts, labels, chunk, grad_scale, row_weights, need, cap):
    """(hidden, weight, bias) gradients of the shard, by the fused-linear loop."""
    from .fused_linear import _chunk_pass

    s_hidden, s_weight, s_bias = tensors
    source = _ShardGradient(teacher, consts, rx.phase_options())
    return _chunk_pass(
        s_hidden, s_weight, s_bias, cap, labels, source, {}, chunk, grad_scale, row_weights, need
    )[2]


class _VocabParallelLinearFunction(torch.autograd.Function):
    """The fused-linear loss with each rank holding rows [V_r, H] of the
    lm_head weights: the chunk loop runs the statistics phase, one exchange
    for the whole batch (not one per chunk), and the gradient phase over the
    chunks again (each chunk's logits formed twice: the price of the single
    exchange). Backward scales the gradients; with reduction="none" it runs
    the gradient phase again from the saved constants (no collective)."""

    @staticmethod
    def forward(
        ctx, s_hidden, s_weight, s_bias, labels, t_hidden, t_weight, t_bias, t_logits, args
    ):
        from .fused_linear import _teacher_source, default_chunk_size, linear_logits

        options, reduction, num_items, s_cap, t_cap, chunk, group, need = args
        teacher = _teacher_source(t_hidden, t_weight, t_bias, t_logits, t_cap, None, None, None)
        n, width = s_hidden.shape[0], s_weight.shape[0]
        if chunk is None:
            row_bytes = 2 * width * s_weight.element_size() + teacher.row_bytes()
            chunk = default_chunk_size(n, row_bytes, s_hidden.device.type)
        chunk = max(1, min(chunk, n)) if n else 1
        rx = RowExchange(group, n, width, labels, options, reduction)
        t_buffer = teacher.buffer(min(chunk, n))

        def chunks(phase_fn):
            outs = []
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                s = linear_logits(s_hidden[start:stop], s_weight, s_bias, s_cap)
                t = teacher.logits(start, stop, t_buffer)
                outs.append(phase_fn(s, t, start, stop))
            return torch.cat(outs) if outs else None

        safe = rx.safe_labels
        stats = None
        if width and n:
            stats = chunks(
                lambda s, t, a, b: ops.distill_stats(
                    s, t, None if safe is None else safe[a:b], **rx.phase_options()
                )
            )
        elif width:
            stats = torch.zeros(0, STATS, device=s_hidden.device)
        consts, hard, soft = rx.merge(
            stats,
            lambda offset: _linear_label_logits(s_hidden, s_weight, s_bias, s_cap, labels, offset),
            s_hidden.device,
        )
        if options["divergence"] == "jsd":
            sums = chunks(
                lambda s, t, a, b: ops.distill_jsd_sums(
                    s,
                    t,
                    None if labels is None else labels[a:b],
                    consts=consts[a:b].contiguous(),
                    **rx.phase_options(),
                )
            )
            sums = sums if sums is not None else torch.zeros(0, 2, device=s_hidden.device)
            consts, soft = rx.jsd_finish(consts, sums)
        ignore_index = options["ignore_index"]
        denom = counted_rows(labels, n, ignore_index, s_hidden.device, num_items)
        grad_scale = denom.reciprocal() if reduction == "batchmean" else None
        loss, hard, soft = combine_and_reduce(hard, soft, options["alpha"], reduction, denom)
        ctx.mark_non_differentiable(hard, soft)
        ctx.reduction = reduction
        ctx.rx, ctx.chunk, ctx.need, ctx.cap, ctx.teacher = rx, chunk, need, s_cap, teacher
        if reduction == "none" or not any(need):
            ctx.save_for_backward(s_hidden, s_weight, s_bias, labels, consts)
        else:
            grads = _linear_grads(
                (s_hidden, s_weight, s_bias),
                teacher,
                rx,
                consts,
                labels,
                chunk,
                grad_scale,
                None,
                need,
                s_cap,
            )
            ctx.save_for_backward(*grads)
        return loss, hard, soft

    @staticmethod
    def backward(ctx, grad_loss, _grad_hard, _grad_soft):
        refuse_double_backward()
        none = (None,) * 6
        if ctx.reduction == "none":
            s_hidden, s_weight, s_bias, labels, consts = ctx.saved_tensors
            grads = _linear_grads(
                (s_hidden, s_weight, s_bias),
                ctx.teacher,
                ctx.rx,
                consts,
                labels,
                ctx.chunk,
                None,
                grad_loss.to(torch.float32),
                ctx.need,
                ctx.cap,
            )
            return grads + none
        grads = ctx.saved_tensors
        present = [g for g in grads if g is not None]
        if present and upstream_is_one(grad_loss, present[0]):
            return tuple(grads) + none
        return tuple(None if g is None else scaled(g, grad_loss) for g in grads) + none


def vocab_parallel_linear_loss(
    s_hidden, s_weight, s_bias, labels, t_hidden, t_weight, t_bias, t_logits, *, args
):
    """The fused-linear loss's (loss, hard, soft) over a column-parallel
    lm_head (validated by the caller; args as _VocabParallelLinearFunction's)."""
    return _VocabParallelLinearFunction.apply(
        s_hidden, s_weight, s_bias, labels, t_hidden, t_weight, t_bias, t_logits, args
    )
