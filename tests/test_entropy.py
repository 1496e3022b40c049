"""The student entropy (``student_entropy=True``): H(softmax(s / T)) of each
row, summed by the dense kernels in the statistics pass they already make,
against the float64 reference by the 2x rule: the dense loss and the
fused-linear loss in every gradient mode (none, a new tensor, a reused
buffer, over the logits), every divergence, float32 and the 16-bit dtypes,
label smoothing, masked and huge logits; and the ops' results unchanged
where nobody asks for it."""

import pytest
import torch
from oracle import DEVICES, assert_2x_of_torch, make_labels, make_logits, run_loss, run_reference
from test_fused_linear import make_problem
from test_fused_linear import run as run_linear

import kdfused
from kdfused import fused_linear, ops

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="needs kdfused's CPU kernel")

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


def entropy_size(student, temperature, labels=None, reduction="batchmean"):
    """The size of the float32 intermediates an entropy is formed from: the
    largest finite |log p_s| (x the counted rows for "sum")."""
    lp = torch.log_softmax(student.detach().cpu().double() / temperature, -1)
    finite = lp[torch.isfinite(lp)]
    biggest = finite.abs().max().item() if finite.numel() else 0.0
    rows = 1
    if reduction == "sum":
        rows = student[..., 0].numel() if labels is None else int((labels != -100).sum())
    return biggest * max(rows, 1)


def check_entropy(student, teacher, labels, *, grad=True, **options):
    """The kernel's entropy against the float64 reference, PyTorch in the
    inputs' dtype as the yardstick; the loss is the one without the entropy."""
    options = dict(options, student_entropy=True)
    if grad:
        out, _ = run_loss(student, teacher, labels, **options)
    else:
        with torch.no_grad():
            out = kdfused.fused_distill_loss(
                student, teacher, labels, return_components=True, **options
            )
    pt, _ = run_reference(student, teacher, labels, **options)
    ref, _ = run_reference(student, teacher, labels, dtype=torch.float64, **options)
    got = out.student_entropy
    assert got.dtype == torch.float32 and got.device == student.device
    size = entropy_size(
        student, options.get("temperature", 2.0), labels, options.get("reduction", "batchmean")
    )
    assert_2x_of_torch("student_entropy", got, pt.student_entropy, ref.student_entropy, size)
    plain = dict(options, student_entropy=False)
    if grad:
        base, _ = run_loss(student, teacher, labels, **plain)
    else:
        with torch.no_grad():
            base = kdfused.fused_distill_loss(
                student, teacher, labels, return_components=True, **plain
            )
    assert base.student_entropy is None
    # Asking changes nothing else (up to the compiler's rounding of another loop).
    torch.testing.assert_close(out.loss, base.loss, rtol=1e-6, atol=1e-6)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_dense(device, dtype, divergence, grad):
    """Rows of three chunks (V = 2500) in the CPU kernel, ignored rows."""
    s = make_logits((7, 2500), dtype, device, seed=200)
    t = make_logits((7, 2500), torch.float32, device, seed=201)
    y = make_labels((7,), 2500, "some", device=device)
    check_entropy(s, t, y, grad=grad, divergence=divergence, reduction="none")
    check_entropy(s, t, y, grad=grad, divergence=divergence)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=1.0, alpha=0.3),
        dict(temperature=2.0, label_smoothing=0.1, alpha=0.5),
        dict(temperature=0.5, scale_by_t2=False, reduction="sum"),
        dict(temperature=8.0, beta=0.1, divergence="jsd", num_items_in_batch=11),
        dict(temperature=3.0, label_smoothing=0.2, divergence="reverse_kl"),
    ],
)
def test_dense_options(device, options):
    s = make_logits((6, 700), torch.bfloat16, device, seed=202)
    t = make_logits((6, 700), torch.bfloat16, device, seed=203)
    y = make_labels((6,), 700, "some", device=device)
    check_entropy(s, t, y, **options)


