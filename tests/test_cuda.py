"""What only the CUDA kernel has: LLM-size rows, alignment heads and tails,
streams, devices, CUDA graphs, determinism and the on-device label check.
(Every other test of the suite also runs on CUDA through oracle.DEVICES.)"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from oracle import check_against_oracle, make_labels, make_logits, requires_cuda, run_loss

import kdfused

pytestmark = requires_cuda

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


@pytest.mark.slow
@pytest.mark.parametrize("vocab", [128256, 262144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_llm_vocab(vocab, dtype, divergence):
    s = make_logits((3, vocab), dtype, "cuda", seed=60)
    t = make_logits((3, vocab), dtype, "cuda", seed=61)
    y = torch.tensor([5, -100, vocab - 1], device="cuda")
    check_against_oracle(s, t, y, divergence=divergence)


@pytest.mark.slow
def test_rows_past_element_2_31():
    """A 16640 x 131072 bf16 launch (4.4 GB per input; row 16384 starts at
    element 2^31): the rows around and past that point equal the same rows run
    on their own, so every offset is 64-bit. (Per-row outputs and gradients do
    not depend on the other rows: the op leaves the batch mean to its caller.)"""
    n, vocab, first = 16640, 131072, 16380
    g = torch.Generator(device="cuda").manual_seed(78)
    s = torch.randn(n, vocab, generator=g, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(n, vocab, generator=g, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, vocab, (n,), generator=g, device="cuda")
    options = (2.0, 0.5, "jsd", 0.5, -100, True, True)
    whole = torch.ops.kdfused.distill_forward.default(s, t, y, None, *options)
    tail = torch.ops.kdfused.distill_forward.default(
        s[first:].clone(), t[first:].clone(), y[first:].clone(), None, *options
    )
    for a, b in zip(whole, tail, strict=True):
        assert torch.equal(a[first:], b)


@pytest.mark.parametrize("n,vocab", [(1, 1), (7, 3), (5, 1001), (9, 32001), (3, 4099)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_odd_sizes(n, vocab, dtype, divergence):
    """Odd V puts each row at a different alignment: scalar heads and tails."""
    s = make_logits((n, vocab), dtype, "cuda", seed=62)
    t = make_logits((n, vocab), torch.bfloat16, "cuda", seed=63)
    y = make_labels((n,), vocab, "some", device="cuda")
    check_against_oracle(s, t, y, divergence=divergence)


@pytest.mark.parametrize("s_offset,t_offset", [(1, 1), (3, 3), (1, 2), (0, 5), (7, 0)])
def test_offset_views(s_offset, t_offset):
    """Rows that start off a 16-byte boundary, the same way (packs after a
    head) or differently in the two inputs (the whole row scalar)."""
    n, vocab = 4, 2056
    base_s = make_logits((n * vocab + 8,), torch.bfloat16, "cuda", seed=64)
    base_t = make_logits((n * vocab + 8,), torch.bfloat16, "cuda", seed=65)
    s = base_s[s_offset : s_offset + n * vocab].view(n, vocab)
    t = base_t[t_offset : t_offset + n * vocab].view(n, vocab)
    y = make_labels((n,), vocab, "some", device="cuda")
    out, grad = check_against_oracle(s, t, y, divergence="jsd")
    out_c, grad_c = run_loss(s.clone(), t.clone(), y, divergence="jsd")
    # Another split of the row over the threads: the same up to rounding.
    torch.testing.assert_close(out.loss, out_c.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, grad_c)


def test_non_default_stream():
    """The kernel runs on the caller's current stream, not the default one."""
    s = make_logits((64, 5000), device="cuda", seed=66)
    t = make_logits((64, 5000), device="cuda", seed=67)
    y = make_labels((64,), 5000, device="cuda")
    expected = run_loss(s, t, y)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Work queued ahead on this stream must finish before the kernel reads:
        # launched on another stream, it would read s_side before it is written.
        torch.cuda._sleep(50_000_000)
        s_side = s * 1.0
        got = run_loss(s_side, t, y)
    side.synchronize()
    assert torch.equal(got[0].loss, expected[0].loss) and torch.equal(got[1], expected[1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_other_device():
    """Tensors on cuda:1 while cuda:0 is current: the device guard."""
    s = make_logits((8, 999), device="cuda:1", seed=68)
    t = make_logits((8, 999), device="cuda:1", seed=69)
    y = make_labels((8,), 999, device="cuda:1")
    with torch.cuda.device(0):
        out, grad = check_against_oracle(s, t, y, divergence="reverse_kl")
    assert grad.device == s.device


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cuda_graph_capture(divergence):
    """Forward and backward captured in a CUDA graph, replayed on new data."""
    n, vocab = 16, 3000
    static_s = make_logits((n, vocab), device="cuda", seed=70).requires_grad_()
    static_t = make_logits((n, vocab), device="cuda", seed=71)
    static_y = make_labels((n,), vocab, device="cuda")
    loss_fn = kdfused.FusedDistillLoss(divergence=divergence)

    side = torch.cuda.Stream()  # warm-up off the capture stream, as torch.cuda.graphs asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            static_s.grad = None
            loss_fn(static_s, static_t, static_y).backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    static_s.grad = None
    with torch.cuda.graph(graph):
        static_loss = loss_fn(static_s, static_t, static_y)
        static_loss.backward()

    for seed in (72, 74):
        s = make_logits((n, vocab), device="cuda", seed=seed)
        t = make_logits((n, vocab), device="cuda", seed=seed + 1)
        with torch.no_grad():
            static_s.copy_(s)
            static_t.copy_(t)
        graph.replay()
        out, grad = run_loss(s, t, static_y, divergence=divergence)
        torch.testing.assert_close(static_loss, out.loss, rtol=0, atol=0)
        torch.testing.assert_close(static_s.grad, grad, rtol=0, atol=0)


@pytest.mark.parametrize("vocab", [50001, 128256])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_deterministic(vocab, divergence):
    """No atomics: two runs are bit-identical, loss and gradient."""
    s = make_logits((33, vocab), torch.bfloat16, "cuda", seed=76)
    t = make_logits((33, vocab), torch.bfloat16, "cuda", seed=77)
    y = make_labels((33,), vocab, device="cuda")
    first = run_loss(s, t, y, divergence=divergence)
    second = run_loss(s, t, y, divergence=divergence)
    assert torch.equal(first[0].loss, second[0].loss)
    assert torch.equal(first[1], second[1])


@pytest.mark.parametrize("bad_label", [-1, 4000, 1 << 40])
def test_label_out_of_range_is_raised(bad_label):
    """A bad label is caught on the device before any read; the error reaches
    the host at its next synchronisation. A device-side assert leaves the CUDA
    context unusable, so the call runs in a child process."""
    script = textwrap.dedent(
        f"""
        import torch, kdfused
        s = torch.randn(4, 4000, device="cuda", requires_grad=True)
        t = torch.randn(4, 4000, device="cuda")
        y = torch.tensor([1, 2, {bad_label}, -100], device="cuda")
        try:
            kdfused.fused_distill_loss(s, t, y).backward()
            torch.cuda.synchronize()
        except RuntimeError as err:
            print("RAISED:", err)
        else:
            print("NOT RAISED")
        """
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    output = done.stdout + done.stderr
    assert "RAISED:" in done.stdout and "device-side assert" in output, output
    assert f"kdfused: labels[2] = {bad_label} is outside [0, V) with V = 4000" in output, output


@pytest.mark.parametrize("parts", [2, 8, 16])
@pytest.mark.parametrize("vocab", [4099, 128256])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_row_split(monkeypatch, parts, vocab, divergence):
    """KDFUSED_CUDA_SPLIT (sm_90: a cluster of blocks per row, merged through
    distributed shared memory): the oracle's accuracy, the unsplit kernel's
    numbers up to the merge's rounding, and bit-identical reruns."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread-block clusters need sm_90 (the launcher falls back to one block)")
    s = make_logits((17, vocab), torch.bfloat16, "cuda", seed=120)
    t = make_logits((17, vocab), torch.bfloat16, "cuda", seed=121)
    y = make_labels((17,), vocab, device="cuda")
    one = run_loss(s, t, y, divergence=divergence)
    monkeypatch.setenv("KDFUSED_CUDA_SPLIT", str(parts))
    out, grad = check_against_oracle(s, t, y, divergence=divergence)
    again = run_loss(s, t, y, divergence=divergence)
    torch.testing.assert_close(out.loss, one[0].loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, one[1])
    assert torch.equal(out.loss, again[0].loss) and torch.equal(grad, again[1])


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_parallel_phases_on_cuda(divergence, dtype):
    """The CUDA phase kernels (statistics, merge, JSD's sums, gradient) on
    shards of each row in one process, against the CPU kernel on the whole
    row: what the ranks of a group run, without NCCL."""
    from test_cuda_emulated import check_phases

    check_phases(torch.ops.kdfused, "cuda", divergence, dtype, (17, 60000, 68239))
