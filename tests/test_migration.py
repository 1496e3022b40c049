"""README's migration snippets hold: each library's distillation loss, written
here in plain PyTorch from its published definition, equals the kdfused call
the README maps it to (with the option that changes the numbers), loss and
student gradient, by the 2x rule against float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_2x_of_torch

import kdfused

N, V = 37, 203


def problem(seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(N, V, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(N, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    if ignore:
        y[::5] = -100
    return s, t, y


def masked_mean(per_row, y):
    mask = y != -100
    return per_row[mask].sum() / mask.sum()


def gkd(s, t, y, beta, temperature):
    """Generalised JSD of GKD (Agarwal et al. 2024, Eq. 1) as TRL's
    GKDTrainer.generalized_jsd_loss defines it: m = beta p_t + (1 - beta) p_s,
    beta = 0 forward KL, 1 reverse KL, no T^2, batchmean over labelled rows.
    Liger-Kernel's JSD uses the same convention."""
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    if beta == 0:
        d = (lt.exp() * (lt - ls)).sum(-1)
    elif beta == 1:
        d = (ls.exp() * (ls - lt)).sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
        d = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    return masked_mean(d, y)


def hand_written(s, t, y, temperature=2.0, alpha=0.5):
    """The README's hand-written KLDivLoss."""
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    soft = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * temperature**2
    return alpha * F.cross_entropy(s, y) + (1 - alpha) * soft


def torchtune(s, t, y, kd_ratio=0.5):
    """torchtune's ForwardKLLoss (-sum p_t log p_s over labelled rows, T = 1)
    mixed as its KD recipe does: (1 - kd_ratio) CE + kd_ratio KD."""
    kd = masked_mean(-(F.softmax(t, -1) * F.log_softmax(s, -1)).sum(-1), y)
    return (1 - kd_ratio) * F.cross_entropy(s, y) + kd_ratio * kd


def liger_jsd(s, t, y, weight_hard=0.5, weight_soft=0.5, beta=0.5, temperature=1.0):
    """LigerFusedLinearJSDLoss on the logits: weight_hard CE + weight_soft JSD,
    no T^2."""
    return weight_hard * F.cross_entropy(s, y) + weight_soft * gkd(s, t, y, beta, temperature)


def check(theirs, ours, s, t, y, offset=None):
    """ours(s32, t32, y) against theirs in float64, with theirs in float32 as
    PyTorch's own error; `offset(s, t, y)` is a known constant difference."""
    ref_s = s.clone().requires_grad_()
    ref = theirs(ref_s, t, y)
    if offset is not None:
        ref = ref - offset(s, t, y)
    ref.backward()
    same_s = s.float().requires_grad_()
    same = theirs(same_s, t.float(), y)
    if offset is not None:
        same = same - offset(s.float(), t.float(), y)
    same.backward()
    got_s = s.float().requires_grad_()
    got = ours(got_s, t.float(), y)
    got.backward()
    assert_2x_of_torch("loss", got, same, ref, intermediate=30.0)
    assert_2x_of_torch("grad", got_s.grad, same_s.grad, ref_s.grad)


def test_hand_written_kldivloss():
    s, t, y = problem(ignore=False)  # F.kl_div's batchmean counts every row
    check(
        hand_written,
        lambda s, t, y: kdfused.FusedDistillLoss(temperature=2.0, alpha=0.5)(s, t, y),
        s,
        t,
        y,
    )


def test_hand_written_without_t2():
    """A loss without the `* T * T` is kdfused's with scale_by_t2=False."""
    s, t, y = problem(ignore=False)

    def no_t2(s, t, y):
        log_ps, log_pt = F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1)
        soft = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")
        return 0.5 * F.cross_entropy(s, y) + 0.5 * soft

    check(
        no_t2,
        lambda s, t, y: kdfused.FusedDistillLoss(temperature=2.0, alpha=0.5, scale_by_t2=False)(
            s, t, y
        ),
        s,
        t,
        y,
    )


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_trl_gkd(beta):
    s, t, y = problem()
    divergence = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    kwargs = dict(beta=beta) if divergence == "jsd" else {}

    def ours(s, t, y):
        loss_fn = kdfused.FusedDistillLoss(
            temperature=1.5, alpha=0.0, divergence=divergence, scale_by_t2=False, **kwargs
        )
        return loss_fn(s, t, y)

    check(lambda s, t, y: gkd(s, t, y, beta, 1.5), ours, s, t, y)


def test_torchtune_forward_kl():
    """Same gradient; the value differs by kd_ratio times the teacher's mean
    entropy (torchtune's "KL" is the cross-entropy to the teacher)."""
    s, t, y = problem()

    def entropy(s, t, y):
        lt = F.log_softmax(t, -1)
        return 0.25 * masked_mean(-(lt.exp() * lt).sum(-1), y)

    check(
        lambda s, t, y: torchtune(s, t, y, kd_ratio=0.25),
        lambda s, t, y: kdfused.FusedDistillLoss(temperature=1.0, alpha=0.75)(s, t, y),
        s,
        t,
        y,
        offset=entropy,
    )


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.2, 1.4)])
def test_liger_fused_linear_jsd(weights):
    """Liger's weights (w_hard, w_soft) are kdfused's alpha = w_hard / (w_hard
    + w_soft) with scale_by_t2=False, times w_hard + w_soft."""
    w_hard, w_soft = weights
    s, t, y = problem()

    def ours(s, t, y):
        loss_fn = kdfused.FusedDistillLoss(
            temperature=2.0,
            alpha=w_hard / (w_hard + w_soft),
            divergence="jsd",
            beta=0.5,
            scale_by_t2=False,
        )
        return (w_hard + w_soft) * loss_fn(s, t, y)

    check(lambda s, t, y: liger_jsd(s, t, y, w_hard, w_soft, 0.5, 2.0), ours, s, t, y)
