"""The losses the benchmarks compare: kdfused, and what a user would write instead.

Every provider computes the same loss as ``kdfused.fused_distill_loss`` with
``reduction="batchmean"`` (docs/design.md, "The loss") and returns a float32 scalar.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kdfused


@dataclass(frozen=True)
class LossOptions:
    """The loss options every provider takes (FusedDistillLoss's names)."""

    temperature: float = 2.0
    alpha: float = 0.5
    divergence: str = "forward_kl"
    beta: float = 0.5
    ignore_index: int = -100
    label_smoothing: float = 0.0
    teacher_vocab: str = "exact"  # "truncate": the teacher's logits may be wider


def plain_loss(student, teacher, labels, opts: LossOptions):
    """The loss as users write it in PyTorch: float32 upcast, log-softmaxes,
    F.kl_div per row, cross-entropy, masked mean over the counted rows."""
    t_ = opts.temperature
    wide = torch.promote_types(student.dtype, torch.float32)  # float32, or float64 kept
    teacher = teacher[..., : student.shape[-1]]  # a padded teacher's first V columns
    s32, t32 = student.to(wide), teacher.to(wide)
    counted = labels != opts.ignore_index
    hard = F.cross_entropy(
        s32, labels, ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing
    )
    log_ps = F.log_softmax(s32 / t_, dim=-1)
    log_pt = F.log_softmax(t32 / t_, dim=-1)

    def kl(log_p, log_q):  # KL(p || q) per row
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)

    if opts.divergence == "forward_kl":
        div = kl(log_pt, log_ps)
    elif opts.divergence == "reverse_kl":
        div = kl(log_ps, log_pt)
    else:
        log_m = torch.logaddexp(log_pt + math.log(opts.beta), log_ps + math.log1p(-opts.beta))
        div = opts.beta * kl(log_pt, log_m) + (1 - opts.beta) * kl(log_ps, log_m)
    soft = (div * counted).sum() / counted.sum().clamp(min=1)
    return opts.alpha * hard + (1 - opts.alpha) * t_**2 * soft


def _kdfused(opts: LossOptions):
    return kdfused.FusedDistillLoss(**dataclasses.asdict(opts))


def _eager(opts: LossOptions):
    return lambda s, t, y: plain_loss(s, t, y, opts)


def _compiled(opts: LossOptions):
    return torch.compile(lambda s, t, y: plain_loss(s, t, y, opts))


def _liger(opts: LossOptions):
    """Liger-Kernel's pieces for the same loss: its generalised JSD kernel on
    log-probabilities (beta = 0 is KL(teacher || student), 1 the reverse) and
    its fused cross-entropy on the logits."""
    from liger_kernel.transformers.functional import liger_cross_entropy, liger_jsd

    beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(opts.divergence, opts.beta)
    t_ = opts.temperature

    def loss(s, t, y):
        t = t[..., : s.shape[-1]]
        log_ps = F.log_softmax(s / t_, dim=-1, dtype=torch.float32)
        log_pt = F.log_softmax(t / t_, dim=-1, dtype=torch.float32)
        soft = liger_jsd(log_ps, log_pt, shift_labels=y, beta=beta, ignore_index=opts.ignore_index)
        hard = liger_cross_entropy(
            s, y, ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing
        )
        return opts.alpha * hard.float() + (1 - opts.alpha) * t_**2 * soft.float()

    return loss


def _liger_missing(device: str) -> str | None:
    if device != "cuda":
        return "Liger-Kernel runs on CUDA only"
    try:
        import liger_kernel  # noqa: F401
    except ImportError as err:
        return f"liger-kernel is not importable ({err})"
    return None


@dataclass(frozen=True)
class Provider:
    name: str
    make: Callable[[LossOptions], Callable]
    missing: Callable[[str], str | None] = lambda device: None  # why it cannot run, or None


PROVIDERS = {
    p.name: p
    for p in (
        Provider("kdfused", _kdfused),
        Provider("eager", _eager),
        Provider("compile", _compiled),
        Provider("liger", _liger, _liger_missing),
    )
}
