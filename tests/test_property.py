"""Property-based: the kernel equals the float64 reference on any small input."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from oracle import DEVICES, check_against_oracle


@st.composite
def problems(draw):
    lead = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    vocab = draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    s = scale * torch.randn((*lead, vocab), generator=g)
    t = scale * torch.randn((*lead, vocab), generator=g)
    # Masked vocabulary entries (-inf in both models), never a whole row.
    if vocab > 1 and draw(st.booleans()):
        masked = torch.rand(vocab, generator=g) < 0.3
        masked[draw(st.integers(0, vocab - 1))] = False
        s[..., masked] = -math.inf
        t[..., masked] = -math.inf
    with_labels = draw(st.booleans())
    labels = None
    if with_labels:
        labels = torch.randint(0, vocab, lead, generator=g)
        ignore = torch.rand(lead, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
        labels[ignore] = -100
    options = dict(
        temperature=draw(st.sampled_from([0.25, 0.5, 1.0, 1.7, 4.0, 8.0])),
        alpha=draw(st.sampled_from([0.0, 0.2, 0.5, 1.0])) if with_labels else 0.0,
        divergence=draw(st.sampled_from(["forward_kl", "reverse_kl", "jsd"])),
        beta=draw(st.sampled_from([0.05, 0.5, 0.95])),
        reduction=draw(st.sampled_from(["batchmean", "sum", "none"])),
        scale_by_t2=draw(st.booleans()),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
    )
    upstream_shape = lead if options["reduction"] == "none" else ()
    upstream = torch.rand(upstream_shape, generator=g) + 0.5
    return s, t, labels, upstream, options


@pytest.mark.parametrize("device", DEVICES)
@given(problem=problems())
def test_kernel_matches_reference(problem, device):
    s, t, labels, upstream, options = problem
    labels = None if labels is None else labels.to(device)
    check_against_oracle(s.to(device), t.to(device), labels, upstream, **options)
