"""The op layer: torch.library.opcheck, and torch.compile(fullgraph=True)."""

import pytest
import torch
from oracle import DEVICES, make_labels, make_logits

import kdfused
from kdfused import ops

OPTIONS = dict(
    temperature=2.0,
    alpha=0.5,
    divergence="forward_kl",
    beta=0.5,
    ignore_index=-100,
    scale_by_t2=True,
    compute_grad=True,
)


def _op_args(device, *, labels=True, grad_scale=True, dtype=torch.float32, **overrides):
    opts = {**OPTIONS, **overrides}
    if not labels:
        opts["alpha"] = 0.0
    s = make_logits((6, 37), dtype, device, seed=50)
    t = make_logits((6, 37), torch.bfloat16, device, seed=51)
    y = make_labels((6,), 37, "some", device=device) if labels else None
    scale = torch.tensor(0.25, device=device) if grad_scale else None
    return (s, t, y, scale, *opts.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(labels=False),
        dict(grad_scale=False, divergence="jsd", beta=0.2),
        dict(compute_grad=False, divergence="reverse_kl"),
        dict(dtype=torch.float16, scale_by_t2=False),
    ],
    ids=["labels", "no_labels", "jsd_no_scale", "no_grad", "fp16"],
)
def test_opcheck(device, case):
    torch.library.opcheck(torch.ops.kdfused.distill_forward.default, _op_args(device, **case))


@pytest.mark.parametrize("device", DEVICES)
def test_op_outputs(device):
    s, t, y, scale, *opts = _op_args(device)
    hard, soft, grad, entropy = torch.ops.kdfused.distill_forward.default(s, t, y, scale, *opts)
    assert entropy.shape == (0,)  # not asked for
    assert hard.dtype == soft.dtype == torch.float32 and hard.shape == soft.shape == (6,)
    assert grad.dtype == s.dtype and grad.shape == s.shape
    ignored = y == -100
    assert torch.all(hard[ignored] == 0) and torch.all(soft[ignored] == 0)
    assert torch.all(grad[ignored] == 0) and torch.all(grad[~ignored] != 0)


@pytest.mark.parametrize("bad_label", [-1, 37, 1 << 40, -(1 << 40)])
def test_op_rejects_label_out_of_range(bad_label):
    """Checked inside the op, before any read: no out-of-bounds access. (The
    CUDA kernel checks on the device: test_cuda.py.)"""
    s, t, y, scale, *opts = _op_args("cpu")
    y[3] = bad_label
    with pytest.raises(ValueError, match=rf"labels\[3\] = {bad_label} is outside \[0, V\)"):
        torch.ops.kdfused.distill_forward.default(s, t, y, scale, *opts)


def test_extension_is_loaded():
    """The CPU kernel is part of every build, and the CUDA kernel of every build
    against a CUDA torch on a machine with a GPU: a missing one is a build bug."""
    assert ops.LOAD_ERROR is None, ops.LOAD_ERROR
    assert ops.has_kernel("cpu")
    if torch.version.cuda and torch.cuda.is_available():
        assert ops.has_kernel("cuda"), "a CUDA torch and a GPU, but no CUDA kernel was built"