@pytest.mark.parametrize("device", DEVICES)
def test_no_labels(device):
    """labels=None: every row counts."""
    s = make_logits((5, 333), device=device, seed=204)
    t = make_logits((5, 333), device=device, seed=205)
    out = check_entropy(s, t, None, alpha=0.0, reduction="none")
    assert torch.all(out.student_entropy > 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_and_huge_logits(device, divergence):
    """-inf logits add nothing (0 log 0 = 0), a row whose maximum rises in
    every chunk (the sum's rescaling), logits of magnitude 1e4 (near one-hot,
    and a shared offset), a NaN logit making its own row NaN."""
    s = make_logits((5, 2100), device=device, seed=206)
    t = make_logits((5, 2100), device=device, seed=207)
    s[:, ::3] = t[:, ::3] = -torch.inf
    s[1] = torch.linspace(-30, 30, 2100, device=device)  # a new maximum all along
    s[2] = s[2] * 3e3
    s[3] = s[3] + 1e4
    y = torch.tensor([1, 2, 4, 5, -100], device=device)
    check_entropy(s, t, y, divergence=divergence, reduction="none")
    s[0, 17] = torch.nan
    out = kdfused.fused_distill_loss(
        s, t, y, divergence=divergence, reduction="none", student_entropy=True
    )
    ent = out.student_entropy
    assert torch.isnan(ent[0]) and torch.isfinite(ent[1:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_one_hot_and_uniform(device):
    """The two ends: a row of one finite logit has H = 0, a constant row log V."""
    s = torch.full((2, 1000), -torch.inf, device=device)
    s[0, 3] = 1.0
    s[1] = 0.5
    t = make_logits((2, 1000), device=device, seed=208)
    out = kdfused.fused_distill_loss(s, t, None, alpha=0.0, reduction="none", student_entropy=True)
    torch.testing.assert_close(
        out.student_entropy.cpu(), torch.tensor([0.0, torch.log(torch.tensor(1000.0)).item()])
    )


def _opts(**overrides):
    base = dict(
        temperature=2.0,
        alpha=0.4,
        divergence="jsd",
        beta=0.3,
        ignore_index=-100,
        scale_by_t2=True,
        label_smoothing=0.1,
    )
    return dict(base, **overrides)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_forms_agree(device, dtype):
    """The three ops' entropy rows are the same bits (the in-place form's
    formed before the logits are overwritten), 0 at ignored rows; without
    the keyword each op returns what it always did."""
    s = make_logits((6, 1500), dtype, device, seed=209)
    t = make_logits((6, 1500), torch.float32, device, seed=210)
    y = make_labels((6,), 1500, "some", device=device)
    hard, soft, grad, ent = ops.distill_forward(
        s, t, y, None, **_opts(), compute_grad=True, student_entropy=True
    )
    assert ent.shape == (6,) and ent.dtype == torch.float32
    assert torch.all(ent[y == -100] == 0) and torch.all(ent[y != -100] > 0)
    plain = ops.distill_forward(s, t, y, None, **_opts(), compute_grad=True)
    assert len(plain) == 3
    for a, b in zip(plain, (hard, soft, grad), strict=True):
        assert torch.equal(a, b)
    no_grad = ops.distill_forward(
        s, t, y, None, **_opts(), compute_grad=False, student_entropy=True
    )
    assert no_grad[2].numel() == 0 and torch.equal(no_grad[3], ent)
    buffer = torch.empty_like(s)
    out = ops.distill_forward_out(s, t, y, None, buffer, **_opts(), student_entropy=True)
    assert len(out) == 3 and torch.equal(out[2], ent) and torch.equal(buffer, grad)
    assert len(ops.distill_forward_out(s, t, y, None, buffer, **_opts())) == 2
    if device in ops.INPLACE_DEVICES:
        logits = s.clone()
        out = ops.distill_forward_inplace(logits, t, y, None, **_opts(), student_entropy=True)
        assert len(out) == 3 and torch.equal(out[2], ent) and torch.equal(logits, grad)
        assert len(ops.distill_forward_inplace(s.clone(), t, y, None, **_opts())) == 2


def test_ops_entropy_same_for_every_divergence():
    """The entropy is the student's alone: the same rows whatever the teacher
    term (the sum shares only the student's anchor)."""
    s = make_logits((4, 3000), seed=211)
    t = make_logits((4, 3000), seed=212)
    y = make_labels((4,), 3000, "none")
    rows = [
        ops.distill_forward(
            s, t, y, None, **_opts(divergence=d), compute_grad=False, student_entropy=True
        )[3]
        for d in DIVERGENCES
    ]
    for r in rows[1:]:
        torch.testing.assert_close(r, rows[0], rtol=1e-6, atol=0)


# ---- the fused-linear loss ----------------------------------------------------


def check_linear_entropy(student, teacher, labels, *, grad=True, **options):
    """The fused-linear loss's entropy (chunk by chunk) against the float64
    reference, which materialises the logits; PyTorch in the inputs' dtype as
    the yardstick."""
    options = dict(options, student_entropy=True)
    ref_fn = kdfused.reference.fused_linear_distill_loss
    if grad:
        out, _ = run_linear(kdfused.fused_linear_distill_loss, student, teacher, labels, **options)
    else:
        with torch.no_grad():
            out = kdfused.fused_linear_distill_loss(
                student["student_hidden"],
                student["student_weight"],
                labels,
                student_bias=student["student_bias"],
                return_components=True,
                **teacher,
                **options,
            )
    ref_options = {k: v for k, v in options.items() if k != "chunk_size"}
    pt, _ = run_linear(ref_fn, student, teacher, labels, **ref_options)
    ref, _ = run_linear(ref_fn, student, teacher, labels, dtype=torch.float64, **ref_options)
    with torch.no_grad():
        s64 = torch.nn.functional.linear(
            student["student_hidden"].double().cpu(), student["student_weight"].double().cpu()
        )
    size = entropy_size(
        s64, options.get("temperature", 2.0), labels, options.get("reduction", "batchmean")
    )
    got = out.student_entropy
    assert got.dtype == torch.float32
    assert_2x_of_torch("student_entropy", got, pt.student_entropy, ref.student_entropy, size)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mode", ["natural", "none", "new", "out", "inplace"])
def test_fused_linear(monkeypatch, device, dtype, divergence, mode):
    """Chunks of 16 rows (74 rows: a ragged last chunk), each gradient mode
    of the chunk loop (natural: the one it picks; none: no gradient)."""
    if mode == "inplace" and device not in ops.INPLACE_DEVICES:
        pytest.skip("no in-place kernel on this device")
    if mode not in ("natural", "none"):
        monkeypatch.setattr(fused_linear, "gradient_mode", lambda student, teacher: mode)
    student, teacher, labels = make_problem(device, dtype, student_bias=True, seed=13)
    check_linear_entropy(
        student,
        teacher,
        labels,
        grad=mode != "none",
        divergence=divergence,
        chunk_size=16,
        reduction="none",
    )
    check_linear_entropy(
        student, teacher, labels, grad=mode != "none", divergence=divergence, chunk_size=16
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source", ["hidden", "logits"])
def test_fused_linear_options(device, source):
    """A softcap and a logit scale (the entropy of the logits the model
    forms), label smoothing, T = 1, a teacher given as logits."""
    student, teacher, labels = make_problem(device, source=source, seed=14)
    check_linear_entropy(
        student,
        teacher,
        labels,
        chunk_size=16,
        student_softcap=5.0,
        student_logit_scale=1.5,
        temperature=1.0,
        label_smoothing=0.1,
        alpha=0.3,
    )
