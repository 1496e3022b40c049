"""Every bad input of docs/usage.md gets a clear error naming the argument."""

import math

import pytest
import torch
from oracle import make_labels, make_logits

import kdfused
from kdfused import ops

S = make_logits((2, 3, 10))
T = make_logits((2, 3, 10), seed=1)
Y = make_labels((2, 3), 10)

BAD_CALLS = [
    # (description, args, kwargs, exception, message pattern)
    (
        "shape mismatch",
        (S, T[:, :2], Y),
        {},
        ValueError,
        r"same shape.*\(2, 3, 10\).*\(2, 2, 10\)",
    ),
    (
        "narrower teacher",
        (S, T[..., :9], Y),
        {"teacher_vocab": "truncate"},
        ValueError,
        r"vocabularies differ: student_logits \(2, 3, 10\) and teacher_logits \(2, 3, 9\), "
        r"V = 10 for the student and 9 for the teacher \(a narrower teacher cannot be truncated\)",
    ),
    (
        "wider teacher",
        (S, torch.cat([T, T[..., :2]], -1), Y),
        {},
        ValueError,
        r"V = 10 for the student and 12 for the teacher: pass teacher_vocab='truncate'",
    ),
    ("teacher_vocab", (S, T, Y), {"teacher_vocab": "pad"}, ValueError, r"teacher_vocab must be"),
    (
        "num_items float",
        (S, T, Y),
        {"num_items_in_batch": 3.0},
        TypeError,
        r"num_items_in_batch must be an int or a 0-d tensor, got float",
    ),
    (
        "num_items negative",
        (S, T, Y),
        {"num_items_in_batch": -1},
        ValueError,
        r"num_items_in_batch must be >= 0, got -1",
    ),
    (
        "num_items shape",
        (S, T, Y),
        {"num_items_in_batch": torch.tensor([3])},
        ValueError,
        r"0-d real tensor, got a tensor of shape \(1,\)",
    ),
    (
        "num_items reduction",
        (S, T, Y),
        {"num_items_in_batch": 3, "reduction": "sum"},
        ValueError,
        r"num_items_in_batch replaces the batchmean divisor.*reduction='sum'",
    ),
    (
        "labels shape",
        (S, T, Y[:, :2]),
        {},
        ValueError,
        r"labels must have shape \(2, 3\).*\(2, 2\)",
    ),
    ("labels dtype", (S, T, Y.int()), {}, TypeError, r"labels must have dtype torch.int64.*int32"),
    ("labels type", (S, T, [1, 2]), {}, TypeError, r"labels must be a torch.Tensor"),
    (
        "label too big",
        (S, T, Y.masked_fill(Y == Y[0, 0], 10)),
        {},
        ValueError,
        r"labels\[.*\] = 10 is outside \[0, V\) with V = 10",
    ),
    (
        "label negative",
        (S, T, Y.masked_fill(Y == Y[0, 0], -3)),
        {},
        ValueError,
        r"= -3 is outside \[0, V\)",
    ),
    ("integer logits", (S.long(), T, Y), {}, TypeError, r"student_logits must be a floating"),
    ("integer teacher", (S, T.long(), Y), {}, TypeError, r"teacher_logits must be a floating"),
    ("not a tensor", (S.tolist(), T, Y), {}, TypeError, r"student_logits must be a torch.Tensor"),
    ("0-d logits", (S[0, 0, 0], T[0, 0, 0], None), {"alpha": 0.0}, ValueError, r"0-d"),
    ("V == 0", (S[..., :0], T[..., :0], Y), {}, ValueError, r"V must be > 0.*\(2, 3, 0\)"),
    (
        "temperature 0",
        (S, T, Y),
        {"temperature": 0.0},
        ValueError,
        r"temperature must lie in \[1e-06, 100\], got 0.0",
    ),
    (
        "temperature above the range",
        (S, T, Y),
        {"temperature": 100.5},
        ValueError,
        r"temperature must lie in \[1e-06, 100\], got 100.5",
    ),
    (
        "temperature below the range",
        (S, T, Y),
        {"temperature": 5e-7},
        ValueError,
        r"temperature must lie in \[1e-06, 100\]",
    ),
    ("temperature < 0", (S, T, Y), {"temperature": -1}, ValueError, r"temperature.*got -1"),
    ("temperature inf", (S, T, Y), {"temperature": math.inf}, ValueError, r"temperature.*inf"),
    ("temperature nan", (S, T, Y), {"temperature": math.nan}, ValueError, r"temperature.*nan"),
    ("temperature str", (S, T, Y), {"temperature": "2"}, TypeError, r"temperature must be a real"),
    ("alpha > 1", (S, T, Y), {"alpha": 1.5}, ValueError, r"alpha must lie in \[0, 1\], got 1.5"),
    ("alpha < 0", (S, T, Y), {"alpha": -0.1}, ValueError, r"alpha must lie in \[0, 1\]"),
    (
        "beta 0",
        (S, T, Y),
        {"divergence": "jsd", "beta": 0.0},
        ValueError,
        r"beta.*\(0, 1\), got 0.0",
    ),
    ("beta 1", (S, T, Y), {"divergence": "jsd", "beta": 1.0}, ValueError, r"beta.*\(0, 1\)"),
    ("divergence", (S, T, Y), {"divergence": "kl"}, ValueError, r"divergence must be one of.*'kl'"),
    (
        "reduction",
        (S, T, Y),
        {"reduction": "mean"},
        ValueError,
        r"reduction must be one of.*'mean'",
    ),
    ("backend", (S, T, Y), {"backend": "gpu"}, ValueError, r"backend must be one of.*'gpu'"),
    ("ignore_index", (S, T, Y), {"ignore_index": 1.5}, TypeError, r"ignore_index must be an int"),
    ("scale_by_t2", (S, T, Y), {"scale_by_t2": 1}, TypeError, r"scale_by_t2 must be a bool"),
    ("no labels, alpha", (S, T, None), {"alpha": 0.5}, ValueError, r"alpha must be 0, got 0.5"),
    (
        "float64 kernel",
        (S.double(), T, Y),
        {"backend": "cpu"},
        TypeError,
        r"student_logits has dtype torch.float64.*backend='reference'",
    ),
]