@pytest.mark.parametrize(
    "s_dtype,t_dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float16),  # F16C loads and stores on the AVX2 path
        (torch.bfloat16, torch.float16),
        (torch.bfloat16, torch.bfloat16),  # JSD's pass reads the logits in place
    ],
)
def test_cpu_instruction_sets_agree(monkeypatch, s_dtype, t_dtype):
    """The baseline x86-64 path (what a CPU without AVX2 runs) and the AVX2 path
    both meet the oracle; KDFUSED_CPU_CAPABILITY=default forces the baseline."""
    from oracle import check_against_oracle

    s = make_logits((5, 3001), s_dtype, seed=52)
    t = make_logits((5, 3001), t_dtype, seed=53)
    y = make_labels((5,), 3001, "some")
    results = {}
    for forced in ("default", None):
        if forced:
            monkeypatch.setenv("KDFUSED_CPU_CAPABILITY", forced)
        else:
            monkeypatch.delenv("KDFUSED_CPU_CAPABILITY", raising=False)
        capability = torch.ops.kdfused.cpu_capability()
        assert capability == (forced or capability) and capability in ("default", "avx2")
        results[capability] = check_against_oracle(s, t, y, divergence="jsd")
    (loss_a, grad_a), (loss_b, grad_b) = results.values()
    torch.testing.assert_close(loss_a.loss, loss_b.loss, rtol=1e-6, atol=0)
    # The two paths may round a gradient element to either neighbour of a
    # 16-bit value (FMA contraction moves the float result by an ulp or so).
    rtol = 0.0 if s_dtype == torch.float32 else torch.finfo(s_dtype).eps
    torch.testing.assert_close(grad_a, grad_b, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("capability", ["default", "auto"])
def test_cpu_jsd_bfloat16_in_place_matches_converted(monkeypatch, capability):
    """With both models' logits bfloat16, JSD's pass reads them in place
    (jsd_bf16); with a float32 teacher it reads converted chunks. Those hold the
    same float values, so loss and gradient must agree bit for bit, on both
    instruction sets (V = 3001: five 512-element chunks and a ragged one)."""
    if capability == "default":
        monkeypatch.setenv("KDFUSED_CPU_CAPABILITY", "default")
    else:
        monkeypatch.delenv("KDFUSED_CPU_CAPABILITY", raising=False)
    s = make_logits((4, 3001), torch.bfloat16, seed=54)
    t = make_logits((4, 3001), torch.bfloat16, seed=55)
    s[1, :700] = float("-inf")  # masked entries, one chunk's anchors -inf
    y = make_labels((4,), 3001, "none")
    results = []
    for teacher in (t, t.float()):
        student = s.clone().requires_grad_()
        loss = kdfused.fused_distill_loss(
            student, teacher, y, divergence="jsd", beta=0.3, reduction="none", backend="cpu"
        )
        loss.sum().backward()
        results.append((loss.detach(), student.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert torch.isfinite(loss_a).all() and grad_a.abs().sum() > 0
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(grad_a, grad_b)


def test_baseline_path_has_no_avx():
    """The baseline chunk kernels contain no AVX instruction (ymm registers,
    VEX encodings), so a CPU without AVX2 cannot hit an illegal instruction."""
    import re
    import shutil
    import subprocess

    from kdfused import _C

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    asm = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-C", _C.__file__],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    functions = re.split(r"\n(?=[0-9a-f]+ <)", asm)
    table = r"_(stats|jsd|grad|sum_below|load_bf16|store_bf16|load_f16|store_f16)\b"
    baseline = [f for f in functions if re.match(r"[0-9a-f]+ <[^>]*baseline" + table, f)]
    avx2 = [f for f in functions if re.match(r"[0-9a-f]+ <[^>]*avx2" + table, f)]
    assert len(baseline) >= 19, "baseline chunk kernels not found in the library"
    for body in baseline:
        # AVX instructions, and F16C's conversions (which take no ymm register).
        assert not re.search(r"%ymm|\bv(fmadd|mulps|addps|blendv|cvtph2ps|cvtps2ph)", body), (
            body.split("\n")[0]
        )
    if avx2:  # and the AVX2 ones really are vectorised with AVX
        assert any("%ymm" in body for body in avx2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_out_variant(device, dtype):
    """distill_forward_out writes the gradient distill_forward returns into the
    caller's buffer, bit for bit, and passes opcheck (it mutates that buffer)."""
    s, t, y, scale, *opts = _op_args(device, dtype=dtype)
    hard, soft, grad, _ = torch.ops.kdfused.distill_forward.default(s, t, y, scale, *opts)
    buffer = torch.full_like(s, float("nan"))
    got = torch.ops.kdfused.distill_forward_out.default(s, t, y, scale, *opts[:-1], buffer)
    assert torch.equal(got[0], hard) and torch.equal(got[1], soft)
    assert torch.equal(buffer, grad)
    torch.library.opcheck(
        torch.ops.kdfused.distill_forward_out.default, (s, t, y, scale, *opts[:-1], buffer)
    )


@pytest.mark.parametrize(
    "bad", ["shape", "dtype", "strided"], ids=["shape", "dtype", "non-contiguous"]
)
def test_out_variant_checks_its_buffer(bad):
    s, t, y, scale, *opts = _op_args("cpu")
    buffer = {
        "shape": torch.empty(6, 36),
        "dtype": torch.empty(6, 37, dtype=torch.bfloat16),
        "strided": torch.empty(37, 6).t(),
    }[bad]
    with pytest.raises(ValueError, match=r"grad must be a contiguous \[N, V\] = \[6, 37\] tensor"):
        torch.ops.kdfused.distill_forward_out.default(s, t, y, scale, *opts[:-1], buffer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])  # the hard term's softmax from p_s, from s
def test_inplace_variant(dtype, divergence, temperature):
    """distill_forward_inplace (CPU) overwrites the student logits with the
    gradient distill_forward returns, bit for bit: every logit, the label's
    included, is read before its chunk is overwritten (V = 1500: three chunks)."""
    s, t, y, scale, *opts = _op_args("cpu", dtype=dtype)
    s = make_logits((6, 1500), dtype, seed=56)
    t = make_logits((6, 1500), torch.float32, seed=57)
    y = make_labels((6,), 1500, "some")
    y[1] = 1499  # the last element of a ragged chunk
    opts[0], opts[2] = temperature, divergence
    hard, soft, grad, _ = torch.ops.kdfused.distill_forward.default(s, t, y, scale, *opts)
    buffer = s.clone()
    got = torch.ops.kdfused.distill_forward_inplace.default(buffer, t, y, scale, *opts[:-1])
    assert torch.equal(got[0], hard) and torch.equal(got[1], soft)
    assert torch.equal(buffer, grad)


def test_inplace_variant_opcheck_and_contiguity():
    s, t, y, scale, *opts = _op_args("cpu")
    torch.library.opcheck(
        torch.ops.kdfused.distill_forward_inplace.default, (s.clone(), t, y, scale, *opts[:-1])
    )
    strided = torch.empty(37, 6).t()
    with pytest.raises(ValueError, match=r"overwrites the student logits.*must be contiguous"):
        torch.ops.kdfused.distill_forward_inplace.default(strided, t, y, scale, *opts[:-1])
    assert ops.INPLACE_DEVICES == {"cpu"}
