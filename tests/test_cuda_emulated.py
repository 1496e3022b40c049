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
from oracle import assert_2x_of_torch, check_against_oracle, make_labels, make_logits, run_loss
from test_property import problems
from test_sparse import _log_prob_size as sparse_log_prob_size
from test_sparse import check_sparse, make_teacher, run_sparse, run_sparse_reference
from test_sparse import test_fused_linear_sparse_teacher as sparse_linear_case
from test_sparse import test_student_rows_off_a_pack_boundary as sparse_off_pack_case

import kdfused
from kdfused import SparseTeacher, ops

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
            str(ROOT / "tests/emulator/sparse_emulated.cpp"),
            str(ROOT / "tests/emulator/parallel_emulated.cpp"),
            str(ROOT / "tests/emulator/sparse_shard_emulated.cpp"),
            str(ROOT / "csrc/distill_op.cpp"),
            str(ROOT / "csrc/sparse_op.cpp"),
            str(ROOT / "csrc/parallel_op.cpp"),
            str(ROOT / "csrc/sparse_shard_op.cpp"),
        ],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests/emulator")],
        extra_cflags=["-O2", "-std=c++20"],
        is_python_module=False,
    )
    return torch.ops.kdfused_emulated.distill_forward.default


# The loss options in the ops' schema order (label_smoothing, last in each
# schema, is passed by name).
LOSS_ORDER = ("temperature", "alpha", "divergence", "beta", "ignore_index", "scale_by_t2")


def _route_to_emulator(patch):
    """Makes kdfused's op layer call the emulated CUDA kernels (CPU tensors)."""
    op = _emulated_op()
    out_op = torch.ops.kdfused_emulated.distill_forward_out.default

    def forward(
        s, t, y, scale, *, compute_grad, label_smoothing=0.0, student_entropy=False, **options
    ):
        loss = (options[k] for k in LOSS_ORDER)
        out = op(
            s,
            t,
            y,
            scale,
            *loss,
            compute_grad,
            label_smoothing=label_smoothing,
            student_entropy=student_entropy,
        )
        return ops._entropy_last(out, student_entropy)

    def forward_out(s, t, y, scale, grad, *, label_smoothing=0.0, student_entropy=False, **options):
        loss = (options[k] for k in LOSS_ORDER)
        out = out_op(
            s,
            t,
            y,
            scale,
            *loss,
            grad,
            label_smoothing=label_smoothing,
            student_entropy=student_entropy,
        )
        return ops._entropy_last(out, student_entropy)

    patch.setattr(ops, "distill_forward", forward)
    patch.setattr(ops, "distill_forward_out", forward_out)
    emulated_ops = torch.ops.kdfused_emulated

    def sparse_forward(
        s, i, lp, y, scale, *, compute_grad, label_smoothing=0.0, offsets=None, **options
    ):
        return emulated_ops.sparse_distill_forward.default(
            s,
            i,
            lp,
            y,
            scale,
            *ops._sparse_scalars(**options),
            compute_grad,
            label_smoothing,
            offsets,
        )

    def sparse_forward_out(
        s, i, lp, y, scale, grad, *, label_smoothing=0.0, offsets=None, **options
    ):
        return emulated_ops.sparse_distill_forward_out.default(
            s, i, lp, y, scale, *ops._sparse_scalars(**options), grad, label_smoothing, offsets
        )

    patch.setattr(ops, "sparse_distill_forward", sparse_forward)
    patch.setattr(ops, "sparse_distill_forward_out", sparse_forward_out)
    patch.setattr(ops, "sparse_topk", emulated_ops.sparse_topk.default)
    # The CUDA kernel has no in-place form: the fused-linear loss uses forward_out.
    patch.setattr(ops, "INPLACE_DEVICES", frozenset())
    return op


@pytest.fixture
def emulated(monkeypatch):
    """The op routed to the emulator."""
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
        dict(temperature=1.0, alpha=0.3),  # q = p_s (HardQ::kPs), no z1 sum
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


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_prefix(emulated, divergence):
    """Every thread's first pack masked (512 threads x 4 floats), in both
    models or in one (the one where the divergence stays finite: 0 log 0):
    each thread's state starts with -inf anchors and takes pass 1's path for
    finite anchors from its second pack on."""
    s = make_logits((3, 5000), seed=109)
    t = make_logits((3, 5000), seed=110)
    one = s if divergence == "reverse_kl" else t
    s[0, :2100] = t[0, :2100] = -torch.inf
    one[1, :2100] = -torch.inf
    one[2, 1000:3000] = -torch.inf
    out, grad = check_against_oracle(s, t, torch.tensor([4000, 4500, 4999]), divergence=divergence)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


