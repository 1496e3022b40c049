"""Edge rows, views and the autograd contract."""

import math

import pytest
import torch
from oracle import DEVICES, check_against_oracle, make_labels, make_logits

import kdfused

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_vocab_entries(device, divergence):
    """-inf in both models (a padded vocab) adds nothing and never makes NaN."""
    s = make_logits((6, 100), device=device, seed=20)
    t = make_logits((6, 100), device=device, seed=21)
    mask = torch.zeros(6, 100, dtype=torch.bool, device=device)
    mask[:, 90:] = True
    mask[2, ::3] = True
    s[mask] = -math.inf
    t[mask] = -math.inf
    y = torch.tensor([1, 4, 5, -100, 7, 8], device=device)
    out, grad = check_against_oracle(s, t, y, divergence=divergence, alpha=0.3)
    assert torch.isfinite(out.loss)
    assert torch.all(grad[mask] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "divergence,masked,where",
    [
        ("forward_kl", "student", "anywhere"),  # teacher mass where the student has -inf
        ("reverse_kl", "teacher", "anywhere"),  # student mass where the teacher has -inf
        ("reverse_kl", "teacher", "student_peak"),
        ("forward_kl", "student", "teacher_peak"),
    ],
)
def test_true_infinity(device, divergence, masked, where):
    """Mass on an entry the other model rules out: the divergence is inf, as the math says."""
    s = make_logits((2, 10), device=device, seed=22)
    t = make_logits((2, 10), device=device, seed=23)
    col = {"anywhere": 3, "student_peak": int(s[0].argmax()), "teacher_peak": int(t[0].argmax())}
    (s if masked == "student" else t)[0, col[where]] = -math.inf
    opts = dict(alpha=0.0, reduction="none", divergence=divergence)
    out = kdfused.fused_distill_loss(s, t, None, **opts)
    ref = kdfused.reference.distill_loss(s.double().cpu(), t.double().cpu(), **opts)
    assert out[0].item() == math.inf and ref[0].item() == math.inf
    torch.testing.assert_close(out[1].cpu(), ref[1].float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", [0.2, 0.5])
def test_jsd_mixture_below_flt_min(device, beta):
    """A teacher probability just above FLT_MIN where the student has none: the
    mixture m = beta p_t is subnormal, which a GPU flushes to 0. Taken as
    log m = -inf it would make that element's share of KL(p_t || m), about
    1e-38, infinite."""
    flt_min = torch.finfo(torch.float32).tiny
    s = make_logits((3, 64), device=device, seed=40)
    t = make_logits((3, 64), device=device, seed=41)
    t[0] = -1e4
    t[0, 0] = 0.0
    t[0, 5] = math.log(1.5 * flt_min)  # T = 1: p_t[5] = 1.5 FLT_MIN (z_t = 1)
    s[0, 5] = -math.inf  # p_s[5] = 0
    y = make_labels((3,), 64, "none", device=device)
    out, grad = check_against_oracle(
        s, t, y, divergence="jsd", beta=beta, temperature=1.0, reduction="none"
    )
    assert torch.isfinite(out.loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("offset", [1e4, -1e4, 0.0])
def test_large_logits(device, divergence, offset):
    """Logits of magnitude 1e4: a shared offset, or a 1e4 spread (near one-hot)."""
    scale = 3.0 if offset else 1e4
    s = make_logits((4, 333), device=device, seed=24, scale=scale) + offset
    t = make_logits((4, 333), device=device, seed=25, scale=scale) + offset
    y = make_labels((4,), 333, "none", device=device)
    out, grad = check_against_oracle(s, t, y, divergence=divergence, temperature=2.0)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_empty_batch(device, reduction):
    s = torch.zeros(0, 50, device=device, requires_grad=True)
    t = torch.zeros(0, 50, device=device)
    y = torch.zeros(0, dtype=torch.int64, device=device)
    out = kdfused.fused_distill_loss(s, t, y, reduction=reduction, return_components=True)
    expected_shape = (0,) if reduction == "none" else ()
    for value in out:
        assert value.shape == expected_shape and torch.all(value == 0)
    out.loss.sum().backward()
    assert s.grad.shape == (0, 50)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_all_rows_ignored(device, divergence, reduction):
    s = make_logits((3, 5, 64), device=device, seed=26).requires_grad_()
    t = make_logits((3, 5, 64), device=device, seed=27)
    y = torch.full((3, 5), -1, device=device)
    out = kdfused.fused_distill_loss(
        s, t, y, ignore_index=-1, divergence=divergence, reduction=reduction, return_components=True
    )
    for value in out:
        assert torch.all(value == 0), value
    out.loss.sum().backward()
    assert torch.all(s.grad == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_nan_propagates(device, divergence, which):
    s = make_logits((4, 40), device=device, seed=28)
    t = make_logits((4, 40), device=device, seed=29)
    (s if which == "student" else t)[1, 7] = math.nan
    y = make_labels((4,), 40, "none", device=device)
    rows = kdfused.fused_distill_loss(s, t, y, divergence=divergence, reduction="none")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3]]).all()
    assert torch.isnan(kdfused.fused_distill_loss(s, t, y, divergence=divergence))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "view",
    ["row_slice", "strided_vocab", "storage_offset", "transposed_lead", "expanded_teacher"],
)
def test_views(device, view):
    """Non-contiguous and offset views give the same result as contiguous input."""
    vocab = 301
    base_s = make_logits((4, 6, 2 * vocab + 3), device=device, seed=30)
    base_t = make_logits((4, 6, 2 * vocab + 3), device=device, seed=31)
    if view == "row_slice":  # rows strided, elements contiguous: no copy needed
        s, t = base_s[..., :vocab], base_t[..., 1 : vocab + 1]
    elif view == "strided_vocab":
        s, t = base_s[..., : 2 * vocab : 2], base_t[..., 1 : 2 * vocab : 2]
    elif view == "storage_offset":
        s = base_s.view(-1)[5 : 5 + 24 * vocab].view(4, 6, vocab)
        t = base_t.view(-1)[7 : 7 + 24 * vocab].view(4, 6, vocab)
    elif view == "transposed_lead":
        s, t = base_s[..., :vocab].transpose(0, 1), base_t[..., :vocab].transpose(0, 1)
    else:
        s = base_s[..., :vocab]
        t = base_t[:1, :, :vocab].expand(4, 6, vocab)
    y = make_labels(s.shape[:-1], vocab, "some", device=device)
    assert not s.is_contiguous() or s.storage_offset() != 0
    out, grad = check_against_oracle(s, t, y, torch.tensor(0.9), divergence="reverse_kl")
    out_c, grad_c = check_against_oracle(
        s.contiguous(), t.contiguous(), y, torch.tensor(0.9), divergence="reverse_kl"
    )
    if device == "cpu":  # the CPU kernel sums a row in the same order whatever its layout
        assert torch.equal(out.loss, out_c.loss) and torch.equal(grad, grad_c)
    # On CUDA a row's alignment decides which of its elements go in 16-byte packs
    # and so the order of its float32 sums (the H200 run at 3209248 saw the
    # gradients differ in the last bits): both are held to the float64 oracle above.


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_reference_gradcheck(divergence, reduction):
    """The oracle's own gradient is right (float64 finite differences)."""
    s = make_logits((3, 2, 5), torch.float64, seed=32).requires_grad_()
    t = make_logits((3, 2, 5), torch.float64, seed=33)
    y = torch.tensor([[1, -100], [0, 4], [3, 2]])

    def f(x):
        return kdfused.reference.distill_loss(
            x, t, y, divergence=divergence, reduction=reduction, temperature=1.5, alpha=0.4
        )

    assert torch.autograd.gradcheck(f, (s,))


