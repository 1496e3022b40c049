"""The vocab-parallel loss (DESIGN.md section 7) over torch.distributed: 2 and
4 CPU processes with the gloo backend, even and uneven shards, each rank's loss
and gradient slice against the single-process kernel on the full logits and
the float64 reference, the collectives counted, DTensor logits, and errors
raised on every rank together."""

import os
import sys
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdfused
from kdfused import ops

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not ops.has_kernel("cpu"),
    reason="needs torch.distributed and kdfused's compiled CPU kernel",
)

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


class CountingCollectives:
    """Counts the torch.distributed collectives called while installed."""

    NAMES = (
        "all_gather_single",
        "all_gather_into_tensor",
        "all_gather",
        "all_reduce",
        "broadcast",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "all_to_all",
        "all_to_all_single",
        "gather",
        "scatter",
        "send",
        "recv",
        "barrier",
    )

    def __init__(self):
        self.calls = []
        self.saved = {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self.saved[name] = original

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *_):
        for name, original in self.saved.items():
            setattr(dist, name, original)


def _shards(vocab, world, uneven):
    if not uneven:
        base = [vocab // world] * world
        base[-1] += vocab - sum(base)
        return base
    widths = [max(1, (vocab * (r + 1)) // (world * (world + 1) // 2)) for r in range(world)]
    widths[-1] = vocab - sum(widths[:-1])
    return widths


def _single(s, t, y, **options):
    """The single-process kernel on the full logits: loss, components, grad."""
    x = s.detach().clone().requires_grad_()
    out = kdfused.fused_distill_loss(x, t, y, return_components=True, **options)
    up = torch.linspace(0.5, 1.5, out.loss.numel()).reshape(out.loss.shape)
    (out.loss * up).sum().backward()
    return out, x.grad


def _sharded(s, t, y, group, offset, width, **options):
    x = s[..., offset : offset + width].detach().clone().requires_grad_()
    out = kdfused.fused_distill_loss(
        x,
        t[..., offset : offset + width],
        y,
        return_components=True,
        process_group=group,
        **options,
    )
    up = torch.linspace(0.5, 1.5, out.loss.numel()).reshape(out.loss.shape)
    (out.loss * up).sum().backward()
    return out, x.grad


def _cases(rank, world, group):
    """Every rank runs the same cases; an assertion fails the rank's process."""
    vocab = 503
    for uneven in (False, True):
        widths = _shards(vocab, world, uneven)
        offset, width = sum(widths[:rank]), widths[rank]
        # The first call with a layout exchanges the label's logit once more
        # (_first_call_and_layout_change); the counted calls come after it.
        warm = torch.zeros(2, vocab)
        _sharded(warm, warm, torch.tensor([0, vocab - 1]), group, offset, width)
        for divergence in DIVERGENCES:
            for options in (
                dict(temperature=2.0, alpha=0.5, reduction="batchmean"),
                dict(temperature=1.0, alpha=0.3, reduction="none", label_smoothing=0.1),
                dict(temperature=3.0, alpha=0.0, reduction="sum", scale_by_t2=False),
            ):
                g = torch.Generator().manual_seed(7)
                s = 3 * torch.randn(3, 5, vocab, generator=g)
                t = 3 * torch.randn(3, 5, vocab, generator=g)
                # labels on every rank's shard, and ignored rows
                starts = torch.tensor([sum(widths[:r]) for r in range(world)])
                y = (starts[torch.arange(15) % world] + torch.arange(15) % 3).reshape(3, 5)
                y[0, 1] = y[2, 4] = -100
                kwargs = dict(divergence=divergence, beta=0.3, **options)
                with CountingCollectives() as counter:
                    got, grad = _sharded(s, t, y, group, offset, width, **kwargs)
                forward_calls = counter.calls
                want, want_grad = _single(s, t, y, **kwargs)
                for field in ("loss", "hard_loss", "soft_loss"):
                    torch.testing.assert_close(
                        getattr(got, field), getattr(want, field), rtol=2e-5, atol=2e-6
                    )
                torch.testing.assert_close(
                    grad, want_grad[..., offset : offset + width], rtol=2e-5, atol=1e-7
                )
                ref = kdfused.reference.distill_loss(s.double(), t.double(), y, **kwargs)
                torch.testing.assert_close(got.loss.double(), ref, rtol=1e-5, atol=1e-6)
                # One all_gather (two for JSD) once the group's layout is known;
                # nothing in backward (counted above with it).
                bound = 0 if world == 1 else 2 if divergence == "jsd" else 1
                gathers = ("all_gather_single", "all_gather_into_tensor")
                assert all(c in gathers for c in forward_calls), forward_calls
                assert len(forward_calls) == bound, (divergence, uneven, forward_calls)


def _first_call_and_layout_change(rank, world, group):
    """Without a known layout (first call, or shards resized) the label's
    logit crosses once more; the results do not change."""
    kdfused.parallel.forget_layouts()
    vocab = 101
    for uneven in (False, True, True):
        widths = _shards(vocab, world, uneven)
        offset, width = sum(widths[:rank]), widths[rank]
        g = torch.Generator().manual_seed(3)
        s, t = 3 * torch.randn(6, vocab, generator=g), 3 * torch.randn(6, vocab, generator=g)
        y = torch.tensor([0, vocab - 1, 50, -100, 7, 99])
        with CountingCollectives() as counter:
            got, grad = _sharded(s, t, y, group, offset, width)
        want, want_grad = _single(s, t, y)
        torch.testing.assert_close(got.loss, want.loss, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(grad, want_grad[:, offset : offset + width])
        assert len(counter.calls) <= 2, counter.calls


def _dtensor(rank, world, group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    vocab = 203  # not a multiple of the world size: DTensor's uneven split
    g = torch.Generator().manual_seed(11)
    s, t = 3 * torch.randn(4, 6, vocab, generator=g), 3 * torch.randn(4, 6, vocab, generator=g)
    y = torch.randint(0, vocab, (4, 6), generator=g)
    y[1, 2] = -100
    ds = distribute_tensor(s, mesh, [Shard(-1)]).requires_grad_()
    dt = distribute_tensor(t, mesh, [Shard(-1)])
    dy = distribute_tensor(y, mesh, [Replicate()])
    loss = kdfused.FusedDistillLoss(divergence="jsd")(ds, dt, dy)
    (loss * 0.5).backward()  # _single's upstream gradient for a scalar loss
    want, want_grad = _single(s, t, y, divergence="jsd")
    torch.testing.assert_close(loss, want.loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(ds.grad.full_tensor(), want_grad, rtol=2e-5, atol=1e-7)


def _errors(rank, world, group):
    """Bad input raises the same error on every rank, and nothing hangs."""
    vocab = 64
    widths = _shards(vocab, world, True)
    offset, width = sum(widths[:rank]), widths[rank]
    g = torch.Generator().manual_seed(5)  # the same logits on every rank
    s, t = torch.randn(4, vocab, generator=g), torch.randn(4, vocab, generator=g)
    shard = dict(process_group=group)
    y = torch.tensor([1, 2, vocab, -100])  # vocab: just outside the group's vocabulary
    with pytest.raises(ValueError, match=rf"labels\[2\] = {vocab} is outside the group's"):
        kdfused.fused_distill_loss(
            s[:, offset : offset + width], t[:, offset : offset + width], y, **shard
        )
    y = torch.tensor([1, 2, 3, -100])
    alpha = 0.5 if rank == 0 else 0.25  # the ranks disagree
    with pytest.raises(ValueError, match="disagree on alpha"):
        kdfused.fused_distill_loss(
            s[:, offset : offset + width], t[:, offset : offset + width], y, alpha=alpha, **shard
        )
    y_rank = y.clone()
    y_rank[0] = rank  # labels that differ between ranks
    with pytest.raises(ValueError, match="disagree on label checksum"):
        kdfused.fused_distill_loss(
            s[:, offset : offset + width], t[:, offset : offset + width], y_rank, **shard
        )
    empty = 0 if rank == world - 1 else width  # one rank with no columns
    with pytest.raises(ValueError, match="at least one column"):
        kdfused.fused_distill_loss(
            s[:, offset : offset + empty], t[:, offset : offset + empty], None, alpha=0.0, **shard
        )
    # After all that, the group still works.
    got, _ = _sharded(s, t, y, group, offset, width)
    torch.testing.assert_close(got.loss, _single(s, t, y)[0].loss, rtol=2e-5, atol=2e-6)


def _fused_linear(rank, world, group):
    """The fused-linear loss over column-parallel lm_heads: each rank's rows of
    both weights and biases; the loss, the weight and bias rows' gradients and
    the sum over ranks of the hidden states' gradient equal the single-process
    loss's, with one exchange per forward whatever the chunk size."""
    vocab, hs, ht = 211, 12, 16
    widths = _shards(vocab, world, True)
    offset, width = sum(widths[:rank]), widths[rank]
    g = torch.Generator().manual_seed(9)
    h = torch.randn(2, 9, hs, generator=g)
    w = torch.randn(vocab, hs, generator=g) * 0.8
    b = torch.randn(vocab, generator=g)
    th = torch.randn(2, 9, ht, generator=g)
    tw = torch.randn(vocab, ht, generator=g) * 0.8
    y = torch.randint(0, vocab, (2, 9), generator=g)
    y[0, 3] = -100
    rows = slice(offset, offset + width)
    for divergence, reduction in (
        ("forward_kl", "batchmean"),
        ("jsd", "none"),
        ("reverse_kl", "sum"),
    ):
        opts = dict(divergence=divergence, reduction=reduction, chunk_size=5, student_softcap=6.0)
        up = torch.linspace(0.5, 1.5, 18).reshape(2, 9) if reduction == "none" else 1.0
        leaves = [x.clone().requires_grad_() for x in (h, w[rows], b[rows])]
        with CountingCollectives() as counter:
            loss = kdfused.fused_linear_distill_loss(
                leaves[0],
                leaves[1],
                y,
                student_bias=leaves[2],
                teacher_hidden=th,
                teacher_weight=tw[rows],
                process_group=group,
                **opts,
            )
            (loss * up).sum().backward()
        full = [x.clone().requires_grad_() for x in (h, w, b)]
        want = kdfused.fused_linear_distill_loss(
            full[0], full[1], y, student_bias=full[2], teacher_hidden=th, teacher_weight=tw, **opts
        )
        (want * up).sum().backward()
        torch.testing.assert_close(loss, want, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(leaves[1].grad, full[1].grad[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(leaves[2].grad, full[2].grad[rows], rtol=1e-4, atol=1e-6)
        hidden_grad = leaves[0].grad.clone()
        dist.all_reduce(hidden_grad, group=group)  # what the layer before the lm_head does
        torch.testing.assert_close(hidden_grad, full[0].grad, rtol=1e-4, atol=1e-6)
        # One exchange (two for JSD) forward and backward together; the first
        # call with this layout sends the label's logit once more.
        bound = (2 if divergence == "jsd" else 1) + (divergence == "forward_kl")
        assert len(counter.calls) == bound, (divergence, counter.calls)


def _worker(rank, world, init_file, result_dir, parts):
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
        )
        group = dist.new_group(list(range(world)))
        for part in parts:
            globals()[part](rank, world, group)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)


def _run(world, parts):
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_worker, args=(r, world, init_file, tmp, parts))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=240)
        errors = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                errors.append(f"rank {r} hung")
            path = os.path.join(tmp, f"rank{r}.err")
            if os.path.exists(path):
                errors.append(f"rank {r}:\n" + open(path).read())
            elif p.exitcode != 0 and not errors:
                errors.append(f"rank {r} exited with {p.exitcode}")
        assert not errors, "\n".join(errors)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel(world):
    """Each rank's loss and gradient slice equal the single-process result."""
    _run(world, ["_cases", "_first_call_and_layout_change", "_errors", "_fused_linear"])


def test_dtensor_logits():
    _run(2, ["_dtensor"])


def _one_rank(rank, world, group):
    """A group of one is the plain loss: the same bits, no collective."""
    g = torch.Generator().manual_seed(13)
    s, t = 3 * torch.randn(7, 300, generator=g), 3 * torch.randn(7, 300, generator=g)
    y = torch.randint(0, 300, (7,), generator=g)
    for divergence in DIVERGENCES:
        with CountingCollectives() as counter:
            got, grad = _sharded(s, t, y, group, 0, 300, divergence=divergence)
        want, want_grad = _single(s, t, y, divergence=divergence)
        assert torch.equal(got.loss, want.loss) and torch.equal(grad, want_grad)
        assert counter.calls == []


def test_single_rank_group_is_the_plain_loss():
    """W = 1: the same numbers as without a group."""
    _run(1, ["_cases", "_one_rank"])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_phases_in_one_process(divergence):
    """The CPU phase ops on three shards of each row, merged in one process:
    the loss and each shard's gradient of the plain kernel."""
    from test_cuda_emulated import check_phases

    check_phases(torch.ops.kdfused, "cpu", divergence, torch.float32, (17, 600, 1386))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