# Every bad call through the public function, and the same call through the
# reference (bar the two that concern kernels only), so both reject alike.
KERNEL_ONLY = {"backend", "float64 kernel"}
CASES = [pytest.param("auto", *case, id=f"auto-{case[0]}") for case in BAD_CALLS] + [
    pytest.param("reference", *case, id=f"reference-{case[0]}")
    for case in BAD_CALLS
    if case[0] not in KERNEL_ONLY
]


@pytest.mark.parametrize("backend,desc,args,kwargs,exc,pattern", CASES)
def test_bad_input(backend, desc, args, kwargs, exc, pattern):
    if backend == "reference":
        kwargs = {k: v for k, v in kwargs.items() if k != "backend"}
        call = kdfused.reference.distill_loss
    else:
        call = kdfused.fused_distill_loss
    with pytest.raises(exc, match=pattern):
        call(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"temperature": 0}, r"temperature"),
        ({"alpha": 2}, r"alpha"),
        ({"divergence": "js"}, r"divergence"),
        ({"backend": "tpu"}, r"backend"),
    ],
)
def test_module_validates_at_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        kdfused.FusedDistillLoss(**kwargs)


def test_devices_differ():
    meta = torch.empty(2, 3, 10, device="meta")
    with pytest.raises(ValueError, match=r"same device, got cpu and meta"):
        kdfused.fused_distill_loss(S, meta, Y)
    with pytest.raises(ValueError, match=r"labels must be on the logits' device cpu, got meta"):
        kdfused.fused_distill_loss(S, T, Y.to("meta"))


def test_backend_device_mismatch():
    with pytest.raises(ValueError, match=r"backend='cuda' needs cuda tensors, got tensors on cpu"):
        kdfused.fused_distill_loss(S, T, Y, backend="cuda")


@pytest.mark.skipif(ops.has_kernel("cuda"), reason="this build has the CUDA kernel")
def test_unbuilt_backend_says_how_to_build():
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not built.*pip install"):
        ops.choose_backend("cuda", torch.device("cuda"))


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops, "LOAD_ERROR", ImportError("simulated: no kdfused._C"))
    monkeypatch.setattr(ops, "BUILT_DEVICES", frozenset())
    monkeypatch.setattr(ops, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match=r"pure-PyTorch reference.*simulated"):
        got = kdfused.fused_distill_loss(S, T, Y)
    torch.testing.assert_close(got, kdfused.reference.distill_loss(S, T, Y))
    with pytest.raises(RuntimeError, match=r"backend='cpu' is not built.*simulated"):
        kdfused.fused_distill_loss(S, T, Y, backend="cpu")


def test_op_checks_its_own_contract():
    """Called directly, the op still refuses what would be unsafe."""
    op = torch.ops.kdfused.distill_forward.default
    opts = (2.0, 0.5, "forward_kl", 0.5, -100, True, True)
    s, t, y = S.reshape(6, 10), T.reshape(6, 10), Y.reshape(6)
    with pytest.raises(ValueError, match=r"must be \[N, V\]"):
        op(S, T, Y, None, *opts)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] = \[6\]"):
        op(s, t, y[:5], None, *opts)
    with pytest.raises(ValueError, match=r"divergence must be one of"):
        op(s, t, y, None, 2.0, 0.5, "kl", 0.5, -100, True, True)
    with pytest.raises(TypeError, match=r"float32, float16 or bfloat16"):
        op(s.double(), t, y, None, *opts)
    with pytest.raises(ValueError, match=r"labels=None requires alpha == 0"):
        op(s, t, None, None, *opts)
