"""kdfused_math.h's CPU exp and log, checked element by element against float64
(tests/math/math_check.cpp compiles them for both CPU instruction sets). The
loss tests see these functions only through sums, whose tolerance let a 2e-4
change to one of the log's coefficients (159 ulp at worst) pass."""

import functools
import math
import pathlib

import pytest
import torch

import kdfused  # noqa: F401  (registers torch.ops.kdfused.cpu_capability)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = torch.finfo(torch.float32).tiny


@functools.cache
def _apply():
    from torch.utils import cpp_extension

    cpp_extension.load(
        name="kdfused_math_check",
        sources=[str(ROOT / "tests/math/math_check.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O2", "-std=c++20"],
        is_python_module=False,
    )
    return torch.ops.kdfused_math_check.apply


@pytest.fixture(params=["baseline", "avx2"])
def fn(request):
    """The functions as one of the CPU kernel's instruction sets compiles them."""
    avx2 = request.param == "avx2"
    if avx2 and torch.ops.kdfused.cpu_capability() != "avx2":
        pytest.skip("this CPU has no AVX2 + FMA, so the kernel never runs that build")
    return lambda name, x: _apply()(name, x, avx2)


def floats_between(lo_bits, hi_bits, step):
    """Every step-th float32 from bit pattern lo_bits to hi_bits (both as int64)."""
    bits = torch.arange(lo_bits, hi_bits + 1, step, dtype=torch.int64)
    return bits.to(torch.int32).view(torch.float32)  # two's complement for negative floats


def ulp_error(got, x, exact):
    """|got - exact(x)| in units of the float32 spacing at the exact value."""
    want = exact(x.double())
    w = want.float().abs()
    spacing = (torch.nextafter(w, torch.tensor(math.inf)) - w).double()
    return (got.double() - want).abs() / spacing


def test_log_prob_accuracy(fn):
    x = floats_between(0x00800000, 0x3F800000, 97)  # [FLT_MIN, 1]
    err = ulp_error(fn("log_prob", x), x, torch.log)
    assert err.max() <= 1.0, f"{err.max():.3f} ulp at x = {x[err.argmax()].item()!r}"


def test_log_prob_edges(fn):
    """Below FLT_MIN (0 and subnormals) the log is log FLT_MIN; NaN stays NaN."""
    x = torch.tensor([0.0, 1e-40, TINY, 1.0, math.nan])
    got = fn("log_prob", x)
    log_tiny = math.log(TINY)
    assert got[:3].tolist() == pytest.approx([log_tiny] * 3, rel=1e-7)
    assert got[3] == 0.0 and torch.isnan(got[4])


def test_exp_accuracy(fn):
    """kd_exp_nonpos on [-104, 0] and kd_exp on [-104, 89]: within 2 ulp where
    the result is normal (1.66 measured), within one 2^-149 step where it is
    subnormal (gradual underflow), inf where it overflows."""
    neg = floats_between(0x80000000 - 2**32, 0xC2D00000 - 2**32, 1009)  # -0 to -104
    pos = floats_between(0x00000000, 0x42B20000, 1009)  # 0 to 89
    for name, x in (("exp_nonpos", neg), ("exp", neg), ("exp", pos)):
        got = fn(name, x)
        want = torch.exp(x.double())
        overflow = want.float().isinf()  # x > log(FLT_MAX): inf is the right answer
        assert got[overflow].eq(math.inf).all(), name
        normal = (want >= TINY) & ~overflow
        err = ulp_error(got[normal], x[normal], torch.exp)
        worst = x[normal][err.argmax()].item()
        assert err.max() <= 2.0, f"{name}: {err.max():.3f} ulp at x = {worst!r}"
        sub = want < TINY  # none for x >= 0
        step = ((got[sub].double() - want[sub]).abs() / 2.0**-149).tolist()
        assert max(step, default=0.0) <= 1.0, f"{name}: subnormal off by {max(step):.2f} steps"


def test_exp_edges(fn):
    x = torch.tensor([-math.inf, -200.0, 0.0, 100.0, math.inf, math.nan])
    got = fn("exp", x)
    assert got[:5].tolist() == [0.0, 0.0, 1.0, math.inf, math.inf]
    assert torch.isnan(got[5])
    got = fn("exp_nonpos", x[:3])
    assert got.tolist() == [0.0, 0.0, 1.0]
