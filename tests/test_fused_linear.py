"""The fused-linear loss (hidden states in, no N x V logits) against the
float64 reference, which materialises the logits (docs/design.md, "The fused-linear loss")."""

import math

import pytest
import torch
import torch.nn.functional as F
from oracle import DEVICES, _log_prob_size, assert_2x_of_torch, make_labels

import kdfused
from kdfused import fused_linear, ops

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
LEAD, HS, HT, VOCAB = (2, 37), 16, 24, 101  # 74 rows: no chunk size below divides it


def make_problem(
    device="cpu",
    dtype=torch.float32,
    *,
    source="hidden",
    student_bias=False,
    teacher_bias=False,
    lead=LEAD,
    vocab=VOCAB,
    seed=0,
    ignore="some",
):
    """(student kwargs, teacher kwargs, labels): weights scaled so that the
    logits have a spread of a few units, as a trained model's do."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        x = scale * torch.randn(shape, generator=g, dtype=torch.float64)
        return x.to(device, dtype)

    student = dict(
        student_hidden=rand(*lead, HS),
        student_weight=rand(vocab, HS, scale=3 / math.sqrt(HS)),
        student_bias=rand(vocab) if student_bias else None,
    )
    if source == "hidden":
        teacher = dict(
            teacher_hidden=rand(*lead, HT),
            teacher_weight=rand(vocab, HT, scale=3 / math.sqrt(HT)),
            teacher_bias=rand(vocab) if teacher_bias else None,
        )
    else:
        teacher = dict(teacher_logits=rand(*lead, vocab, scale=3.0))
    labels = make_labels(lead, vocab, ignore, device=device, seed=seed)
    return student, teacher, labels


def run(fn, student, teacher, labels, upstream=None, dtype=None, **options):
    """fn's loss and the gradients of the student's hidden states, weight and
    bias, with the inputs cast to dtype (default: as they are) on the CPU when
    dtype is float64."""

    def cast(x):
        if x is None or dtype is None:
            return x
        return x.detach().cpu().to(dtype)

    leaves = {
        k: None if v is None else cast(v).detach().requires_grad_() for k, v in student.items()
    }
    t = {k: cast(v) for k, v in teacher.items()}
    y = labels if dtype is None or labels is None else labels.cpu()
    out = fn(
        leaves["student_hidden"],
        leaves["student_weight"],
        y,
        student_bias=leaves["student_bias"],
        return_components=True,
        **t,
        **options,
    )
    up = torch.ones_like(out.loss) if upstream is None else upstream.to(out.loss)
    (out.loss * up).sum().backward()
    grads = {k: None if v is None else v.grad for k, v in leaves.items()}
    return out, grads


def check_linear_against_oracle(student, teacher, labels, upstream=None, **options):
    """The fused-linear loss vs the float64 reference, with the reference in
    the inputs' own dtype (the unfused computation: logits materialised) as
    the yardstick of the 2x rule: loss, both components and every gradient."""
    out, grads = run(
        kdfused.fused_linear_distill_loss, student, teacher, labels, upstream, **options
    )
    options = {k: v for k, v in options.items() if k not in ("backend",)}
    ref_fn = kdfused.reference.fused_linear_distill_loss
    pt, pt_grads = run(ref_fn, student, teacher, labels, upstream, **options)
    ref, ref_grads = run(ref_fn, student, teacher, labels, upstream, torch.float64, **options)
    assert out.loss.dtype == torch.float32
    # The size of the float32 log-probabilities the loss is formed from.
    with torch.no_grad():
        s64 = F.linear(
            *(x.double().cpu() for x in (student["student_hidden"], student["student_weight"]))
        )
        t64 = teacher.get("teacher_logits")
        if t64 is None:
            t64 = F.linear(
                teacher["teacher_hidden"].double().cpu(), teacher["teacher_weight"].double().cpu()
            )
    loss_options = {
        k: v for k, v in options.items() if k in ("temperature", "scale_by_t2", "reduction")
    }
    size = _log_prob_size(s64, t64.double().cpu(), labels, **loss_options)
    for field in ("loss", "hard_loss", "soft_loss"):
        assert_2x_of_torch(
            field, getattr(out, field), getattr(pt, field), getattr(ref, field), size
        )
    for name, grad in grads.items():
        if grad is None:
            assert ref_grads[name] is None
            continue
        x = student[name]
        assert grad.dtype == x.dtype and grad.shape == x.shape and grad.device == x.device, name
        assert_2x_of_torch(f"grad of {name}", grad, pt_grads[name], ref_grads[name])
    return out, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.3), (2.0, 0.5), (4.0, 0.0), (0.7, 1.0)])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_options(device, divergence, temperature, alpha, reduction):
    student, teacher, labels = make_problem(device, student_bias=True, teacher_bias=True)
    g = torch.Generator().manual_seed(5)
    upstream = torch.rand(LEAD if reduction == "none" else (), generator=g) + 0.5
    check_linear_against_oracle(
        student,
        teacher,
        labels,
        upstream,
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        reduction=reduction,
        chunk_size=16,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source", ["hidden", "logits"])
@pytest.mark.parametrize("biases", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("softcaps", [(None, None), (4.0, None), (3.0, 5.0)])
def test_sources_biases_softcaps(device, source, biases, softcaps):
    if source == "logits" and (biases[1] or softcaps[1]):
        pytest.skip("teacher_bias and teacher_softcap go with a teacher given as hidden states")
    student, teacher, labels = make_problem(
        device, source=source, student_bias=biases[0], teacher_bias=biases[1], seed=1
    )
    check_linear_against_oracle(
        student,
        teacher,
        labels,
        divergence="jsd",
        chunk_size=9,
        student_softcap=softcaps[0],
        teacher_softcap=softcaps[1],
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_no_labels_and_2d(device, divergence):
    student, teacher, _ = make_problem(device, lead=(29,), vocab=7, seed=2)
    check_linear_against_oracle(
        student, teacher, None, alpha=0.0, divergence=divergence, chunk_size=8
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("source", ["hidden", "logits"])
def test_dtypes_2x_of_pytorch(device, dtype, divergence, source):
    """16-bit inputs: every output's error vs float64 within 2x of the unfused
    PyTorch computation's in the same dtype (logits materialised, then the
    reference loss). Per-row losses (reduction="none", a random upstream
    gradient): the rounding of the 16-bit logits dominates both errors, and in
    a single batch mean PyTorch's hard and soft errors can cancel by chance
    (seen: 2e-5 against 2.4e-4 and 2.0e-4 in its two terms)."""
    student, teacher, labels = make_problem(device, dtype, source=source, student_bias=True, seed=3)
    upstream = torch.rand(LEAD, generator=torch.Generator().manual_seed(6)) + 0.5
    check_linear_against_oracle(
        student,
        teacher,
        labels,
        upstream,
        divergence=divergence,
        reduction="none",
        chunk_size=16,
        student_softcap=30.0,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_size_invariance(device):
    """Any chunk size, or the default, gives the same numbers up to rounding."""
    student, teacher, labels = make_problem(device, student_bias=True, seed=4)
    results = []
    for chunk in (1, 7, 74, 1000, None):
        out, grads = run(
            kdfused.fused_linear_distill_loss,
            student,
            teacher,
            labels,
            divergence="reverse_kl",
            chunk_size=chunk,
        )
        results.append((out, grads))
    (out0, grads0), *rest = results
    for out, grads in rest:
        torch.testing.assert_close(out.loss, out0.loss, rtol=1e-6, atol=1e-6)
        for name in grads0:
            torch.testing.assert_close(grads[name], grads0[name], rtol=1e-5, atol=1e-6)


def test_default_chunk_size_follows_the_budget():
    budget = fused_linear.CHUNK_BUDGET_BYTES["cpu"]
    # float32, hidden-states teacher: student logits, their gradient, teacher logits.
    assert fused_linear.default_chunk_size(4096, 32000 * 12) == 168
    assert 168 * 32000 * 12 <= budget < 176 * 32000 * 12
    assert fused_linear.default_chunk_size(8192, 128256 * 6, "cuda") == 344  # bfloat16
    assert fused_linear.default_chunk_size(50, 32000 * 12) == 50  # never more rows than N
    assert fused_linear.default_chunk_size(9, 10**9) == 1  # at least one row


@pytest.mark.parametrize("chunk", [16, None])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunks_never_exceed_chunk_size(monkeypatch, chunk, softcap):
    """The kernel only ever sees one chunk of rows (no N x V logits exist), and
    writes every chunk's gradient over the logits themselves (the CPU kernel),
    or, with a student softcap (whose derivative needs the logits after the
    kernel), into a buffer of its own, reused chunk after chunk. (float32 CPU
    logits are a fresh tensor a chunk, from oneDNN, freed before the next: no
    buffer of logits is reused there.)"""
    seen = []
    for name in ("distill_forward_out", "distill_forward_inplace"):
        real = getattr(ops, name)

        def spy(s, t, y, scale, *grad, _real=real, _name=name, **kwargs):
            target = grad[0] if grad else s
            seen.append((_name, s.shape, t.shape, target.shape, target.data_ptr()))
            return _real(s, t, y, scale, *grad, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    # A budget of 30 rows of student logits, gradient and teacher logits: 24
    # rows when the gradient overwrites the logits, 16 when it needs a buffer.
    monkeypatch.setattr(fused_linear, "CHUNK_BUDGET_BYTES", {"cpu": 30 * VOCAB * 8})
    student, teacher, labels = make_problem()
    run(
        kdfused.fused_linear_distill_loss,
        student,
        teacher,
        labels,
        chunk_size=chunk,
        student_softcap=softcap,
    )
    expected_op = "distill_forward_out" if softcap else "distill_forward_inplace"
    rows = 16 if chunk or softcap else 24
    assert [shape[0] for _, shape, *_ in seen] == [rows] * (74 // rows) + [74 % rows]
    assert all(op == expected_op for op, *_ in seen)
    assert all(s == t == g == (s[0], VOCAB) for _, s, t, g, _ in seen)
    if softcap or not fused_linear.ONEDNN_LINEAR:
        assert len({ptr for *_, ptr in seen}) == 1


def test_gradients_reach_lm_head_and_earlier_layers():
    """As a user wires it: the student's last layer feeds the loss as hidden
    states, its lm_head (an nn.Linear) gives the weight; gradients reach every
    parameter, equal to the unfused model's."""
    torch.manual_seed(0)
    body = torch.nn.Linear(12, HS)
    lm_head = torch.nn.Linear(HS, VOCAB)
    teacher_head = torch.nn.Linear(HT, VOCAB, bias=False)
    x = torch.randn(3, 11, 12)
    teacher_hidden = torch.randn(3, 11, HT)
    labels = make_labels((3, 11), VOCAB)
    loss_fn = kdfused.FusedLinearDistillLoss(temperature=2.0, alpha=0.5, chunk_size=8)

    def grads(fused):
        for p in (*body.parameters(), *lm_head.parameters()):
            p.grad = None
        hidden = torch.tanh(body(x))
        if fused:
            loss = loss_fn(
                hidden, lm_head.weight, teacher_hidden, teacher_head.weight, labels, lm_head.bias
            )
        else:
            with torch.no_grad():
                t = teacher_head(teacher_hidden)
            loss = kdfused.FusedDistillLoss(temperature=2.0, alpha=0.5)(lm_head(hidden), t, labels)
        loss.backward()
        assert teacher_head.weight.grad is None
        return loss.detach(), [p.grad.clone() for p in (*body.parameters(), *lm_head.parameters())]

    (fused_loss, fused_grads), (plain_loss, plain_grads) = grads(True), grads(False)
    torch.testing.assert_close(fused_loss, plain_loss)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_computes_loss_only(device, monkeypatch):
    """No gradient wanted: the kernel is asked for the loss alone. Else only
    what requires a gradient gets one."""
    calls = []
    for name in ("distill_forward", "distill_forward_out", "distill_forward_inplace"):
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs.get("compute_grad")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    student, teacher, labels = make_problem(device)
    leaves = {k: v.requires_grad_() for k, v in student.items() if v is not None}
    with torch.no_grad():
        loss = kdfused.fused_linear_distill_loss(**leaves, labels=labels, **teacher, chunk_size=40)
    assert not loss.requires_grad
    assert calls == [("distill_forward", False)] * 2
    calls.clear()
    hidden = leaves["student_hidden"].detach()
    loss = kdfused.fused_linear_distill_loss(
        hidden, leaves["student_weight"], labels, **teacher, chunk_size=40
    )
    loss.backward()
    assert hidden.grad is None and leaves["student_weight"].grad is not None
    assert calls == [("distill_forward_inplace", None)] * 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_all_rows_ignored(device, reduction):
    student, teacher, labels = make_problem(device, student_bias=True, ignore="all")
    out, grads = run(
        kdfused.fused_linear_distill_loss, student, teacher, labels, reduction=reduction
    )
    for value in out:
        assert torch.all(value == 0)
    for grad in grads.values():
        assert torch.all(grad == 0)


