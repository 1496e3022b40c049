"""Every op the library registers, from its registered schema: its fake
(kdfused.ops.FAKES) takes exactly the schema's arguments, by name, order and
default, and torch.library.opcheck passes on it (schema, fake, autograd
registration, the dispatcher's checks). A new op without a fake or a sample
here fails the first two tests."""

import inspect

import pytest
import torch

from kdfused import ops

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="needs kdfused's CPU kernel")

# Ops that are host functions, not tensor ops (no fake: torch.compile does
# not trace them).
HOST_OPS = {"cpu_capability", "build_config"}


def _registered():
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("kdfused::")]
    return sorted(n.split("::", 1)[1] for n in names)


def _schema(name):
    return getattr(torch.ops.kdfused, name).default._schema


def test_every_op_has_a_fake_with_its_schema():
    registered = [n for n in _registered() if n not in HOST_OPS]
    assert set(registered) == set(ops.FAKES), (
        f"ops without a fake: {sorted(set(registered) - set(ops.FAKES))}; "
        f"fakes without an op: {sorted(set(ops.FAKES) - set(registered))}"
    )
    for name in registered:
        schema = _schema(name)
        params = list(inspect.signature(ops.FAKES[name]).parameters.values())
        assert [p.name for p in params] == [a.name for a in schema.arguments], name
        for p, a in zip(params, schema.arguments, strict=True):
            want = inspect.Parameter.empty if not a.has_default_value() else a.default_value
            assert p.default == want, f"{name}: default of {a.name}: {p.default} vs {want}"


def _loss(alpha=0.3):
    return (2.0, alpha, "jsd", 0.4, -100, True)