def test_no_labels_and_no_grad(emulated):
    s = make_logits((5, 777), seed=88)
    t = make_logits((5, 777), seed=89)
    check_against_oracle(s, t, None, alpha=0.0, divergence="reverse_kl")
    hard, soft, grad, entropy = emulated(s, t, None, None, 2.0, 0.0, "jsd", 0.5, -100, True, False)
    assert grad.numel() == 0 and torch.all(hard == 0) and torch.all(soft > 0)
    assert entropy.numel() == 0  # not asked for


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
    with pytest.MonkeyPatch.context() as patch:
        _route_to_emulator(patch)
        check_against_oracle(s, t, labels, upstream, **options)


@pytest.mark.parametrize("parts", [2, 3, 16])
@pytest.mark.parametrize("n,vocab", [(3, 7), (4, 1001), (2, 4099)])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_row_split(emulated, monkeypatch, parts, n, vocab, divergence):
    """KDFUSED_CUDA_SPLIT: each row over a cluster of blocks that merge their
    statistics through (emulated) distributed shared memory. V = 7 in 16 parts
    leaves parts empty; labels fall in different parts; one row is ignored."""
    monkeypatch.setenv("KDFUSED_CUDA_SPLIT", str(parts))
    s = make_logits((n, vocab), torch.bfloat16, seed=111)
    t = make_logits((n, vocab), torch.float32, seed=112)
    y = torch.arange(n) * (vocab // n) + vocab // (2 * n)
    y[-1] = -100
    check_against_oracle(s, t, y, divergence=divergence)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_row_split_masked_parts(emulated, monkeypatch, divergence):
    """Parts whose every logit is -inf (in both models, or in the one where the
    divergence stays finite) merge as empty states; a NaN stays in its row."""
    monkeypatch.setenv("KDFUSED_CUDA_SPLIT", "4")
    s = make_logits((3, 4000), seed=113)
    t = make_logits((3, 4000), seed=114)
    one = s if divergence == "reverse_kl" else t
    s[0, :1000] = t[0, :1000] = -torch.inf  # part 0 of row 0
    one[1, 2000:4000] = -torch.inf  # parts 2 and 3 of row 1
    y = torch.tensor([3999, 5, 1500])
    out, grad = check_against_oracle(s, t, y, divergence=divergence)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    s[2, 3500] = torch.nan
    out, grad = run_loss(s, t, y, divergence=divergence, reduction="none")
    assert torch.isnan(out.loss[2]) and torch.isfinite(out.loss[:2]).all()
    assert torch.isnan(grad[2]).all() and torch.isfinite(grad[:2]).all()


def test_row_split_matches_one_block(emulated, monkeypatch):
    """Split or not, the same numbers up to the merge's rounding."""
    s = make_logits((3, 9000), seed=115)
    t = make_logits((3, 9000), seed=116)
    y = make_labels((3,), 9000, "none")
    args = (s, t, y, None, 2.0, 0.5, "forward_kl", 0.5, -100, True, True)
    one = emulated(*args)
    monkeypatch.setenv("KDFUSED_CUDA_SPLIT", "5")
    split = emulated(*args)
    for a, b in zip(one, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_row_split_label_out_of_range(emulated, monkeypatch, capfd):
    """One report per bad label, not one per block of its cluster."""
    monkeypatch.setenv("KDFUSED_CUDA_SPLIT", "3")
    s = make_logits((2, 600), seed=117)
    t = make_logits((2, 600), seed=118)
    with pytest.raises(RuntimeError, match=r"device-side assert triggered"):
        kdfused.fused_distill_loss(s, t, torch.tensor([600, 1]))
    printed = capfd.readouterr().out
    assert printed.count("kdfused: labels[0] = 600 is outside [0, V)") == 1


@pytest.mark.parametrize("value", ["0", "17", "two", "4x"])
def test_row_split_bad_setting(emulated, monkeypatch, value):
    monkeypatch.setenv("KDFUSED_CUDA_SPLIT", value)
    s = make_logits((2, 64), seed=119)
    with pytest.raises(ValueError, match="KDFUSED_CUDA_SPLIT must be an integer from 1 to 16"):
        kdfused.fused_distill_loss(s, s.clone(), torch.tensor([1, 2]))


def test_out_variant_and_fused_linear(emulated):
    """The CUDA kernel writing into a caller's buffer (distill_forward_out),
    through the fused-linear loss's chunk loop: row slices of the teacher's
    logits, a reused gradient buffer, against the float64 reference."""
    from test_fused_linear import check_linear_against_oracle, make_problem

    for source in ("hidden", "logits"):
        student, teacher, labels = make_problem(source=source, student_bias=True, seed=7)
        check_linear_against_oracle(
            student, teacher, labels, divergence="jsd", chunk_size=16, student_softcap=5.0
        )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("parts", ["1", "3"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
def test_label_smoothing(emulated, monkeypatch, divergence, parts, temperature):
    """Label smoothing's row sum in the CUDA kernel (its own pass, merged over
    a cluster's blocks when the row is split), and its gradient variants."""
    monkeypatch.setenv("KDFUSED_CUDA_SPLIT", parts)
    s = make_logits((5, 2001), seed=151)
    t = make_logits((5, 2001), seed=152)
    y = make_labels((5,), 2001, "some")
    check_against_oracle(
        s, t, y, divergence=divergence, temperature=temperature, alpha=0.4, label_smoothing=0.15
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_truncated_teacher_and_num_items(emulated, divergence):
    """A padded teacher read in place (rows 2056 + 9 apart, so off the packs'
    alignment: the scalar path) and num_items_in_batch, through the CUDA kernel."""
    s = make_logits((4, 2056), torch.bfloat16, seed=153)
    wide = make_logits((4, 2065), torch.float32, seed=154)
    y = make_labels((4,), 2056, "some")
    check_against_oracle(
        s, wide, y, divergence=divergence, teacher_vocab="truncate", num_items_in_batch=7
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts", ["1", "3"])
def test_student_entropy(emulated, monkeypatch, divergence, dtype, parts):
    """The student entropy's sum in the CUDA kernel's pass 1: each thread's
    moved to the row's max, reduced over the block and, split, the cluster;
    a masked prefix (threads whose anchors start at -inf), a maximum rising
    all along the row, an ignored row; with and without a gradient."""
    from test_entropy import check_entropy

    monkeypatch.setenv("KDFUSED_CUDA_SPLIT", parts)
    s = make_logits((5, 4099), dtype, seed=160)
    t = make_logits((5, 4099), torch.float32, seed=161)
    s[0, :2100] = -torch.inf
    s[1] = torch.linspace(-20, 20, 4099).to(dtype)
    y = torch.tensor([3, 4000, -100, 7, 9])
    check_entropy(s, t, y, divergence=divergence, reduction="none")
    check_entropy(s, t, y, grad=False, divergence=divergence, alpha=0.3, label_smoothing=0.1)


def test_student_entropy_matches_cpu_kernel_and_fused_linear(emulated):
    """The CUDA kernel's entropy rows equal the CPU kernel's up to float32
    rounding; through the fused-linear loss's reused buffer
    (distill_forward_out), against the float64 reference."""
    from test_entropy import check_linear_entropy
    from test_fused_linear import make_problem

    s = make_logits((4, 32000), seed=162)
    t = make_logits((4, 32000), seed=163)
    y = make_labels((4,), 32000, "some")
    args = (s, t, y, None, 2.0, 0.5, "reverse_kl", 0.5, -100, True, True)
    got = emulated(*args, student_entropy=True)
    cpu = torch.ops.kdfused.distill_forward.default(*args, student_entropy=True)
    torch.testing.assert_close(got[3], cpu[3], rtol=1e-5, atol=1e-6)
    student, teacher, labels = make_problem(student_bias=True, seed=15)
    check_linear_entropy(student, teacher, labels, divergence="jsd", chunk_size=16)


# ---- the sparse teacher's kernels (csrc/cuda/sparse_kernel.cuh) ----------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("vocab", [33, 2053])
def test_sparse_loss(emulated, dtype, divergence, vocab):
    """The CUDA sparse-teacher kernel against the float64 reference: padded
    rows, ignored rows, ids on the scalar head and tail, label smoothing."""
    s = make_logits((6, vocab), dtype, seed=160)
    teacher, _ = make_teacher((6,), vocab, 17, store_temperature=1.5, pad_rows=(0, 2))
    y = make_labels((6,), vocab, "some")
    y[3] = int(teacher.indices[3, 1])  # a label among the kept ids
    check_sparse(s, teacher, y, divergence=divergence, temperature=2.0, label_smoothing=0.1)
    check_sparse(s, teacher, None, alpha=0.0, divergence=divergence, temperature=1.0)


@pytest.mark.parametrize("offset", [1, 3])
def test_sparse_student_rows_off_a_pack_boundary(emulated, offset):
    """The kernel's gradient stores where the student's rows and the
    gradient's sit at different alignments (single stores, not packs)."""
    sparse_off_pack_case("cpu", offset)


def test_sparse_renormalize_and_k_equal_vocab(emulated):
    s = make_logits((4, 65), seed=161)
    teacher, _ = make_teacher((4,), 65, 9, tail="renormalize", pad_rows=(1,))
    check_sparse(s, teacher, make_labels((4,), 65, "some"), temperature=3.0)
    full, _ = make_teacher((4,), 65, 65, store_temperature=2.0)
    check_sparse(s, full, make_labels((4,), 65, "none"), divergence="reverse_kl")


@pytest.mark.parametrize("bad", [-2, 70, "repeat"])
def test_sparse_bad_indices_assert(emulated, capfd, bad):
    s = make_logits((3, 70), seed=162)
    teacher, _ = make_teacher((3,), 70, 4)
    ids = teacher.indices.clone()
    ids[2, 3] = ids[2, 1] if bad == "repeat" else bad
    with pytest.raises(RuntimeError, match="device-side assert"):
        kdfused.fused_distill_loss(s, SparseTeacher(ids, teacher.logprobs), None, alpha=0.0)
    printed = capfd.readouterr().out
    assert "indices[2, 3]" in printed and ("distinct" in printed or "outside" in printed)


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32, torch.uint16])
@pytest.mark.parametrize("lp_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tail,divergence", [("ghost", "jsd"), ("renormalize", "forward_kl")])
def test_sparse_ragged_rows(emulated, id_dtype, lp_dtype, tail, divergence):
    """Ragged rows (lengths 0 .. 9, ids and log-probs in their own dtypes) read
    by the CUDA kernel: the padded rows' numbers bit for bit, and the float64
    reference; a bad entry is named by its row."""
    s = make_logits((6, 2053), torch.bfloat16, seed=164)
    padded, _ = make_teacher((6,), 2053, 9, tail=tail, pad_rows=(0, 2, 4))
    padded = SparseTeacher(padded.indices, padded.logprobs.to(lp_dtype), tail, 1.0)
    ragged = padded.compact()
    ragged = SparseTeacher(
        ragged.indices.to(id_dtype), ragged.logprobs, tail, 1.0, offsets=ragged.offsets
    )
    y = make_labels((6,), 2053, "some")
    a = run_sparse(s, ragged, y, divergence=divergence, temperature=2.0)
    b = check_sparse(s, padded, y, divergence=divergence, temperature=2.0)
    assert torch.equal(a[0].loss, b[0].loss) and torch.equal(a[1], b[1])


def test_sparse_ragged_bad_entry_assert(emulated, capfd):
    s = make_logits((3, 70), seed=165)
    padded, _ = make_teacher((3,), 70, 4, pad_rows=(1,))
    ragged = padded.compact()  # rows keep 4, 1, 4 ids
    ids = ragged.indices.clone()
    ids[7] = ids[5]
    teacher = SparseTeacher(ids, ragged.logprobs, offsets=ragged.offsets)
    with pytest.raises(RuntimeError, match="device-side assert"):
        kdfused.fused_distill_loss(s, teacher, None, alpha=0.0)
    printed = capfd.readouterr().out
    assert "indices[7] (row 2, entry 2)" in printed and "distinct" in printed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 16, 300])
def test_sparse_topk(emulated, dtype, k):
    """The CUDA top-k kernel (radix select, ties to the lower id) against a
    stable sort of the log-softmax; rows of ties, masked and NaN entries."""
    t = make_logits((5, 3001), dtype, seed=163)
    t[1] = 0.0
    t[2, 100:900] = t[2].max() + 1
    t[3, :50] = -float("inf")
    got = kdfused.sparse.topk(t, k, temperature=2.0)
    logp = torch.log_softmax(t.double() / 2.0, -1)
    values, idx = torch.sort(logp, dim=-1, descending=True, stable=True)
    assert torch.equal(got.indices, idx[:, :k])
    torch.testing.assert_close(got.logprobs.double(), values[:, :k], rtol=1e-6, atol=1e-6)


def test_sparse_topk_nan_rows(emulated):
    """A row with fewer than k numbers (the rest NaN): the numbers first, then
    the NaN ids lowest first; a row with a NaN has NaN log-probs."""
    t = torch.full((3, 40), float("nan"))
    t[0, 3] = 1.0
    t[0, 7] = 2.0
    t[2] = torch.arange(40.0)
    t[2, 20] = float("nan")
    got = kdfused.sparse.topk(t, 4)
    assert got.indices.tolist() == [[7, 3, 0, 1], [0, 1, 2, 3], [39, 38, 37, 36]]
    assert torch.isnan(got.logprobs).all()


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_sparse_fused_linear(emulated, reduction):
    """The fused-linear loss with a sparse teacher through the CUDA kernel's
    buffer-writing form (sparse_distill_forward_out), chunk by chunk."""
    sparse_linear_case("cpu", "jsd", reduction, torch.bfloat16)


# ---- the vocab-parallel phases (csrc/cuda/parallel_kernel.cuh) ----------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", [(1000, 1003), (17, 600, 1386)])
def test_vocab_parallel_phases(emulated, divergence, dtype, widths):
    """The CUDA statistics, JSD-sums and gradient kernels on shards of a row,
    merged as the ranks would (in one process): the full row's loss and each
    shard's gradient, against the CPU kernel on the whole logits."""
    _emulated_op()
    check_phases(torch.ops.kdfused_emulated, "cpu", divergence, dtype, widths)


def check_phases(phase_ops, device, divergence, dtype, widths):
    """The phase ops of phase_ops (torch.ops.kdfused, or the emulator's) on
    shards of each row, merged in one process, against the plain kernel."""
    vocab = sum(widths)
    s = make_logits((6, vocab), dtype, device, seed=170)
    t = make_logits((6, vocab), dtype, device, seed=171)
    y = make_labels((6,), vocab, "some", device=device)
    y[1] = widths[0] + 3  # a label on a later shard
    opts = (2.0, 0.4, divergence, 0.3, -100, True, 0.1)
    offsets = [sum(widths[:r]) for r in range(len(widths))]
    parts = [(s[:, o : o + w], t[:, o : o + w], o) for o, w in zip(offsets, widths, strict=True)]
    stats = torch.stack(
        [phase_ops.distill_stats(a, b, y, None, *opts, o, vocab) for a, b, o in parts]
    )
    consts, hard, soft = torch.ops.kdfused.distill_merge(stats, y, *opts)
    if divergence == "jsd":
        sums = torch.stack(
            [
                phase_ops.distill_jsd_sums(a, b, y, None, *opts, o, vocab, consts)
                for a, b, o in parts
            ]
        )
        consts, soft = torch.ops.kdfused.distill_jsd_finish(consts, sums, y, 2.0, 0.3, -100, True)
    scale = torch.tensor(0.25, device=device)
    grads = [phase_ops.distill_grad(a, b, y, scale, *opts, o, vocab, consts) for a, b, o in parts]
    want_hard, want_soft, want_grad, _ = torch.ops.kdfused.distill_forward(
        s.cpu(), t.cpu(), y.cpu(), scale.cpu(), *opts[:6], True, 0.1
    )
    torch.testing.assert_close(hard.cpu(), want_hard, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(soft.cpu(), want_soft, rtol=1e-4, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=0.02, atol=1e-6)
    torch.testing.assert_close(torch.cat(grads, 1).float().cpu(), want_grad.float(), **tol)


# ---- the sparse teacher's vocab-parallel phases (csrc/cuda/sparse_shard_kernel.cuh) ----


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", [(1000, 1003), (17, 600, 1386)])
def test_sparse_vocab_parallel_phases(emulated, divergence, dtype, widths):
    """The CUDA sparse statistics, merge and gradient kernels on shards of a
    row, merged as the ranks would (in one process): the whole row's loss and
    each shard's gradient of the single-process sparse kernel."""
    _emulated_op()
    check_sparse_phases(torch.ops.kdfused_emulated, "cpu", divergence, dtype, widths)


def test_sparse_phases_renormalize_and_bad_input(emulated, capfd):
    """A renormalized tail through the emulated kernels, and the merge's
    device-side asserts on a kept id outside the vocabulary, a repeated one and
    a bad label."""
    _emulated_op()
    phase_ops = torch.ops.kdfused_emulated
    check_sparse_phases(phase_ops, "cpu", "forward_kl", torch.float32, (40, 300), "renormalize")
    teacher, _ = make_teacher((3,), 70, 4)
    s = make_logits((3, 70), seed=175)
    opts = (2.0, 1.0, "ghost", 0.0, "forward_kl", 0.5, -100, True, 0.0)
    for bad in (70, "repeat", "label"):
        ids = teacher.indices.clone()
        y = torch.tensor([1, 2, 3])
        if bad == "label":
            y[2] = 70
        else:
            ids[2, 3] = ids[2, 1] if bad == "repeat" else bad
        parts = [(s[:, :30], 0), (s[:, 30:], 30)]
        stats = torch.stack(
            [
                phase_ops.sparse_shard_stats(a, ids, teacher.logprobs, None, None, *opts, o, 70)
                for a, o in parts
            ]
        )
        with pytest.raises(RuntimeError, match="device-side assert"):
            phase_ops.sparse_shard_merge(stats, ids, teacher.logprobs, y, *opts)
        printed = capfd.readouterr().out
        want = "labels[2] = 70" if bad == "label" else "indices[2, 3]"
        assert want in printed, printed


def check_sparse_phases(phase_ops, device, divergence, dtype, widths, tail="ghost"):
    """The sparse phase ops of phase_ops (torch.ops.kdfused, or the
    emulator's) on shards of each row, merged in one process, against the
    single-process sparse kernel (float32: closely) and the float64 reference
    (16-bit: flash-attention's 2x rule)."""
    vocab = sum(widths)
    n, k = 7, 17
    s = make_logits((n, vocab), dtype, device, seed=172)
    teacher, _ = make_teacher(
        (n,), vocab, k, store_temperature=1.5, tail=tail, device=device, pad_rows=(0, 2)
    )
    idx, lp = teacher.indices, teacher.logprobs
    y = make_labels((n,), vocab, "some", device=device)
    y[1] = widths[0] + 3  # a label on a later shard
    y[4] = int(idx[4, 5])  # a label among the kept ids
    options = dict(temperature=2.0, alpha=0.4, divergence=divergence, beta=0.3, label_smoothing=0.1)
    sparse = (2.0, 1.5, tail, 0.4, divergence, 0.3, -100, True)
    offsets = [sum(widths[:r]) for r in range(len(widths))]
    parts = [(s[:, o : o + w], o) for o, w in zip(offsets, widths, strict=True)]
    stats = torch.stack(
        [
            phase_ops.sparse_shard_stats(a, idx, lp, y, None, *sparse, 0.1, o, vocab)
            for a, o in parts
        ]
    )
    assert stats.shape == (len(widths), n, ops.SPARSE_STATS + k)
    merged, hard, soft = phase_ops.sparse_shard_merge(stats, idx, lp, y, *sparse, 0.1)
    assert merged.shape == (n, ops.SPARSE_CONSTS + k)
    scale = torch.tensor(0.25, device=device)
    grads = [
        phase_ops.sparse_shard_grad(a, idx, lp, y, scale, *sparse, 0.1, o, vocab, merged)
        for a, o in parts
    ]
    grad = torch.cat(grads, 1)
    assert grad.dtype == dtype and grad.shape == s.shape
    ignored = y == -100
    assert torch.all(hard[ignored] == 0) and torch.all(soft[ignored] == 0)
    assert torch.all(grad[ignored] == 0)
    if dtype == torch.float32:
        want_hard, want_soft, want_grad = torch.ops.kdfused.sparse_distill_forward(
            s.cpu(), idx.cpu(), lp.cpu(), y.cpu(), scale.cpu(), *sparse, True, 0.1
        )
        torch.testing.assert_close(hard.cpu(), want_hard, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(soft.cpu(), want_soft, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.cpu(), want_grad, rtol=1e-5, atol=1e-7)
        return
    up = torch.full((n,), 0.25)
    row_opts = dict(options, reduction="none")
    pt, pt_grad = run_sparse_reference(s, teacher, y, up, **row_opts)
    ref, ref_grad = run_sparse_reference(s, teacher, y, up, torch.float64, **row_opts)
    size = sparse_log_prob_size(s, teacher, y, **row_opts)
    assert_2x_of_torch("hard", hard, pt.hard_loss, ref.hard_loss, size)
    assert_2x_of_torch("soft", soft, pt.soft_loss, ref.soft_loss, size)
    assert_2x_of_torch("grad", grad, pt_grad, ref_grad)
