"""Shared test helpers: input factories and the float64-oracle comparison."""

from __future__ import annotations

import pytest
import torch

import kdfused
from kdfused import ops

# Every device the suite runs on: the CPU kernel always, the CUDA kernel when
# a GPU and the CUDA kernel are both present (else those cases are skipped,
# with the reason printed by pytest -ra; test_ops fails on a machine with a
# GPU whose build lacks the CUDA kernel).
CUDA_READY = torch.cuda.is_available() and ops.has_kernel("cuda")
if CUDA_READY:
    WHY_NO_CUDA = ""
elif not torch.cuda.is_available():
    WHY_NO_CUDA = f"no CUDA GPU visible to torch {torch.__version__}"
else:
    WHY_NO_CUDA = "kdfused was built without its CUDA kernel"
requires_cuda = pytest.mark.skipif(not CUDA_READY, reason=WHY_NO_CUDA)
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

# Both the kernels and PyTorch's float32 path round their intermediates to
# float32: a few ulps of the largest one is the floor below which "2x of
# PyTorch's error" compares rounding noise, not accuracy.
FLOAT32_FLOOR = 8 * torch.finfo(torch.float32).eps


def make_logits(shape, dtype=torch.float32, device="cpu", *, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)


def make_labels(lead, vocab, pattern="some", device="cpu", *, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, vocab, lead, generator=g, dtype=torch.int64)
    if pattern == "some" and y.numel() > 1:
        y.view(-1)[:: max(2, y.numel() // 3)] = ignore_index
    elif pattern == "all":
        y.fill_(ignore_index)
    return y.to(device)


def run_loss(student, teacher, labels, upstream=None, **options):
    """Forward + backward of fused_distill_loss; returns (components, grad)."""
    s = student.detach().clone().requires_grad_()
    out = kdfused.fused_distill_loss(s, teacher, labels, return_components=True, **options)
    up = torch.ones_like(out.loss) if upstream is None else upstream.to(out.loss)
    (out.loss * up).sum().backward()
    return out, s.grad


def run_reference(student, teacher, labels, upstream=None, dtype=None, **options):
    """The reference in `dtype` (default: the inputs' own dtypes), on the CPU."""
    s = student.detach().cpu()
    t = teacher.detach().cpu()
    if dtype is not None:
        s, t = s.to(dtype), t.to(dtype)
    s.requires_grad_()
    y = None if labels is None else labels.cpu()
    out = kdfused.reference.distill_loss(s, t, y, return_components=True, **options)
    up = torch.ones_like(out.loss) if upstream is None else upstream.cpu().to(out.loss)
    (out.loss * up).sum().backward()
    return out, s.grad


def assert_2x_of_torch(name, got, torch_same, ref, intermediate=0.0):
    """flash-attention's rule: |got - ref| <= 2 |torch_same - ref| (+ a float32 floor).

    ref is the float64 oracle, torch_same the same loss computed by PyTorch in
    the inputs' dtype. Non-finite entries of ref must be matched exactly. The
    floor is a few float32 ulps of max(1, |ref|, intermediate): a loss near 0
    is still the difference of float32 log-probabilities of size `intermediate`.
    A 16-bit result adds one unit in its last place at its largest value to the
    floor: its own resolution, the rounding that every 16-bit output pays and
    that PyTorch's can escape by luck on a handful of elements (a gradient
    saved in forward in bfloat16 and scaled by the upstream gradient in backward
    is rounded twice: one more half unit).
    """
    half = got.dtype in (torch.float16, torch.bfloat16)
    unit = torch.finfo(got.dtype).eps if half else 0.0
    got, torch_same, ref = (x.detach().cpu().double() for x in (got, torch_same, ref))
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(got), kind(ref)), f"{name}: {kind.__name__} pattern differs"
    finite = torch.isfinite(ref)
    if not finite.any():
        return
    err = (got - ref)[finite].abs().max().item()
    err_pt = torch.nan_to_num((torch_same - ref)[finite].abs(), nan=float("inf")).max().item()
    floor = FLOAT32_FLOOR * (1.0 + max(ref[finite].abs().max().item(), intermediate))
    floor += unit * ref[finite].abs().max().item()
    assert err <= 2 * err_pt + floor, (
        f"{name}: kernel error {err:.3e} > 2 x PyTorch's {err_pt:.3e} + floor {floor:.1e}"
    )


def _log_prob_size(student, teacher, labels, **options):
    """Size of the float32 intermediates a loss value is formed from: the soft
    weight times the largest finite |log p| (x the counted rows for "sum")."""
    t_ = options.get("temperature", 2.0)
    weight = t_**2 if options.get("scale_by_t2", True) else 1.0
    logs = [
        torch.log_softmax(x.detach().cpu().double() / tt, -1)
        for x in (student, teacher)
        for tt in (t_, 1.0)
    ]
    biggest = max(
        (lp[torch.isfinite(lp)].abs().max().item() for lp in logs if lp.numel()), default=0.0
    )
    rows = 1
    if options.get("reduction", "batchmean") == "sum":
        rows = student[..., 0].numel() if labels is None else int((labels != -100).sum())
    return max(weight, 1.0) * biggest * max(rows, 1)


def check_against_oracle(student, teacher, labels, upstream=None, **options):
    """Kernel vs float64 reference, with PyTorch-in-the-same-dtype as the yardstick:
    loss, both components and the student gradient."""
    out, grad = run_loss(student, teacher, labels, upstream, **options)
    pt, pt_grad = run_reference(student, teacher, labels, upstream, **options)
    ref, ref_grad = run_reference(student, teacher, labels, upstream, torch.float64, **options)
    assert out.loss.dtype == torch.float32
    assert grad.dtype == student.dtype and grad.device == student.device
    size = _log_prob_size(student, teacher, labels, **options)
    for field in ("loss", "hard_loss", "soft_loss"):
        assert_2x_of_torch(
            field, getattr(out, field), getattr(pt, field), getattr(ref, field), size
        )
    assert_2x_of_torch("grad", grad, pt_grad, ref_grad)
    return out, grad