def test_teacher_gets_no_gradient():
    s = make_logits((3, 20), seed=34).requires_grad_()
    t = make_logits((3, 20), seed=35).requires_grad_()
    kdfused.fused_distill_loss(s, t, make_labels((3,), 20)).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_allocates_no_gradient(device, monkeypatch):
    """Without a gradient to compute the op is asked for none (no N x V buffer)."""
    from kdfused import ops

    seen = []
    real = ops.distill_forward

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append((kwargs["compute_grad"], result[2].numel()))
        return result

    monkeypatch.setattr(ops, "distill_forward", spy)
    s = make_logits((4, 50), device=device, seed=36)
    t = make_logits((4, 50), device=device, seed=37)
    y = make_labels((4,), 50, device=device)
    with torch.no_grad():
        kdfused.fused_distill_loss(s.requires_grad_(), t, y)
    kdfused.fused_distill_loss(s.detach(), t, y)
    kdfused.fused_distill_loss(s.detach().requires_grad_(), t, y)
    assert seen == [(False, 0), (False, 0), (True, 200)]


@pytest.mark.parametrize("device", DEVICES)
def test_unit_upstream_returns_saved_gradient(device):
    """backward with grad_output = 1 hands back the kernel's gradient unchanged,
    and with another value scales it."""
    s = make_logits((5, 70), device=device, seed=38).requires_grad_()
    t = make_logits((5, 70), device=device, seed=39)
    y = make_labels((5,), 70, device=device)
    kdfused.fused_distill_loss(s, t, y).backward()
    g1 = s.grad.clone()
    s.grad = None
    (kdfused.fused_distill_loss(s, t, y) * 3.0).backward()
    torch.testing.assert_close(s.grad, 3.0 * g1)