def test_module_and_components():
    loss_fn = kdfused.FusedLinearDistillLoss(
        temperature=3.0, alpha=0.25, divergence="jsd", beta=0.3, chunk_size=32, student_softcap=30.0
    )
    text = repr(loss_fn)
    assert "divergence='jsd'" in text and "chunk_size=32" in text and "student_softcap=30.0" in text
    student, teacher, labels = make_problem(student_bias=True)
    out = loss_fn(
        student["student_hidden"],
        student["student_weight"],
        teacher["teacher_hidden"],
        teacher["teacher_weight"],
        labels,
        student["student_bias"],
        return_components=True,
    )
    torch.testing.assert_close(out.loss, 0.25 * out.hard_loss + 0.75 * out.soft_loss)
    _, _, logit_labels = make_problem(source="logits")
    t_logits = F.linear(teacher["teacher_hidden"], teacher["teacher_weight"])
    by_logits = loss_fn(
        student["student_hidden"],
        student["student_weight"],
        None,
        None,
        labels,
        student["student_bias"],
        teacher_logits=t_logits,
    )
    torch.testing.assert_close(by_logits, out.loss)


S, T, Y = make_problem()
SH, SW = S["student_hidden"], S["student_weight"]
TH, TW = T["teacher_hidden"], T["teacher_weight"]
TL = torch.zeros(*LEAD, VOCAB)

