"""The CUDA kernel's device code, run on the CPU by tests/emulator/ (a thread per
CUDA thread, real barriers and warp exchanges), through the whole public path:
fused_distill_loss -> autograd.Function -> op -> kernel. This is how the suite
checks that kernel's indexing, alignment, reductions and label check on
machines without a GPU; test_cuda.py runs the real thing where there is one.
"""

import functools
import pathlib

import pytest
import torch
from hypothesis import given, settings
from oracle import check_against_oracle, make_labels, make_logits, run_loss
from test_property import problems

import kdfused
from kdfused import ops

pytestmark = pytest.mark.emulated
ROOT = pathlib.Path(__file__).resolve().parents[1]
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


@functools.cache
def _emulated_op():
    from torch.utils import cpp_extension

    cpp_extension.load(
        name="kdfused_cuda_emulator",
        sources=[
            str(ROOT / "tests/emulator/distill_emulated.cpp"),
            str(ROOT / "csrc/distill_op.cpp"),
        ],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests/emulator")],
        extra_cflags=["-O2", "-std=c++20"],
        is_python_module=False,
    )
    return torch.ops.kdfused_emulated.distill_forward.default


# The op's scalar arguments, in schema order.
ORDER = (
    "temperature",
    "alpha",
    "divergence",
    "beta",
    "ignore_index",
    "scale_by_t2",
    "compute_grad",
)


def _route_to_emulator(patch):
    """Makes kdfused's op layer call the emulated CUDA kernel (CPU tensors)."""
    op = _emulated_op()
    patch.setattr(
        ops,
        "distill_forward",
        lambda s, t, y, scale, **options: op(s, t, y, scale, *(options[k] for k in ORDER)),
    )
    return op


@pytest.fixture
def emulator(monkeypatch):
    """The op routed to the emulator (tests that choose the kernel themselves)."""
    return _route_to_emulator(monkeypatch)


@pytest.fixture(params=["stream", "lean", "auto"])
def emulated(request, monkeypatch):
    """The op routed to the emulator, once with the streaming kernel (the
    default), once with its lean form and once with the resident kernel
    wherever it fits."""
    monkeypatch.setenv("KDFUSED_CUDA_KERNEL", request.param)
    return _route_to_emulator(monkeypatch)


