"""docs/usage.md on every entry point: num_items_in_batch (the Hugging
Face Trainer's divisor), teacher_vocab="truncate" (padded teacher
vocabularies, read in place) and the clear refusal of double backward."""

import pytest
import torch
from oracle import DEVICES, check_against_oracle, make_labels, make_logits, run_loss
from test_fused_linear import check_linear_against_oracle, make_problem, run

import kdfused
from kdfused import ops

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_against_reference(device, divergence, as_tensor):
    s = make_logits((3, 7, 211), device=device, seed=130)
    t = make_logits((3, 7, 211), device=device, seed=131)
    y = make_labels((3, 7), 211, "some", device=device)
    num_items = torch.tensor(40, device=device) if as_tensor else 40
    out, _ = check_against_oracle(s, t, y, divergence=divergence, num_items_in_batch=num_items)
    rows = kdfused.fused_distill_loss(s, t, y, divergence=divergence, reduction="none")
    torch.testing.assert_close(out.loss, rows.sum() / 40)
    student, teacher, labels = make_problem(device, student_bias=True)
    check_linear_against_oracle(
        student, teacher, labels, divergence=divergence, chunk_size=16, num_items_in_batch=num_items
    )


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_accumulation_dense(device):
    """Micro-batches of different token counts, each divided by the count of
    the whole accumulated batch, give the big batch's loss, and each its rows'
    gradient; divided by their own counts they would not."""
    s = make_logits((12, 301), device=device, seed=132)
    t = make_logits((12, 301), device=device, seed=133)
    y = make_labels((12,), 301, "some", device=device)
    whole, whole_grad = run_loss(s, t, y)
    total = torch.tensor(int((y != -100).sum()), device=device)
    accumulated = 0.0
    for rows in (slice(0, 2), slice(2, 9), slice(9, 12)):
        out, grad = run_loss(s[rows], t[rows], y[rows], num_items_in_batch=total)
        accumulated = accumulated + out.loss
        torch.testing.assert_close(grad, whole_grad[rows])
        own, own_grad = run_loss(s[rows], t[rows], y[rows])
        assert not torch.allclose(own_grad, whole_grad[rows])
    torch.testing.assert_close(accumulated, whole.loss)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_accumulation_fused_linear(device):
    """The same for the fused-linear loss: the weight gradients of the
    micro-batches add up to the big batch's."""
    student, teacher, y = make_problem(device, lead=(12,), seed=134)
    whole, whole_grads = run(kdfused.fused_linear_distill_loss, student, teacher, y, chunk_size=4)
    total = int((y != -100).sum())
    accumulated, weight_grad = 0.0, 0.0
    for rows in (slice(0, 2), slice(2, 9), slice(9, 12)):
        part = dict(student, student_hidden=student["student_hidden"][rows])
        part_teacher = dict(teacher, teacher_hidden=teacher["teacher_hidden"][rows])
        out, grads = run(
            kdfused.fused_linear_distill_loss,
            part,
            part_teacher,
            y[rows],
            chunk_size=4,
            num_items_in_batch=total,
        )
        accumulated = accumulated + out.loss
        weight_grad = weight_grad + grads["student_weight"]
        torch.testing.assert_close(grads["student_hidden"], whole_grads["student_hidden"][rows])
    torch.testing.assert_close(accumulated, whole.loss)
    torch.testing.assert_close(weight_grad, whole_grads["student_weight"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_truncated_teacher_against_reference(device, divergence):
    wide = make_logits((4, 5, 262), device=device, seed=137)  # 256 + 6 padded columns
    wide[..., 256:] = 40.0  # what a padded column could hold: it must not count
    s = make_logits((4, 5, 256), device=device, seed=138)
    y = make_labels((4, 5), 256, "some", device=device)
    out, grad = check_against_oracle(s, wide, y, divergence=divergence, teacher_vocab="truncate")
    out_c, grad_c = run_loss(s, wide[..., :256].contiguous(), y, divergence=divergence)
    assert torch.equal(out.loss, out_c.loss) and torch.equal(grad, grad_c)


@pytest.mark.parametrize("device", DEVICES)
def test_truncation_reads_the_teacher_in_place(device, monkeypatch):
    """The kernel gets the padded teacher's own memory, rows V + 6 apart."""
    seen = []
    real = ops.distill_forward

    def spy(s, t, *args, **kwargs):
        seen.append((t.data_ptr(), t.stride(), t.shape))
        return real(s, t, *args, **kwargs)

    monkeypatch.setattr(ops, "distill_forward", spy)
    wide = make_logits((2, 3, 106), device=device, seed=139)
    s = make_logits((2, 3, 100), device=device, seed=140)
    kdfused.fused_distill_loss(
        s, wide, make_labels((2, 3), 100, device=device), teacher_vocab="truncate"
    )
    assert seen == [(wide.data_ptr(), (106, 1), (6, 100))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source", ["hidden", "logits"])
def test_truncated_teacher_fused_linear(device, source):
    """The fused-linear loss with a padded teacher: its weight's and bias's
    first V rows (or its logits' first V columns), equal to the sliced copy."""
    student, teacher, labels = make_problem(device, source=source, teacher_bias=source == "hidden")
    pad = {
        "teacher_weight": lambda w: torch.cat([w, w[:9]]),
        "teacher_bias": lambda b: torch.cat([b, b[:9] + 50]),
        "teacher_logits": lambda x: torch.cat([x, x[..., :9] + 50], -1),
        "teacher_hidden": lambda h: h,
    }
    wide = {k: None if v is None else pad[k](v) for k, v in teacher.items()}
    out, grads = check_linear_against_oracle(
        student, wide, labels, chunk_size=16, teacher_vocab="truncate", divergence="jsd"
    )
    out_c, grads_c = run(
        kdfused.fused_linear_distill_loss, student, teacher, labels, chunk_size=16, divergence="jsd"
    )
    assert torch.equal(out.loss, out_c.loss)
    for name in grads:
        assert (grads[name] is None) == (grads_c[name] is None)
        assert grads[name] is None or torch.equal(grads[name], grads_c[name])


@pytest.mark.parametrize("entry", ["dense", "fused_linear"])
def test_double_backward_is_refused_clearly(entry):
    """backward with create_graph=True (a gradient penalty's first step) is
    refused by name: the gradient formed in forward is a constant, and a graph
    of it would silently miss the second-order terms."""
    if entry == "dense":
        x = make_logits((3, 50), seed=141).requires_grad_()
        loss = kdfused.fused_distill_loss(x, make_logits((3, 50), seed=142), make_labels((3,), 50))
    else:
        student, teacher, labels = make_problem()
        x = student["student_hidden"].requires_grad_()
        loss = kdfused.fused_linear_distill_loss(x, student["student_weight"], labels, **teacher)
    with pytest.raises(RuntimeError, match=r"cannot be differentiated twice.*create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)
    (grad,) = torch.autograd.grad(loss, x)  # the first derivative, as usual
    assert grad.shape == x.shape


def test_modules_take_the_options():
    s = make_logits((2, 4, 30), seed=143)
    wide = make_logits((2, 4, 32), seed=144)
    y = make_labels((2, 4), 30)
    loss_fn = kdfused.FusedDistillLoss(teacher_vocab="truncate")
    assert "teacher_vocab='truncate'" in repr(loss_fn)
    got = loss_fn(s, wide, y, num_items_in_batch=11)
    want = kdfused.reference.distill_loss(s, wide[..., :30], y, num_items_in_batch=11)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="teacher_vocab must be one of"):
        kdfused.FusedLinearDistillLoss(teacher_vocab="pad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])  # q from p_s, from p_s^2, from its exp
@pytest.mark.parametrize("epsilon", [0.1, 1.0])
def test_label_smoothing_against_reference(device, divergence, temperature, epsilon):
    s = make_logits((3, 5, 1203), device=device, seed=145)  # three chunks, a ragged one
    t = make_logits((3, 5, 1203), device=device, seed=146)
    y = make_labels((3, 5), 1203, "some", device=device)
    check_against_oracle(
        s,
        t,
        y,
        torch.tensor(0.7),
        divergence=divergence,
        temperature=temperature,
        alpha=0.3,
        label_smoothing=epsilon,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_label_smoothing_is_cross_entropys(device, dtype):
    """alpha = 1: the loss is F.cross_entropy(s, y, label_smoothing=eps), its
    mean over the rows that count, and so is the gradient."""
    s = make_logits((40, 333), dtype, device, seed=147).requires_grad_()
    t = make_logits((40, 333), dtype, device, seed=148)
    y = make_labels((40,), 333, "some", device=device)
    loss = kdfused.fused_distill_loss(s, t, y, alpha=1.0, label_smoothing=0.2)
    (grad,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_()
    want = torch.nn.functional.cross_entropy(s64, y, label_smoothing=0.2)
    (want_grad,) = torch.autograd.grad(want, s64)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, **_grad_tolerance(dtype))


def _grad_tolerance(dtype):
    return dict(rtol=0, atol=1e-8) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_label_smoothing_masked_vocab_and_fused_linear(device):
    """A masked (-inf) logit makes the smoothed cross-entropy inf, as
    F.cross_entropy's, with the gradient still finite; and the fused-linear
    loss takes the option too."""
    s = make_logits((4, 100), device=device, seed=149)
    t = make_logits((4, 100), device=device, seed=150)
    s[1, 7] = t[1, 7] = float("-inf")
    y = torch.tensor([3, 4, -100, 9], device=device)
    out, grad = check_against_oracle(s, t, y, label_smoothing=0.1, reduction="none")
    assert torch.isinf(out.hard_loss[1]) and torch.isfinite(out.hard_loss[[0, 3]]).all()
    assert torch.isfinite(grad).all()
    student, teacher, labels = make_problem(device, student_bias=True, seed=9)
    check_linear_against_oracle(student, teacher, labels, chunk_size=16, label_smoothing=0.1)


def test_label_smoothing_option_checked():
    s, t, y = make_logits((2, 9)), make_logits((2, 9), seed=1), make_labels((2,), 9)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\], got 1.5"):
        kdfused.fused_distill_loss(s, t, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\]"):
        torch.ops.kdfused.distill_forward.default(
            s, t, y, None, 2.0, 0.5, "jsd", 0.5, -100, True, True, label_smoothing=-0.1
        )
    assert "label_smoothing=0.1" in repr(kdfused.FusedLinearDistillLoss(label_smoothing=0.1))
