"""Property-based, over the grid and the options: the kernels against the
float64 reference by the 2x rule (flash-attention's: the kernel's error at
most twice PyTorch's own in the same dtype) on any small input -- a sparse
teacher padded or ragged with either tail, the fused-linear loss with a dense
teacher (hidden states or logits), softcaps, logit scales, biases and chunk
sizes, and every temperature the loss accepts, from 1e-6 to 100."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from oracle import _log_prob_size, assert_2x_of_torch, check_against_oracle
from test_sparse import check_sparse

import kdfused
from kdfused import SparseTeacher, ops

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="needs kdfused's CPU kernel")
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


def _labels(draw, g, lead, vocab):
    if not draw(st.booleans()):
        return None
    labels = torch.randint(0, vocab, lead, generator=g)
    ignore = torch.rand(lead, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    labels[ignore] = -100
    return labels


def _options(draw, labels, *, divergences=DIVERGENCES):
    return dict(
        temperature=draw(st.sampled_from([0.3, 1.0, 2.0, 5.0])),
        alpha=draw(st.sampled_from([0.0, 0.3, 1.0])) if labels is not None else 0.0,
        divergence=draw(st.sampled_from(divergences)),
        beta=draw(st.sampled_from([0.1, 0.5, 0.9])),
        reduction=draw(st.sampled_from(["batchmean", "sum", "none"])),
        scale_by_t2=draw(st.booleans()),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.2])),
    )


@st.composite
def sparse_problems(draw):
    n = draw(st.integers(0, 9))
    vocab = draw(st.integers(2, 90))
    k = draw(st.integers(1, vocab))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.5, 3.0]))
    s = scale * torch.randn(n, vocab, generator=g)
    store_temperature = draw(st.sampled_from([0.5, 1.0, 2.0]))
    t = scale * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    values, idx = torch.log_softmax(t / store_temperature, -1).topk(k, dim=-1)
    keep = torch.rand(n, k, generator=g) < draw(st.sampled_from([1.0, 0.6]))
    idx, values = torch.where(keep, idx, -1), torch.where(keep, values, -math.inf)
    labels = _labels(draw, g, (n,), vocab)
    tail = draw(st.sampled_from(["ghost", "renormalize"]))
    divergences = DIVERGENCES if tail == "ghost" else ["forward_kl"]
    options = _options(draw, labels, divergences=divergences)
    teacher = SparseTeacher(idx, values.float(), tail, store_temperature)
    if draw(st.booleans()):
        teacher = teacher.compact()
    # The kernels sum the student's tail (the ids the teacher did not keep) in
    # float32 relative to the row's max: a tail below exp(-80) of the row's
    # mass is out of its range (docs/usage.md, "Offline: a sparse teacher from
    # stored top-k"), and such rows are left out here.
    assume(_tail_in_range(s, idx, options["temperature"]))
    assume(not _known_gap(options))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    upstream = torch.rand((n,) if options["reduction"] == "none" else (), generator=g) + 0.5
    return s.to(dtype), teacher, labels, upstream, options


def _known_gap(options) -> bool:
    """Reverse KL from a sparse teacher: on small rows the gradient's error
    reaches 2-8x PyTorch's float32 error, most below T = 1 (the dense teacher
    passes the same rows); test_known_gap_sparse_reverse_kl holds it, and the
    property tests leave it out."""
    return options["divergence"] == "reverse_kl"


def _tail_in_range(s, idx, temperature, lowest=-80.0) -> bool:
    """Whether every row's student tail holds at least exp(lowest) of its
    mass at this temperature, or nothing at all (every id kept)."""
    lp = torch.log_softmax(s.double() / temperature, -1)
    n, vocab = lp.shape
    kept = torch.zeros(n, vocab + 1, dtype=torch.bool)  # a pad (-1) marks column V
    kept.scatter_(-1, torch.where(idx >= 0, idx, vocab), True)
    kept = kept[:, :vocab]
    tail = torch.logsumexp(lp.masked_fill(kept, -math.inf), -1)
    return bool(((tail >= lowest) | kept.all(-1)).all())


@settings(max_examples=80)
@given(problem=sparse_problems())
def test_sparse_teacher_matches_reference(problem):
    s, teacher, labels, upstream, options = problem
    padded = teacher.padded() if teacher.ragged else teacher
    ref = kdfused.reference.sparse_distill_loss(
        s.double(),
        padded.indices,
        padded.logprobs.double(),
        labels,
        tail=padded.tail,
        store_temperature=padded.store_temperature,
        **options,
    )
    if not torch.isfinite(ref).all():
        # A teacher whose kept ids hold all its float32 mass (log-prob 0) and a
        # student with mass elsewhere: an infinite divergence, where a gradient
        # means nothing. The loss must be infinite too.
        got = kdfused.fused_distill_loss(s, teacher, labels, **options)
        assert torch.equal(torch.isposinf(got), torch.isposinf(ref.float()))
        return
    check_sparse(s, padded, labels, upstream, **options)
    if teacher.ragged:  # the ragged rows: the padded rows' numbers
        a = kdfused.fused_distill_loss(s, teacher, labels, **options)
        b = kdfused.fused_distill_loss(s, teacher.padded(), labels, **options)
        assert torch.equal(a, b)


@st.composite
def linear_problems(draw):
    n = draw(st.integers(1, 12))
    vocab = draw(st.integers(2, 60))
    hs, ht = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    student = dict(
        student_hidden=rand(n, hs),
        student_weight=rand(vocab, hs, scale=2 / math.sqrt(hs)),
        student_bias=rand(vocab) if draw(st.booleans()) else None,
    )
    # A sparse teacher is left out here, a known gap: on these tiny problems
    # (1-12 rows, hidden sizes from 1) its gradients' error reaches 2-8x
    # PyTorch's float32 error (test_known_gap_sparse_reverse_kl; forward KL
    # too); tests/test_sparse.py holds the fused-linear loss from a sparse
    # teacher at fixed sizes.
    kind = draw(st.sampled_from(["hidden", "logits"]))
    if kind == "hidden":
        teacher = dict(
            teacher_hidden=rand(n, ht),
            teacher_weight=rand(vocab, ht, scale=2 / math.sqrt(ht)),
            teacher_bias=rand(vocab) if draw(st.booleans()) else None,
        )
    else:
        teacher = dict(teacher_logits=rand(n, vocab, scale=3.0))
    labels = _labels(draw, g, (n,), vocab)
    options = _options(draw, labels)
    options.update(
        chunk_size=draw(st.sampled_from([None, 1, 3, 7])),
        student_softcap=draw(st.sampled_from([None, 4.0])),
        student_logit_scale=draw(st.sampled_from([1.0, 0.6])),
    )
    if kind == "hidden":
        options.update(
            teacher_softcap=draw(st.sampled_from([None, 5.0])),
            teacher_logit_scale=draw(st.sampled_from([1.0, 1.4])),
        )
    return student, teacher, labels, options


def _linear_run(student, teacher, labels, options, dtype, fn):
    leaves = {
        k: None if v is None else v.to(dtype).detach().requires_grad_() for k, v in student.items()
    }
    cast = {k: v if not isinstance(v, torch.Tensor) else v.to(dtype) for k, v in teacher.items()}
    out = fn(
        leaves["student_hidden"],
        leaves["student_weight"],
        labels,
        student_bias=leaves["student_bias"],
        return_components=True,
        **cast,
        **options,
    )
    out.loss.sum().backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return out, grads


@settings(max_examples=80)
@given(problem=linear_problems())
def test_fused_linear_matches_reference(problem):
    student, teacher, labels, options = problem
    ref_options = {k: v for k, v in options.items()}
    got, got_g = _linear_run(
        student, teacher, labels, options, torch.float32, kdfused.fused_linear_distill_loss
    )
    same, same_g = _linear_run(
        student,
        teacher,
        labels,
        ref_options,
        torch.float32,
        kdfused.reference.fused_linear_distill_loss,
    )
    ref, ref_g = _linear_run(
        student,
        teacher,
        labels,
        ref_options,
        torch.float64,
        kdfused.reference.fused_linear_distill_loss,
    )
    logits = student["student_hidden"] @ student["student_weight"].t()
    size = _log_prob_size(logits, logits, labels, **options) + 10.0
    for field in ("loss", "hard_loss", "soft_loss"):
        assert_2x_of_torch(
            field, getattr(got, field), getattr(same, field), getattr(ref, field), size
        )
    for name in ref_g:
        assert_2x_of_torch(name, got_g[name], same_g[name], ref_g[name])


@st.composite
def temperature_problems(draw):
    """Any temperature the loss takes, log-uniform over [1e-6, 100]."""
    exponent = draw(st.floats(-6.0, 2.0))
    n, vocab = draw(st.integers(1, 6)), draw(st.integers(2, 400))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.3, 3.0, 30.0]))
    s, t = scale * torch.randn(n, vocab, generator=g), scale * torch.randn(n, vocab, generator=g)
    labels = _labels(draw, g, (n,), vocab)
    options = _options(draw, labels)
    options["temperature"] = 10.0**exponent
    return s, t, labels, options


@settings(max_examples=120)
@given(problem=temperature_problems())
def test_every_accepted_temperature(problem):
    s, t, labels, options = problem
    check_against_oracle(s, t, labels, None, **options)


def _gap_cases():
    """Reverse KL at T = 0.3 from a sparse teacher, small rows: the logits
    loss (12 of 15 ids kept, store temperature 0.5) and the fused-linear loss
    (every id kept, a softcapped and scaled student)."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        s = 3.0 * torch.randn(1, 15, generator=g)
        t = 3.0 * torch.randn(1, 15, generator=g, dtype=torch.float64)
        values, idx = torch.log_softmax(t / 0.5, -1).topk(12, dim=-1)
        yield "logits", (s, SparseTeacher(idx, values.float(), "ghost", 0.5))
        hidden = torch.randn(1, 4, generator=g, dtype=torch.float64)
        weight = torch.randn(23, 4, generator=g, dtype=torch.float64)
        t = 3.0 * torch.randn(1, 23, generator=g, dtype=torch.float64)
        values, idx = torch.log_softmax(t, -1).topk(23, dim=-1)
        yield "linear", (hidden, weight, SparseTeacher(idx, values.float(), "ghost"))


@pytest.mark.xfail(
    strict=True,
    reason="known gap: reverse KL from a sparse teacher, the gradient's error up to 8x "
    "PyTorch's float32 error on small rows at T = 0.3 (dense teachers pass the same rows)",
)
def test_known_gap_sparse_reverse_kl():
    options = dict(temperature=0.3, alpha=0.0, divergence="reverse_kl", scale_by_t2=False)
    for kind, case in _gap_cases():
        if kind == "logits":
            s, teacher = case
            check_sparse(s, teacher, None, **options)
            continue
        hidden, weight, teacher = case
        student = dict(student_hidden=hidden, student_weight=weight, student_bias=None)
        linear = dict(options, student_softcap=4.0, student_logit_scale=0.6)
        runs = [
            _linear_run(student, dict(teacher=teacher), None, linear, dtype, fn)[1]
            for dtype, fn in (
                (torch.float32, kdfused.fused_linear_distill_loss),
                (torch.float32, kdfused.reference.fused_linear_distill_loss),
                (torch.float64, kdfused.reference.fused_linear_distill_loss),
            )
        ]
        for name in runs[2]:
            assert_2x_of_torch(name, runs[0][name], runs[1][name], runs[2][name])