@pytest.mark.parametrize("device", DEVICES)
def test_retained_graph_accumulates(device):
    """backward twice through a retained graph adds the gradient twice, though
    the first call hands autograd the kernel's own buffer."""
    s = make_logits((3, 40), device=device, seed=42).requires_grad_()
    t = make_logits((3, 40), device=device, seed=43)
    loss = kdfused.fused_distill_loss(s, t, make_labels((3,), 40, device=device))
    loss.backward(retain_graph=True)
    once = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * once)


def test_module_and_components():
    loss_fn = kdfused.FusedDistillLoss(temperature=4.0, alpha=0.25, divergence="jsd", beta=0.3)
    assert "divergence='jsd'" in repr(loss_fn) and "beta=0.3" in repr(loss_fn)
    s = make_logits((2, 3, 11), seed=40)
    t = make_logits((2, 3, 11), seed=41)
    y = make_labels((2, 3), 11)
    out = loss_fn(s, t, y, return_components=True)
    assert out._fields == ("loss", "hard_loss", "soft_loss")
    torch.testing.assert_close(out.loss, 0.25 * out.hard_loss + 0.75 * out.soft_loss)
    assert torch.equal(loss_fn(s, t, y), out.loss)
    assert not out.hard_loss.requires_grad and not out.soft_loss.requires_grad
    assert set(kdfused.__all__) == {
        "FusedDistillLoss",
        "FusedLinearDistillLoss",
        "SparseTeacher",
        "__version__",
        "build_info",
        "fused_distill_loss",
        "fused_linear_distill_loss",
        "reference",
        "sparse",
    }


def test_meta_tensors_give_shapes_without_a_rebuild_warning():
    """Meta tensors (shape inference, e.g. a model built on the meta device)
    take the reference, which gives the loss's shape and dtype; no warning
    tells the user to rebuild what cannot have a meta kernel."""
    import warnings

    s = torch.randn(3, 7, 10, device="meta", requires_grad=True)
    t = torch.randn(3, 7, 10, device="meta")
    y = torch.zeros(3, 7, dtype=torch.long, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = kdfused.fused_distill_loss(s, t, y, reduction="none")
    assert loss.device.type == "meta" and loss.shape == (3, 7) and loss.dtype == torch.float32