BAD_CALLS = [
    # (description, args, kwargs, exception, message pattern)
    ("hidden vs weight", (SH, SW[:, :5], Y), dict(teacher_logits=TL), ValueError,
     r"student_weight must have shape \[V, 16\] to match student_hidden of shape \(2, 37, 16\), "
     r"got \(101, 5\)"),
    ("weight 1-d", (SH, SW[0], Y), dict(teacher_logits=TL), ValueError,
     r"student_weight must have at least 2 dims"),
    ("teacher hidden vs weight", (SH, SW, Y), dict(teacher_hidden=TH, teacher_weight=TW[:, :3]),
     ValueError, r"teacher_weight must have shape \[V, 24\].*got \(101, 3\)"),
    ("leading dims", (SH, SW, Y), dict(teacher_hidden=TH[:, :5], teacher_weight=TW), ValueError,
     r"teacher_hidden must have the leading dims \(2, 37\) of student_hidden \(2, 37, 16\), "
     r"got \(2, 5, 24\)"),
    ("vocabularies", (SH, SW, Y), dict(teacher_hidden=TH, teacher_weight=TW[:100]), ValueError,
     r"vocabularies differ: student_weight \(101, 16\) and teacher_weight \(100, 24\), "
     r"V = 101 for the student and 100 for the teacher"),
    ("padded teacher", (SH, SW, Y), dict(teacher_hidden=TH, teacher_weight=torch.cat([TW, TW])),
     ValueError, r"V = 101 for the student and 202 for the teacher: pass teacher_vocab='truncate'"),
    ("teacher logits vocab", (SH, SW, Y), dict(teacher_logits=TL[..., :100]), ValueError,
     r"student_weight \(101, 16\) and teacher_logits \(2, 37, 100\)"),
    ("teacher logits shape", (SH, SW, Y), dict(teacher_logits=TL[:, :5]), ValueError,
     r"teacher_logits must have shape \(2, 37, 101\).*got \(2, 5, 101\)"),
    ("num_items reduction", (SH, SW, Y), dict(teacher_logits=TL, num_items_in_batch=5,
     reduction="none"), ValueError, r"num_items_in_batch replaces the batchmean divisor"),
    ("no teacher", (SH, SW, Y), dict(), ValueError, r"no teacher given"),
    ("two teachers", (SH, SW, Y), dict(teacher_hidden=TH, teacher_weight=TW, teacher_logits=TL),
     ValueError, r"one source.*got teacher_hidden \+ teacher_weight and teacher_logits"),
    ("half a teacher", (SH, SW, Y), dict(teacher_hidden=TH), ValueError,
     r"teacher_weight is missing"),
    ("teacher bias alone", (SH, SW, Y), dict(teacher_logits=TL, teacher_bias=torch.zeros(VOCAB)),
     ValueError, r"teacher_bias goes with teacher_hidden"),
    ("bias shape", (SH, SW, Y), dict(teacher_logits=TL, student_bias=torch.zeros(100)),
     ValueError, r"student_bias must have shape \(101,\).*got \(100,\)"),
    ("integer hidden", (SH.long(), SW, Y), dict(teacher_logits=TL), TypeError,
     r"student_hidden must be a floating-point tensor"),
    ("mixed dtypes", (SH.double(), SW, Y), dict(teacher_logits=TL), TypeError,
     r"must share a dtype.*student_hidden torch.float64, student_weight torch.float32"),
    ("labels shape", (SH, SW, Y[:, :3]), dict(teacher_logits=TL), ValueError,
     r"labels must have shape \(2, 37\) \(the hidden states' leading dims\)"),
    ("devices", (SH, SW, Y), dict(teacher_logits=TL.to("meta")), ValueError,
     r"one device: student_hidden is on cpu, teacher_logits on meta"),
    ("chunk size 0", (SH, SW, Y), dict(teacher_logits=TL, chunk_size=0), ValueError,
     r"chunk_size must be >= 1, got 0"),
    ("chunk size float", (SH, SW, Y), dict(teacher_logits=TL, chunk_size=2.5), TypeError,
     r"chunk_size must be an int or None"),
    ("softcap", (SH, SW, Y), dict(teacher_logits=TL, student_softcap=0.0), ValueError,
     r"student_softcap must be None or finite and > 0, got 0.0"),
    ("no labels, alpha", (SH, SW, None), dict(teacher_logits=TL), ValueError,
     r"alpha must be 0, got 0.5"),
    ("float64 kernel", (SH.double(), SW.double(), Y), dict(teacher_logits=TL, backend="cpu"),
     TypeError, r"student_hidden has dtype torch.float64.*backend='reference'"),
]  # fmt: skip


