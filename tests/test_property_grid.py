"""Property-based, over the grid and the options: the kernels against the
float64 reference by the 2x rule (flash-attention's: the kernel's error at
most twice PyTorch's own in the same dtype) on any small input -- a sparse
teacher padded or ragged with either tail, the fused-linear loss with a dense
teacher (hidden states or logits) or a sparse one, softcaps, logit scales,
biases and chunk sizes, and every temperature the loss accepts, from 1e-6 to
100."""

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
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    upstream = torch.rand((n,) if options["reduction"] == "none" else (), generator=g) + 0.5
    return s.to(dtype), teacher, labels, upstream, options


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
    # A sparse teacher: the top k of its float64 log-probs, ghost tail (one
    # known gap remains, test_known_gap_linear_sparse_reverse_kl).
    kind = draw(st.sampled_from(["hidden", "logits", "sparse"]))
    if kind == "sparse":
        k = draw(st.integers(1, vocab))
        lp, idx = torch.log_softmax(rand(n, vocab, scale=3.0), -1).topk(k, dim=-1)
        teacher = dict(teacher=SparseTeacher(idx, lp.float(), "ghost"))
    elif kind == "hidden":
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
    if kind == "sparse":  # the student's tail in float32's range, as for the logits loss
        logits = student["student_hidden"] @ student["student_weight"].t()
        if student["student_bias"] is not None:
            logits = logits + student["student_bias"]
        logits = logits * options["student_logit_scale"]
        if options["student_softcap"] is not None:
            logits = options["student_softcap"] * torch.tanh(logits / options["student_softcap"])
        assume(_tail_in_range(logits, teacher["teacher"].indices, options["temperature"]))
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


def _tail_cases():
    """Reverse KL at T = 0.3 from a sparse teacher on rows of 15 ids, 12 kept
    at store temperature 0.5: the kept ids hold all but 1e-8 to 1e-5 of the
    teacher's mass, and the divergence reads the log of that tail (times
    Ts / T). In float32 the tail is known only to about 1e-7, so the kernels
    form it in double from the stored log-probs. Formed in float32 (as
    -expm1(log sum exp(lp))), 15 of these 40 rows failed the 2x rule for
    reverse KL, gradients 2-9x PyTorch's float32 error off, and where the
    float32 tail fell to 0 or below the loss was infinite (seeds 7, 10, 11,
    14) where float64 gives 4.9, 2.8, 10.4 and 31.1."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        s = 3.0 * torch.randn(1, 15, generator=g)
        t = 3.0 * torch.randn(1, 15, generator=g, dtype=torch.float64)
        values, idx = torch.log_softmax(t / 0.5, -1).topk(12, dim=-1)
        yield s, SparseTeacher(idx, values.float(), "ghost", 0.5)


def _linear_gap_cases():
    """The fused-linear loss from a sparse teacher keeping every id (so no
    tail), reverse KL at T = 0.3, a softcapped and scaled student, 1 row of
    hidden size 4."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        torch.randn(1, 15, generator=g)  # the draws of _tail_cases first
        torch.randn(1, 15, generator=g, dtype=torch.float64)
        hidden = torch.randn(1, 4, generator=g, dtype=torch.float64)
        weight = torch.randn(23, 4, generator=g, dtype=torch.float64)
        t = 3.0 * torch.randn(1, 23, generator=g, dtype=torch.float64)
        values, idx = torch.log_softmax(t, -1).topk(23, dim=-1)
        yield hidden, weight, SparseTeacher(idx, values.float(), "ghost")


GAP_OPTIONS = dict(temperature=0.3, alpha=0.0, divergence="reverse_kl", scale_by_t2=False)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_teacher_tail_near_zero(divergence):
    for s, teacher in _tail_cases():
        check_sparse(s, teacher, None, **dict(GAP_OPTIONS, divergence=divergence, beta=0.4))


@pytest.mark.xfail(
    strict=True,
    reason="known gap: the fused-linear loss from a sparse teacher keeping every id, reverse "
    "KL at T = 0.3, one row of hidden size 4: the hidden states' gradient 4x PyTorch's "
    "float32 error (1.3e-5 against 3.2e-6, seed 0); from the same teacher as dense logits, "
    "1.3e-6",
)
def test_known_gap_linear_sparse_reverse_kl():
    for hidden, weight, teacher in _linear_gap_cases():
        student = dict(student_hidden=hidden, student_weight=weight, student_bias=None)
        linear = dict(GAP_OPTIONS, student_softcap=4.0, student_logit_scale=0.6)
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