@pytest.mark.parametrize("n,vocab", [(1, 1), (7, 3), (5, 1001), (3, 4099), (2, 32001)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sizes_and_dtypes(emulated, n, vocab, dtype, divergence):
    """Odd V puts each row at another alignment: scalar heads, packs, tails;
    V = 32001 uses whole 512-thread blocks."""
    s = make_logits((n, vocab), dtype, seed=80)
    t = make_logits((n, vocab), torch.bfloat16, seed=81)
    y = make_labels((n,), vocab, "some")
    check_against_oracle(s, t, y, divergence=divergence)


# The emulator runs the resident kernel at 2 packs per thread and at most 64
# threads per block (32 preferred), so these rows take clusters of 1 to 16.
@pytest.mark.parametrize(
    "n,vocab,dtype",
    [
        (3, 8, torch.bfloat16),  # one pack per row: one block, one busy thread
        (4, 1000, torch.float32),  # 250 packs: 4 blocks of 32 threads, the last partly empty
        (2, 4096, torch.float16),  # 512 packs: 8 blocks
        (2, 8192, torch.bfloat16),  # 1024 packs: 16 blocks of 32 threads
        (1, 16384, torch.bfloat16),  # 2048 packs: 16 blocks of 64 threads, the largest row
    ],
)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_resident_kernel(emulator, monkeypatch, n, vocab, dtype, divergence):
    """The register-resident kernel (forced: an error if it did not take the
    problem), with rows split over clusters of 1 to 16 blocks."""
    monkeypatch.setenv("KDFUSED_CUDA_KERNEL", "resident")
    s = make_logits((n, vocab), dtype, seed=96)
    t = make_logits((n, vocab), torch.bfloat16, seed=97)
    y = make_labels((n,), vocab, "some")
    check_against_oracle(s, t, y, divergence=divergence, temperature=2.0)


def test_cluster_limit(emulator, monkeypatch):
    """KDFUSED_CUDA_MAX_CLUSTER lowers the cluster size: the largest row then
    no longer fits the resident kernel, a smaller one takes fewer, larger blocks."""
    monkeypatch.setenv("KDFUSED_CUDA_KERNEL", "resident")
    monkeypatch.setenv("KDFUSED_CUDA_MAX_CLUSTER", "4")
    big = make_logits((1, 16384), torch.bfloat16, seed=102)
    with pytest.raises(RuntimeError, match="the resident kernel does not take this problem"):
        emulator(big, big, None, None, 2.0, 0.0, "forward_kl", 0.5, -100, True, True)
    s = make_logits((3, 2048), torch.bfloat16, seed=103)  # 256 packs: 4 blocks of 32
    t = make_logits((3, 2048), torch.bfloat16, seed=104)
    check_against_oracle(s, t, make_labels((3,), 2048, "some"), divergence="jsd")
    monkeypatch.setenv("KDFUSED_CUDA_MAX_CLUSTER", "0")
    with pytest.raises(ValueError, match="KDFUSED_CUDA_MAX_CLUSTER must be a positive integer"):
        emulator(s, t, None, None, 2.0, 0.0, "forward_kl", 0.5, -100, True, True)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_resident_and_streaming_kernels_agree(emulator, monkeypatch, divergence):
    """The two kernels sum in other orders: equal up to float32 rounding."""
    s = make_logits((5, 4000), seed=98)
    t = make_logits((5, 4000), seed=99)
    y = make_labels((5,), 4000, "some")
    args = (s, t, y, None, 2.0, 0.5, divergence, 0.5, -100, True, True)
    monkeypatch.setenv("KDFUSED_CUDA_KERNEL", "resident")
    resident = emulator(*args)
    monkeypatch.setenv("KDFUSED_CUDA_KERNEL", "stream")
    streaming = emulator(*args)
    for a, b in zip(resident, streaming, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "vocab,offset,why",
    [(1001, 0, "V not a multiple of the pack"), (2056, 1, "rows off pack alignment")],
)
def test_resident_kernel_refuses_what_it_cannot_take(emulator, monkeypatch, vocab, offset, why):
    monkeypatch.setenv("KDFUSED_CUDA_KERNEL", "resident")
    base = make_logits((2 * vocab + offset,), seed=100)
    s = base[offset:].view(2, vocab)
    with pytest.raises(RuntimeError, match="the resident kernel does not take this problem"):
        emulator(s, s, None, None, 2.0, 0.0, "forward_kl", 0.5, -100, True, True)
    monkeypatch.setenv("KDFUSED_CUDA_KERNEL", "auto")
    check_against_oracle(s, s.flip(1), None, alpha=0.0)  # the streaming kernel takes it


def test_default_is_the_streaming_kernel(emulator, monkeypatch):
    """Unset, KDFUSED_CUDA_KERNEL means stream until the resident kernel has
    passed the CUDA suite on a GPU (csrc/cuda/distill_kernel.cuh)."""
    s = make_logits((3, 4000), seed=105)
    t = make_logits((3, 4000), seed=106)
    args = (s, t, None, None, 2.0, 0.0, "forward_kl", 0.5, -100, True, True)
    monkeypatch.delenv("KDFUSED_CUDA_KERNEL", raising=False)
    default = emulator(*args)
    monkeypatch.setenv("KDFUSED_CUDA_KERNEL", "stream")
    streaming = emulator(*args)
    for a, b in zip(default, streaming, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("vocab", [4000, 4001])
def test_lean_and_streaming_kernels_agree(emulator, monkeypatch, divergence, temperature, vocab):
    """The lean form changes no arithmetic of pass 1 or of the gradient: the
    KLs' numbers are bit-identical (masked logits included, so that both of
    pass 1's paths run); JSD's pass sums in another order: equal up to rounding."""
    s = make_logits((6, vocab), seed=107)
    t = make_logits((6, vocab), seed=108)
    s[0, :100] = -float("inf")  # a row that starts with anchors at -inf
    t[1, 50:70] = -float("inf")
    y = make_labels((6,), vocab, "some")
    args = (s, t, y, None, temperature, 0.5, divergence, 0.5, -100, True, True)
    monkeypatch.setenv("KDFUSED_CUDA_KERNEL", "lean")
    lean = emulator(*args)
    monkeypatch.setenv("KDFUSED_CUDA_KERNEL", "stream")
    streaming = emulator(*args)
    for a, b in zip(lean, streaming, strict=True):
        exact = divergence != "jsd"  # (row 1 of reverse KL is inf / NaN: p_t = 0 < p_s)
        tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-7}
        torch.testing.assert_close(a, b, equal_nan=True, **tol)


def test_unknown_kernel_choice(emulator, monkeypatch):
    monkeypatch.setenv("KDFUSED_CUDA_KERNEL", "fast")
    s = make_logits((2, 64), seed=101)
    with pytest.raises(ValueError, match="KDFUSED_CUDA_KERNEL must be stream, lean, auto or"):
        emulator(s, s, None, None, 2.0, 0.0, "forward_kl", 0.5, -100, True, True)


@pytest.mark.parametrize("s_offset,t_offset", [(1, 1), (3, 3), (1, 2), (0, 5), (7, 0)])
@pytest.mark.parametrize("t_dtype", [torch.bfloat16, torch.float32])
def test_offset_views(emulated, s_offset, t_offset, t_dtype):
    """Rows that start off a pack boundary, the same way in both inputs (packs
    after a head) or not (the whole row scalar): the oracle's accuracy, and a
    contiguous copy's numbers up to rounding."""
    n, vocab = 4, 2056
    base_s = make_logits((n * vocab + 8,), torch.bfloat16, seed=82)
    base_t = make_logits((n * vocab + 8,), t_dtype, seed=83)
    s = base_s[s_offset : s_offset + n * vocab].view(n, vocab)
    t = base_t[t_offset : t_offset + n * vocab].view(n, vocab)
    y = make_labels((n,), vocab, "some")
    out, grad = check_against_oracle(s, t, y, divergence="jsd")
    out_c, grad_c = run_loss(s.clone(), t.clone(), y, divergence="jsd")
    # Another split of the row over the threads: the same up to rounding.
    torch.testing.assert_close(out.loss, out_c.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, grad_c)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(
    "options",
    [
        dict(alpha=0.0),
        dict(alpha=1.0, reduction="sum"),
        dict(temperature=0.5, scale_by_t2=False, reduction="none"),
        dict(temperature=8.0, beta=0.1, ignore_index=3),
    ],
)
def test_options(emulated, divergence, options):
    s = make_logits((6, 300), seed=84)
    t = make_logits((6, 300), seed=85)
    y = make_labels((6,), 300, "some", ignore_index=options.get("ignore_index", -100))
    upstream = torch.rand(6) + 0.5 if options.get("reduction") == "none" else None
    check_against_oracle(s, t, y, upstream, divergence=divergence, **options)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("offset", [1e4, 0.0])
def test_large_logits(emulated, divergence, offset):
    """Logits of magnitude 1e4: a shared offset, or a 1e4 spread (near one-hot)."""
    scale = 3.0 if offset else 1e4
    s = make_logits((4, 333), seed=86, scale=scale) + offset
    t = make_logits((4, 333), seed=87, scale=scale) + offset
    y = make_labels((4,), 333, "none")
    out, grad = check_against_oracle(s, t, y, divergence=divergence)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_and_nan(emulated, divergence):
    """-inf in both models (masked entries) gives no NaN; a NaN logit makes
    its own row NaN and no other."""
    s = make_logits((4, 500), seed=94)
    t = make_logits((4, 500), seed=95)
    s[:, ::3] = t[:, ::3] = -torch.inf
    y = torch.tensor([1, 2, 4, -100])
    check_against_oracle(s, t, y, divergence=divergence)
    s[1, 17] = torch.nan
    out, grad = run_loss(s, t, y, divergence=divergence, reduction="none")
    assert torch.isnan(out.loss[1]) and torch.isfinite(out.loss[[0, 2, 3]]).all()
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2, 3]]).all()