@pytest.mark.parametrize("api", ["functional", "reference"])
@pytest.mark.parametrize("desc,args,kwargs,exc,pattern", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input(api, desc, args, kwargs, exc, pattern):
    call = kdfused.fused_linear_distill_loss
    if api == "reference":
        if desc == "float64 kernel":
            pytest.skip("the reference takes float64")
        kwargs = {k: v for k, v in kwargs.items() if k != "backend"}
        call = kdfused.reference.fused_linear_distill_loss
    with pytest.raises(exc, match=pattern):
        call(*args, **kwargs)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match=r"chunk_size must be >= 1"):
        kdfused.FusedLinearDistillLoss(chunk_size=-1)
    with pytest.raises(ValueError, match=r"teacher_softcap"):
        kdfused.FusedLinearDistillLoss(teacher_softcap=math.inf)
    with pytest.raises(ValueError, match=r"divergence"):
        kdfused.FusedLinearDistillLoss(divergence="kl")


def test_empty_batch():
    """No rows: loss 0 and zero gradients, as the dense loss gives."""
    h = torch.zeros(0, HS, requires_grad=True)
    w = torch.randn(VOCAB, HS, requires_grad=True)
    loss = kdfused.fused_linear_distill_loss(
        h,
        w,
        torch.zeros(0, dtype=torch.int64),
        teacher_hidden=torch.zeros(0, HT),
        teacher_weight=torch.randn(VOCAB, HT),
    )
    loss.backward()
    assert loss.item() == 0 and h.grad.shape == (0, HS) and torch.all(w.grad == 0)


def test_autocast_forms_the_logits_in_its_dtype():
    """Under torch.autocast the loss is that of the inputs cast to the
    autocast dtype (as the model's own lm_head matmul would be), and the
    gradients reach the float32 leaves in float32."""
    student, teacher, labels = make_problem(student_bias=True, teacher_bias=True)
    leaves = {k: v.clone().requires_grad_() for k, v in student.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kdfused.fused_linear_distill_loss(
            leaves["student_hidden"],
            leaves["student_weight"],
            labels,
            student_bias=leaves["student_bias"],
            **teacher,
        )
    got.backward()
    cast = {k: v.clone().bfloat16().requires_grad_() for k, v in student.items()}
    want = kdfused.fused_linear_distill_loss(
        cast["student_hidden"],
        cast["student_weight"],
        labels,
        student_bias=cast["student_bias"],
        **{k: v.bfloat16() for k, v in teacher.items()},
    )
    want.backward()
    assert torch.equal(got, want)
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == torch.float32
        torch.testing.assert_close(leaf.grad, cast[name].grad.float(), msg=name)
