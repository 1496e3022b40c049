"""The vocab-parallel loss over torch.distributed (docs/design.md,
"Vocab-parallel"): 2 and 4 CPU processes with the gloo backend, even and
uneven shards. Every cell of the grid under a group -- student logits or
hidden states + weight, against dense teacher logits, teacher hidden states +
weight, or a SparseTeacher (ghost and renormalize) -- gives every rank the
single-process loss and its shard's gradient, equal to the float64 reference;
the collectives are counted (the agreement, then one per-row exchange, two for
JSD with a dense teacher, none in backward). DTensor logits. Ranks that
disagree, or one rank's bad input, raise the same error on every rank, bounded
by a timeout, and no rank dies by a signal."""

import os
import signal
import sys
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdfused
from kdfused import SparseTeacher, ops

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not ops.has_kernel("cpu"),
    reason="needs torch.distributed and kdfused's compiled CPU kernel",
)

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
GATHERS = ("all_gather_single", "all_gather_into_tensor")


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


def expected_collectives(teacher_kind, divergence):
    """The agreement, one per-row exchange, and JSD's second with a dense
    teacher (none with a sparse one: its buckets are complete after one)."""
    return 2 + (divergence == "jsd" and teacher_kind != "sparse")


def _shards(vocab, world, uneven):
    if not uneven:
        base = [vocab // world] * world
        base[-1] += vocab - sum(base)
        return base
    widths = [max(1, (vocab * (r + 1)) // (world * (world + 1) // 2)) for r in range(world)]
    widths[-1] = vocab - sum(widths[:-1])
    return widths


def _sparse_teacher(lead, vocab, k, tail, seed, store_temperature=1.5):
    """A top-k teacher with padded rows (row r of the first rows keeps r)."""
    g = torch.Generator().manual_seed(seed)
    t = 3 * torch.randn(*lead, vocab, generator=g, dtype=torch.float64)
    values, idx = torch.log_softmax(t / store_temperature, -1).topk(k, dim=-1)
    flat_v, flat_i = values.view(-1, k), idx.view(-1, k)
    for r in range(1, min(k, flat_v.shape[0])):
        flat_v[r, r:] = -float("inf")
        flat_i[r, r:] = -1
    return SparseTeacher(idx, values.float(), tail, store_temperature)


def _grad_of(out, leaves):
    up = torch.linspace(0.5, 1.5, out.loss.numel()).reshape(out.loss.shape)
    (out.loss * up).sum().backward()
    return [None if x is None else x.grad for x in leaves]


def _logits_cell(rank, world, group, teacher_kind, divergence, options, uneven):
    """Student logits against dense teacher logits or a sparse teacher."""
    vocab = 503
    widths = _shards(vocab, world, uneven)
    offset, width = sum(widths[:rank]), widths[rank]
    cols = slice(offset, offset + width)
    g = torch.Generator().manual_seed(7)
    s = 3 * torch.randn(3, 5, vocab, generator=g)
    starts = torch.tensor([sum(widths[:r]) for r in range(world)])
    y = (starts[torch.arange(15) % world] + torch.arange(15) % 3).reshape(3, 5)
    y[0, 1] = y[2, 4] = -100
    if teacher_kind == "sparse":
        summed = options.get("reduction") == "sum"
        tail = "renormalize" if divergence == "forward_kl" and summed else "ghost"
        teacher = _sparse_teacher((3, 5), vocab, 9, tail, seed=8)
        mine = teacher
    else:
        teacher = 3 * torch.randn(3, 5, vocab, generator=g)
        mine = teacher[..., cols]
    kwargs = dict(divergence=divergence, beta=0.3, **options)
    x = s[..., cols].clone().requires_grad_()
    with CountingCollectives() as counter:
        out = kdfused.fused_distill_loss(
            x, mine, y, return_components=True, process_group=group, **kwargs
        )
        forward_calls = list(counter.calls)
        (grad,) = _grad_of(out, [x])
    assert counter.calls == forward_calls, "a collective in backward"
    full = s.clone().requires_grad_()
    want = kdfused.fused_distill_loss(full, teacher, y, return_components=True, **kwargs)
    (want_grad,) = _grad_of(want, [full])
    for field in ("loss", "hard_loss", "soft_loss"):
        torch.testing.assert_close(getattr(out, field), getattr(want, field), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, want_grad[..., cols], rtol=2e-5, atol=1e-7)
    if teacher_kind == "sparse":
        ref = kdfused.reference.sparse_distill_loss(
            s.double(),
            teacher.indices,
            teacher.logprobs.double(),
            y,
            tail=teacher.tail,
            store_temperature=teacher.store_temperature,
            **kwargs,
        )
    else:
        ref = kdfused.reference.distill_loss(s.double(), teacher.double(), y, **kwargs)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert all(c in GATHERS for c in forward_calls), forward_calls
    assert len(forward_calls) == expected_collectives(teacher_kind, divergence), forward_calls


def _linear_cell(rank, world, group, teacher_kind, divergence, reduction):
    """Hidden states + each rank's weight rows against the teacher's weight
    rows, its shard of dense logits, or a sparse teacher: the loss, the weight
    and bias rows' gradients and the sum over ranks of the hidden states'
    gradient equal the single-process loss's, whatever the chunk size."""
    vocab, hs, ht = 211, 12, 16
    widths = _shards(vocab, world, True)
    offset, width = sum(widths[:rank]), widths[rank]
    rows = slice(offset, offset + width)
    g = torch.Generator().manual_seed(9)
    h = torch.randn(2, 9, hs, generator=g)
    w = torch.randn(vocab, hs, generator=g) * 0.8
    b = torch.randn(vocab, generator=g)
    th = torch.randn(2, 9, ht, generator=g)
    tw = torch.randn(vocab, ht, generator=g) * 0.8
    tl = 3 * torch.randn(2, 9, vocab, generator=g)
    y = torch.randint(0, vocab, (2, 9), generator=g)
    y[0, 3] = -100
    tail = "renormalize" if divergence == "forward_kl" and reduction == "sum" else "ghost"
    sparse_teacher = _sparse_teacher((2, 9), vocab, 7, tail, seed=10)
    opts = dict(
        divergence=divergence,
        reduction=reduction,
        chunk_size=5,
        student_softcap=6.0,
        student_logit_scale=0.8,
        label_smoothing=0.05,
        alpha=0.4,
    )

    def teacher_args(shard):
        if teacher_kind == "hidden":
            return dict(teacher_hidden=th, teacher_weight=tw[rows] if shard else tw)
        if teacher_kind == "logits":
            return dict(teacher_logits=tl[..., rows] if shard else tl)
        return dict(teacher=sparse_teacher)

    leaves = [x.clone().requires_grad_() for x in (h, w[rows], b[rows])]
    with CountingCollectives() as counter:
        out = kdfused.fused_linear_distill_loss(
            leaves[0],
            leaves[1],
            y,
            student_bias=leaves[2],
            process_group=group,
            return_components=True,
            **teacher_args(True),
            **opts,
        )
        grads = _grad_of(out, leaves)
    full = [x.clone().requires_grad_() for x in (h, w, b)]
    want = kdfused.fused_linear_distill_loss(
        full[0],
        full[1],
        y,
        student_bias=full[2],
        return_components=True,
        **teacher_args(False),
        **opts,
    )
    want_grads = _grad_of(want, full)
    for field in ("loss", "hard_loss", "soft_loss"):
        torch.testing.assert_close(getattr(out, field), getattr(want, field), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grads[1], want_grads[1][rows], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[2], want_grads[2][rows], rtol=1e-4, atol=1e-6)
    hidden_grad = grads[0].clone()
    dist.all_reduce(hidden_grad, group=group)  # what the layer before the lm_head does
    torch.testing.assert_close(hidden_grad, want_grads[0], rtol=1e-4, atol=1e-6)
    full64 = [x.detach().double() for x in (h, w, b)]
    ref_teacher = {
        k: (v.double() if isinstance(v, torch.Tensor) else v)
        for k, v in teacher_args(False).items()
    }
    ref = kdfused.reference.fused_linear_distill_loss(
        full64[0], full64[1], y, student_bias=full64[2], **ref_teacher, **opts
    )
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert len(counter.calls) == expected_collectives(teacher_kind, divergence), counter.calls


def _grid(rank, world, group):
    for uneven in (False, True):
        for teacher_kind in ("logits", "sparse"):
            for divergence in DIVERGENCES:
                for options in (
                    dict(temperature=2.0, alpha=0.5, reduction="batchmean"),
                    dict(temperature=1.0, alpha=0.3, reduction="none", label_smoothing=0.1),
                    dict(temperature=3.0, alpha=0.0, reduction="sum", scale_by_t2=False),
                    dict(temperature=2.0, alpha=0.5, num_items_in_batch=40),
                ):
                    _logits_cell(rank, world, group, teacher_kind, divergence, options, uneven)
    for teacher_kind in ("hidden", "logits", "sparse"):
        for divergence, reduction in (
            ("forward_kl", "batchmean"),
            ("jsd", "none"),
            ("reverse_kl", "sum"),
            ("forward_kl", "sum"),
        ):
            _linear_cell(rank, world, group, teacher_kind, divergence, reduction)


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
    (loss * 0.5).backward()
    full = s.clone().requires_grad_()
    want = kdfused.fused_distill_loss(full, t, y, divergence="jsd")
    (want * 0.5).backward()
    torch.testing.assert_close(loss, want, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(ds.grad.full_tensor(), full.grad, rtol=2e-5, atol=1e-7)
    # A sparse teacher with DTensor student logits: the mesh gives the group.
    teacher = _sparse_teacher((4, 6), vocab, 5, "ghost", seed=12)
    ds.grad = None
    loss = kdfused.FusedDistillLoss(divergence="reverse_kl")(ds, teacher, dy)
    loss.backward()
    full.grad = None
    want = kdfused.fused_distill_loss(full, teacher, y, divergence="reverse_kl")
    want.backward()
    torch.testing.assert_close(loss, want, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(ds.grad.full_tensor(), full.grad, rtol=2e-5, atol=1e-7)


def _raises_everywhere(fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


def _errors(rank, world, group):
    """Bad input, or ranks that disagree, raise the same error on every rank
    (in the user's words), and the group still works after."""
    vocab = 64
    widths = _shards(vocab, world, True)
    offset, width = sum(widths[:rank]), widths[rank]
    cols = slice(offset, offset + width)
    g = torch.Generator().manual_seed(5)  # the same logits on every rank
    s, t = torch.randn(6, vocab, generator=g), torch.randn(6, vocab, generator=g)
    y = torch.tensor([1, 2, 3, -100, 7, 9])
    shard = dict(process_group=group)

    def loss(student=None, teacher=None, labels=y, **kw):
        student = s[:, cols] if student is None else student
        teacher = t[:, cols] if teacher is None else teacher
        return kdfused.fused_distill_loss(student, teacher, labels, **{**shard, **kw})

    bad = y.clone()
    bad[2] = vocab  # just outside the group's vocabulary, on every rank
    _raises_everywhere(
        lambda: loss(labels=bad), ValueError, rf"labels\[2\] = {vocab} is outside the group's"
    )
    alpha = 0.5 if rank == 0 else 0.3
    _raises_everywhere(
        lambda: loss(alpha=alpha),
        ValueError,
        r"disagree on alpha: rank 0 0\.5, rank 1 0\.3",
    )
    divergence = "forward_kl" if rank == 0 else "jsd"
    _raises_everywhere(
        lambda: loss(divergence=divergence),
        ValueError,
        r"disagree on divergence: rank 0 'forward_kl', rank 1 'jsd'",
    )
    # Labels that are the same multiset in another order.
    permuted = y.clone()
    if rank == 1:
        permuted[[0, 1]] = permuted[[1, 0]]
    _raises_everywhere(
        lambda: loss(labels=permuted), ValueError, r"disagree on labels: .*same order"
    )
    # Different num_items_in_batch.
    _raises_everywhere(
        lambda: loss(num_items_in_batch=10 + rank),
        ValueError,
        r"disagree on num_items_in_batch: rank 0 10, rank 1 11",
    )
    # A different number of rows: no input-sized collective runs (gloo would
    # abort the process on mismatched sizes).
    rows = 6 if rank == 0 else 4
    _raises_everywhere(
        lambda: loss(s[:rows, cols], t[:rows, cols], y[:rows]),
        ValueError,
        r"disagree on rows: rank 0 6, rank 1 4",
    )
    # Dtypes.
    s16 = s[:, cols].to(torch.bfloat16) if rank == 1 else s[:, cols]
    _raises_everywhere(lambda: loss(student=s16), ValueError, r"disagree on the student's dtype")
    # One rank's input rejected by validation: it raises its own error, the
    # others learn of it (nobody waits in a collective).
    wrong = y.to(torch.int32) if rank == world - 1 else y
    if rank == world - 1:
        _raises_everywhere(lambda: loss(labels=wrong), TypeError, "labels must have dtype")
    else:
        _raises_everywhere(
            lambda: loss(labels=wrong), ValueError, rf"rank {world - 1} of the process group"
        )
    # A rank with an empty shard.
    empty = 0 if rank == world - 1 else width
    _raises_everywhere(
        lambda: loss(s[:, offset : offset + empty], t[:, offset : offset + empty], None, alpha=0),
        ValueError,
        "at least one column",
    )
    # A sparse teacher that differs between ranks.
    teacher = _sparse_teacher((6,), vocab, 4, "ghost", seed=20 + (rank == 1))
    _raises_everywhere(
        lambda: loss(teacher=teacher), ValueError, r"disagree on the sparse teacher's"
    )
    # The fused-linear loss: hidden states that differ between ranks.
    h = torch.randn(6, 8, generator=torch.Generator().manual_seed(30 + (rank == 1)))
    w = torch.randn(width, 8)
    _raises_everywhere(
        lambda: kdfused.fused_linear_distill_loss(
            h, w, y, teacher_logits=t[:, cols], process_group=group
        ),
        ValueError,
        r"disagree on student_hidden",
    )
    # After all that, the group still works.
    got = loss()
    torch.testing.assert_close(got, kdfused.fused_distill_loss(s, t, y), rtol=2e-5, atol=2e-6)


def _one_rank(rank, world, group):
    """A group of one is the plain loss: the same bits, no collective."""
    g = torch.Generator().manual_seed(13)
    s, t = 3 * torch.randn(7, 300, generator=g), 3 * torch.randn(7, 300, generator=g)
    y = torch.randint(0, 300, (7,), generator=g)
    teacher = _sparse_teacher((7,), 300, 5, "ghost", seed=14)
    for divergence in DIVERGENCES:
        for t_ in (t, teacher):
            x, z = s.clone().requires_grad_(), s.clone().requires_grad_()
            with CountingCollectives() as counter:
                got = kdfused.fused_distill_loss(
                    x, t_, y, divergence=divergence, process_group=group
                )
                got.backward()
            want = kdfused.fused_distill_loss(z, t_, y, divergence=divergence)
            want.backward()
            assert torch.equal(got, want) and torch.equal(x.grad, z.grad)
            assert counter.calls == []


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


def run_ranks(world, parts, timeout=300, target=_worker):
    """Runs parts on `world` gloo ranks; every rank must finish, none hang or
    die by a signal."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=target, args=(r, world, init_file, tmp, parts)) for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout)
        errors = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                errors.append(f"rank {r} hung")
            elif p.exitcode is not None and p.exitcode < 0:
                errors.append(f"rank {r} died by {signal.Signals(-p.exitcode).name}")
            path = os.path.join(tmp, f"rank{r}.err")
            if os.path.exists(path):
                errors.append(f"rank {r}:\n" + open(path).read())
            elif p.exitcode != 0 and not errors:
                errors.append(f"rank {r} exited with {p.exitcode}")
        assert not errors, "\n".join(errors)


@pytest.mark.parametrize("world", [2, 4])
def test_grid(world):
    """Every student x teacher cell under a group of 2 and 4 ranks."""
    run_ranks(world, ["_grid"])


@pytest.mark.parametrize("world", [2, 3])
def test_errors_on_every_rank(world):
    run_ranks(world, ["_errors"], timeout=180)


def test_dtensor_logits():
    run_ranks(2, ["_dtensor"])


def test_single_rank_group_is_the_plain_loss():
    """W = 1: the same numbers as without a group."""
    run_ranks(1, ["_one_rank"])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_phases_in_one_process(divergence):
    """The CPU phase ops on three shards of each row, merged in one process:
    the loss and each shard's gradient of the plain kernel."""
    from test_cuda_emulated import check_phases

    check_phases(torch.ops.kdfused, "cpu", divergence, torch.float32, (17, 600, 1386))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_phases_in_one_process(divergence, dtype):
    """The CPU sparse phase ops on three shards of each row, merged in one
    process: the loss and each shard's gradient of the single-process sparse
    kernel (bfloat16: the float64 reference's 2x rule)."""
    from test_cuda_emulated import check_sparse_phases

    check_sparse_phases(torch.ops.kdfused, "cpu", divergence, dtype, (17, 600, 1386))
    if divergence == "forward_kl":
        check_sparse_phases(torch.ops.kdfused, "cpu", divergence, dtype, (40, 300), "renormalize")


def test_sparse_merge_rejects_bad_ids_and_labels():
    """The merge checks the kept ids against the whole vocabulary, as the
    single-process kernel does, with its ValueErrors."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 70, generator=g)
    idx = torch.stack([torch.randperm(70, generator=g)[:4] for _ in range(3)])
    lp = torch.log_softmax(torch.randn(3, 70, generator=g), -1).gather(1, idx)
    opts = (2.0, 1.0, "ghost", 0.0, "forward_kl", 0.5, -100, True, 0.0)

    def merge(ids, y=None, merge_labels=None):
        stats = torch.stack(
            [
                torch.ops.kdfused.sparse_shard_stats(a, ids, lp, y, None, *opts, o, 70)
                for a, o in ((s[:, :30], 0), (s[:, 30:], 30))
            ]
        )
        y_merge = y if merge_labels is None else merge_labels
        return torch.ops.kdfused.sparse_shard_merge(stats, ids, lp, y_merge, *opts)

    bad = idx.clone()
    bad[2, 3] = 70
    with pytest.raises(ValueError, match=r"indices\[2, 3\] = 70 is outside \[0, V\) with V = 70"):
        merge(bad)
    bad[2, 3] = bad[2, 1]
    with pytest.raises(ValueError, match=r"indices\[2, 3\] = .* repeats an id kept earlier"):
        merge(bad)
    y = torch.tensor([1, 2, 3])
    merge(idx, y)
    with pytest.raises(ValueError, match=r"labels\[2\] = 70 is outside \[0, V\) with V = 70"):
        merge(idx, y, torch.tensor([1, 2, 70]))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