def test_no_labels_and_no_grad(emulated):
    s = make_logits((5, 777), seed=88)
    t = make_logits((5, 777), seed=89)
    check_against_oracle(s, t, None, alpha=0.0, divergence="reverse_kl")
    hard, soft, grad = emulated(s, t, None, None, 2.0, 0.0, "jsd", 0.5, -100, True, False)
    assert grad.numel() == 0 and torch.all(hard == 0) and torch.all(soft > 0)


def test_matches_cpu_kernel_closely(emulated):
    """Same math, another summation order: the two kernels agree to float32
    rounding on a 32k vocabulary."""
    s = make_logits((4, 32000), seed=90)
    t = make_logits((4, 32000), seed=91)
    y = make_labels((4,), 32000, "none")
    args = (s, t, y, None, 2.0, 0.5, "reverse_kl", 0.5, -100, True, True)
    got = emulated(*args)
    cpu = torch.ops.kdfused.distill_forward.default(*args)
    for a, b in zip(got, cpu, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad_label", [-1, 4000, 1 << 40])
def test_label_out_of_range(emulated, capfd, bad_label):
    """The kernel asserts on the device, prints the label, and reads nothing
    at a bad label (its row's hard term is NaN instead)."""
    s = make_logits((4, 4000), seed=92)
    t = make_logits((4, 4000), seed=93)
    y = torch.tensor([1, 2, bad_label, -100])
    with pytest.raises(RuntimeError, match=r"device-side assert triggered \(emulated: label_ok\)"):
        kdfused.fused_distill_loss(s, t, y)
    printed = capfd.readouterr().out
    assert f"kdfused: labels[2] = {bad_label} is outside [0, V) with V = 4000" in printed


@settings(max_examples=60)
@given(problem=problems())
def test_property(problem):
    """The property test of test_property.py, through the emulated kernel.
    (A context manager, not the fixture: hypothesis reruns the body.)"""
    s, t, labels, upstream, options = problem
    # The resident kernel wherever it fits (else the streaming one), then the lean one.
    for kernel in ("auto", "lean"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("KDFUSED_CUDA_KERNEL", kernel)
            _route_to_emulator(patch)
            check_against_oracle(s, t, labels, upstream, **options)
