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
from .functional import SavedGradientFunction, counted_rows

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


def _fingerprint(student, labels, options, reduction, ignore_index) -> torch.Tensor:
    """What every rank must agree on, as 12 floats (exact in float32 for the
    values options take)."""
    n = student.shape[0]
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
        float(student.shape[1]),
    ]
    return torch.tensor(values, dtype=torch.float32, device=student.device)


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


class _VocabParallelFunction(SavedGradientFunction):
    """Forward: statistics phase, one exchange, merge (JSD: its sums and a
    second exchange), gradient phase. Backward scales the saved gradient."""

    @staticmethod
    def forward(ctx, student, teacher, labels, options, reduction, num_items, group, compute_grad):
        ex = Exchange(group)
        n, width = student.shape
        ignore_index = options["ignore_index"]
        layout = _layouts.get(group)
        known = layout is not None and len(layout) == ex.world and layout[ex.rank] == width
        offset = sum(layout[: ex.rank]) if known else 0
        vocab = sum(layout) if known else width
        # Nothing may raise on one rank before the exchange (the others would
        # wait in it): labels outside the vocabulary are clamped for the
        # statistics (which they do not change) and reported after it.
        safe = labels
        if labels is not None:
            safe = torch.where(labels == ignore_index, labels, labels.clamp(0, max(vocab, 1) - 1))
        phase = dict(options, column_offset=offset, vocab=vocab)
        if width == 0:  # refused by every rank together, after the exchange
            stats = torch.zeros(n, STATS, device=student.device)
        else:
            stats = ops.distill_stats(student, teacher, safe, **phase)
        if not known and labels is not None:
            stats[:, 10] = 0.0  # the label's owner is not known yet
        fingerprint = _fingerprint(student, labels, options, reduction, ignore_index)
        gathered = ex.all_gather(torch.cat([stats, fingerprint[None]]))
        widths = _check_agreement(gathered[:, n])
        shards = gathered[:, :n].contiguous()
        true_layout = tuple(widths)
        vocab = sum(true_layout)
        offset = sum(true_layout[: ex.rank])
        if labels is not None:
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"kdfused: labels[{i}] = {int(labels[i])} is outside the group's vocabulary "
                    f"[0, {vocab}) (shards of {list(true_layout)} columns) and is not "
                    f"ignore_index = {ignore_index}"
                )
        if labels is not None and not (known and true_layout == layout):
            # The offsets used before the exchange were unknown or stale: the
            # label's logit crosses once more (every rank decides alike).
            picked = torch.stack(_label_logits(student, labels, offset), 1)
            fixed = ex.all_gather(picked)
            shards[:, :, 9:11] = fixed
        _layouts[group] = true_layout
        merge_options = {k: options[k] for k in _MERGE_OPTIONS}
        consts, hard, soft = ops.distill_merge(shards, labels, **merge_options)
        if options["divergence"] == "jsd":
            phase = dict(options, column_offset=offset, vocab=vocab)
            sums = ops.distill_jsd_sums(student, teacher, labels, consts=consts, **phase)
            consts, soft = ops.distill_jsd_finish(
                consts,
                ex.all_gather(sums),
                labels,
                temperature=options["temperature"],
                beta=options["beta"],
                ignore_index=ignore_index,
                scale_by_t2=options["scale_by_t2"],
            )
        denom = counted_rows(labels, n, ignore_index, student.device, num_items)
        if compute_grad:
            scale = denom.reciprocal() if reduction == "batchmean" else None
            phase = dict(options, column_offset=offset, vocab=vocab)
            grad = ops.distill_grad(student, teacher, labels, scale, consts=consts, **phase)
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


def forget_layouts() -> None:
    """Drops the remembered shard layouts (the next call with each group
    exchanges the label's logit once more)."""
    _layouts.clear()