def _samples():
    """(op name, args) for every op, valid inputs of a few rows."""
    g = torch.Generator().manual_seed(0)
    n, v, k = 5, 37, 4
    s = 3 * torch.randn(n, v, generator=g)
    t = 3 * torch.randn(n, v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[1] = -100
    scale = torch.tensor(0.25)
    idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    idx[2, -1] = -1
    lp = torch.log_softmax(torch.randn(n, v, generator=g), -1).gather(1, idx.clamp(min=0))
    lp[2, -1] = -float("inf")
    sparse_opts = (2.0, 1.5, "ghost", 0.3, "jsd", 0.4, -100, True)
    shard = (0.1, 5, 50)  # label_smoothing, column_offset, vocab
    stats = ops.distill_stats(s, t, None, **_phase_kwargs(5, 50))
    consts, _, _ = ops.distill_merge(
        torch.stack([stats, stats]), None, **_phase_kwargs(5, 50, merge=True)
    )
    # A sparse teacher over two shards of 37 columns (V = 74): s and t.
    sparse_shard = (0.1, 0, 2 * v)
    sparse_stats = torch.stack(
        [
            ops.sparse_shard_stats(x, idx, lp, y, **_sparse_phase_kwargs(o, 2 * v))
            for x, o in ((s, 0), (t, v))
        ]
    )
    merged, _, _ = ops.sparse_shard_merge(
        sparse_stats, idx, lp, y, **_sparse_phase_kwargs(0, 0, merge=True)
    )
    return {
        "sparse_shard_stats": (s, idx, lp, y, None, *sparse_opts, *sparse_shard),
        "sparse_shard_merge": (sparse_stats, idx, lp, y, *sparse_opts, 0.1),
        "sparse_shard_grad": (s, idx, lp, y, scale, *sparse_opts, *sparse_shard, merged),
        "distill_forward": (s, t, y, scale, *_loss(), True, 0.1),
        "distill_forward_out": (s, t, y, scale, *_loss(), torch.empty_like(s), 0.1),
        "distill_forward_inplace": (s.clone(), t, y, scale, *_loss(), 0.1),
        "sparse_distill_forward": (s, idx, lp, y, scale, *sparse_opts, True, 0.1),
        "sparse_distill_forward_out": (s, idx, lp, y, scale, *sparse_opts, torch.empty_like(s)),
        "sparse_topk": (t, k, 1.5),
        "distill_stats": (s, t, None, None, *_loss(0.0), *shard),
        "distill_jsd_sums": (s, t, None, None, *_loss(0.0), *shard, consts),
        "distill_grad": (s, t, None, scale, *_loss(0.0), *shard, consts),
        "distill_merge": (torch.stack([stats, stats]), None, 2.0, 0.0, "jsd", 0.4, -100, True, 0.1),
        "distill_jsd_finish": (
            consts,
            torch.rand(2, n, 2, generator=g),
            None,
            2.0,
            0.4,
            -100,
            True,
        ),
    }


def _phase_kwargs(offset, vocab, merge=False):
    opts = dict(
        temperature=2.0,
        alpha=0.0,
        divergence="jsd",
        beta=0.4,
        ignore_index=-100,
        scale_by_t2=True,
        label_smoothing=0.1,
    )
    return opts if merge else dict(opts, column_offset=offset, vocab=vocab)


def _sparse_phase_kwargs(offset, vocab, merge=False):
    opts = dict(
        temperature=2.0,
        store_temperature=1.5,
        tail="ghost",
        alpha=0.3,
        divergence="jsd",
        beta=0.4,
        ignore_index=-100,
        scale_by_t2=True,
        label_smoothing=0.1,
    )
    return opts if merge else dict(opts, column_offset=offset, vocab=vocab)


SAMPLES = _samples() if ops.has_kernel("cpu") else {}


def _keyword_samples():
    """(op name, args, kwargs) for the trailing options a positional sample
    leaves at their defaults: the dense ops' student entropy, with and
    without a gradient."""
    if not SAMPLES:
        return []
    s, t, y, scale, *_ = SAMPLES["distill_forward"]
    loss = _loss()
    on = dict(student_entropy=True)
    cases = {
        "distill_forward": (s, t, y, scale, *loss, True, 0.1),
        "distill_forward-no_grad": (s, t, y, scale, *loss, False, 0.0),
        "distill_forward_out": (s, t, y, scale, *loss, torch.empty_like(s), 0.1),
        "distill_forward_inplace": (s.clone(), t, y, scale, *loss, 0.1),
    }
    return [pytest.param(k.split("-")[0], v, on, id=k) for k, v in cases.items()]


def test_every_op_has_a_sample():
    assert set(SAMPLES) == set(ops.FAKES), sorted(set(ops.FAKES) ^ set(SAMPLES))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.kdfused, name).default, SAMPLES[name])


@pytest.mark.parametrize("name,args,kwargs", _keyword_samples())
def test_opcheck_keywords(name, args, kwargs):
    torch.library.opcheck(getattr(torch.ops.kdfused, name).default, args, kwargs)


def _ragged_samples():
    """The sparse loss ops on ragged rows (offsets given): uint16 ids and
    float16 log-probs, a row of length 0."""
    g = torch.Generator().manual_seed(1)
    n, v = 5, 37
    s = 3 * torch.randn(n, v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    lengths = torch.tensor([3, 0, 4, 1, 2])
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    idx = torch.cat([torch.randperm(v, generator=g)[:m] for m in lengths.tolist()])
    lp = (-torch.rand(idx.shape[0], generator=g) * 4).half()
    opts = (2.0, 1.5, "ghost", 0.3, "jsd", 0.4, -100, True)
    idx = idx.to(torch.uint16)
    return {
        "sparse_distill_forward": (s, idx, lp, y, None, *opts, True, 0.1, offsets),
        "sparse_distill_forward_out": (
            s,
            idx,
            lp,
            y,
            None,
            *opts,
            torch.empty_like(s),
            0.0,
            offsets,
        ),
    }


RAGGED_SAMPLES = _ragged_samples() if ops.has_kernel("cpu") else {}


@pytest.mark.parametrize("name", sorted(RAGGED_SAMPLES))
def test_opcheck_ragged(name):
    torch.library.opcheck(getattr(torch.ops.kdfused, name).default, RAGGED_SAMPLES[name])
