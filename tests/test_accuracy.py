"""The fused kernels against the float64 reference over shapes, options and dtypes."""

import pytest
import torch
from oracle import DEVICES, check_against_oracle, make_labels, make_logits

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=lambda lead: f"{len(lead) + 1}d")
@pytest.mark.parametrize("vocab", [1, 7, 4097, 50257, 128256])
def test_shapes_and_vocab(device, divergence, lead, vocab):
    # Large vocabularies with few rows keep the float64 oracle cheap.
    if vocab > 10000:
        lead = lead[:1] if lead else lead
        lead = tuple(min(d, 2) for d in lead)
    s = make_logits((*lead, vocab), device=device, seed=vocab)
    t = make_logits((*lead, vocab), device=device, seed=vocab + 1)
    y = make_labels(lead, vocab, "some", device=device)
    upstream = torch.tensor(0.7)
    check_against_oracle(s, t, y, upstream, divergence=divergence, alpha=0.3, temperature=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 8.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_options(device, divergence, temperature, alpha, reduction, ignore):
    lead, vocab = (3, 4), 509
    s = make_logits((*lead, vocab), device=device, seed=1)
    t = make_logits((*lead, vocab), device=device, seed=2)
    y = make_labels(lead, vocab, ignore, device=device)
    g = torch.Generator().manual_seed(3)
    upstream = torch.rand(lead if reduction == "none" else (), generator=g) + 0.5
    check_against_oracle(
        s,
        t,
        y,
        upstream,
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        reduction=reduction,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("scale_by_t2", [True, False])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_beta_and_t2(device, divergence, scale_by_t2, beta):
    s = make_logits((6, 300), device=device, seed=4)
    t = make_logits((6, 300), device=device, seed=5)
    y = make_labels((6,), 300, "none", device=device)
    check_against_oracle(
        s, t, y, divergence=divergence, beta=beta, scale_by_t2=scale_by_t2, temperature=3.0
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_no_labels(device, divergence):
    s = make_logits((4, 3, 257), device=device, seed=6)
    t = make_logits((4, 3, 257), device=device, seed=7)
    check_against_oracle(s, t, None, divergence=divergence, alpha=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("student_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("teacher_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("vocab", [7, 4097])
def test_dtypes_2x_of_pytorch(device, student_dtype, teacher_dtype, divergence, vocab):
    """fp16/bf16 (and mixed): kernel error vs float64 within 2x of PyTorch's own."""
    s = make_logits((8, vocab), student_dtype, device, seed=8)
    t = make_logits((8, vocab), teacher_dtype, device, seed=9)
    y = make_labels((8,), vocab, "some", device=device)
    check_against_oracle(s, t, y, divergence=divergence, temperature=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_half_precision_loss_scaling(device, dtype, reduction):
    """A power-of-two upstream gradient (AMP's GradScaler) scales exactly, so the
    2x rule holds against an fp32 teacher too. (A general non-unit upstream adds
    one rounding of the scaled half-precision gradient: see backward.)"""
    s = make_logits((8, 1000), dtype, device, seed=10)
    t = make_logits((8, 1000), torch.float32, device, seed=11)
    y = make_labels((8,), 1000, "some", device=device)
    upstream = torch.full((8,) if reduction == "none" else (), 1024.0)
    check_against_oracle(s, t, y, upstream, reduction=reduction)
