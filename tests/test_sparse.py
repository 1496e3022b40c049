"""The sparse teacher (docs/design.md, "The sparse teacher"): the fused kernel against the
float64 reference, top-k extraction, the safetensors store, and bad input."""

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F
from oracle import DEVICES, assert_2x_of_torch, make_labels, make_logits

import kdfused
from kdfused import SparseTeacher, ops, reference, sparse

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


def make_teacher(
    lead,
    vocab,
    k,
    *,
    store_temperature=1.0,
    tail="ghost",
    dtype=torch.float32,
    device="cpu",
    seed=0,
    pad_rows=(),
):
    """A teacher's top k at store_temperature, with some rows padded: row r of
    pad_rows keeps only its first r entries (-1 / -inf after them)."""
    t = make_logits((*lead, vocab), torch.float64, seed=seed + 7)
    logp = torch.log_softmax(t / store_temperature, -1)
    values, idx = logp.topk(k, dim=-1)
    flat_v, flat_i = values.view(-1, k), idx.view(-1, k)
    for r in pad_rows:
        flat_v[r, r:] = -float("inf")
        flat_i[r, r:] = -1
    return SparseTeacher(idx.to(device), values.to(device, dtype), tail, store_temperature), t


def run_sparse(student, teacher, labels, upstream=None, **options):
    s = student.detach().clone().requires_grad_()
    out = kdfused.fused_distill_loss(s, teacher, labels, return_components=True, **options)
    up = torch.ones_like(out.loss) if upstream is None else upstream.to(out.loss)
    (out.loss * up).sum().backward()
    return out, s.grad


def run_sparse_reference(student, teacher, labels, upstream=None, dtype=None, **options):
    s = student.detach().cpu()
    lp = teacher.logprobs.cpu()
    if dtype is not None:
        s, lp = s.to(dtype), lp.to(dtype)
    s.requires_grad_()
    out = reference.sparse_distill_loss(
        s,
        teacher.indices.cpu(),
        lp,
        None if labels is None else labels.cpu(),
        tail=teacher.tail,
        store_temperature=teacher.store_temperature,
        return_components=True,
        **options,
    )
    up = torch.ones_like(out.loss) if upstream is None else upstream.cpu().to(out.loss)
    (out.loss * up).sum().backward()
    return out, s.grad


def _log_prob_size(student_logits, teacher, labels, **options):
    """The size of the float32 intermediates a loss value is formed from (as
    oracle._log_prob_size for dense teachers): the soft weight times the
    largest finite |log p| of the student (at T and 1) and of the teacher's
    re-tempered log-weights (x the counted rows for "sum")."""
    t_ = options.get("temperature", 2.0)
    weight = t_**2 if options.get("scale_by_t2", True) else 1.0
    s = student_logits.detach().cpu().double()
    logs = [torch.log_softmax(s / tt, -1) for tt in (t_, 1.0)]
    logs.append(teacher.logprobs.detach().cpu().double() * teacher.store_temperature / t_)
    biggest = max(
        (x[torch.isfinite(x)].abs().max().item() for x in logs if torch.isfinite(x).any()),
        default=0.0,
    )
    rows = 1
    if options.get("reduction", "batchmean") == "sum":
        rows = s[..., 0].numel() if labels is None else int((labels != -100).sum())
    return max(weight, 1.0) * biggest * max(rows, 1)


def check_sparse(student, teacher, labels, upstream=None, **options):
    """Kernel vs the float64 reference, PyTorch in the inputs' dtype as the
    yardstick (flash-attention's 2x rule): loss, components, gradient."""
    out, grad = run_sparse(student, teacher, labels, upstream, **options)
    pt, pt_grad = run_sparse_reference(student, teacher, labels, upstream, **options)
    ref, ref_grad = run_sparse_reference(
        student, teacher, labels, upstream, torch.float64, **options
    )
    assert out.loss.dtype == torch.float32
    assert grad.dtype == student.dtype and grad.shape == student.shape
    size = _log_prob_size(student, teacher, labels, **options)
    for field in ("loss", "hard_loss", "soft_loss"):
        assert_2x_of_torch(
            field, getattr(out, field), getattr(pt, field), getattr(ref, field), size
        )
    assert_2x_of_torch("grad", grad, pt_grad, ref_grad)
    return out, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature,store_temperature", [(1.0, 1.0), (2.0, 1.0), (1.5, 3.0)])
def test_ghost_against_reference(device, divergence, temperature, store_temperature):
    vocab, k = 257, 16
    s = make_logits((3, 7, vocab), device=device, seed=1)
    teacher, _ = make_teacher(
        (3, 7), vocab, k, store_temperature=store_temperature, device=device, pad_rows=(0, 1, 5)
    )
    y = make_labels((3, 7), vocab, "some", device=device)
    check_sparse(s, teacher, y, temperature=temperature, divergence=divergence, beta=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
def test_renormalize_against_reference(device, reduction, alpha, temperature):
    vocab, k = 300, 9
    s = make_logits((11, vocab), device=device, seed=2)
    teacher, _ = make_teacher((11,), vocab, k, tail="renormalize", device=device, pad_rows=(0, 4))
    y = make_labels((11,), vocab, "some", device=device)
    upstream = torch.rand(11, device=device) if reduction == "none" else None
    check_sparse(s, teacher, y, upstream, temperature=temperature, alpha=alpha, reduction=reduction)


def test_sampled_teacher_weights():
    """Random-sampling KD: ids drawn from the teacher with count / draws as
    weights (summing to 1) and tail='renormalize'."""
    vocab, draws = 120, 50
    s = make_logits((5, vocab), seed=3)
    t = make_logits((5, vocab), torch.float64, seed=4)
    g = torch.Generator().manual_seed(5)
    samples = torch.multinomial(torch.softmax(t, -1), draws, replacement=True, generator=g)
    counts = torch.zeros(5, vocab).scatter_add_(1, samples, torch.ones(5, draws))
    k = int((counts > 0).sum(-1).max())
    weights, ids = counts.topk(k, dim=-1)
    ids = torch.where(weights > 0, ids, -1)
    logprobs = torch.where(weights > 0, (weights / draws).log(), -float("inf"))
    teacher = SparseTeacher(ids, logprobs, "renormalize")
    check_sparse(s, teacher, None, alpha=0.0, temperature=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_equal_vocab_is_the_dense_loss(device, divergence):
    """k = V at T = store_temperature: the k + 1 buckets are the vocabulary
    (the tails are exactly 0) and the loss is the dense loss."""
    vocab = 97
    s = make_logits((6, vocab), device=device, seed=6)
    teacher, t = make_teacher((6,), vocab, vocab, store_temperature=2.0, device=device)
    y = make_labels((6,), vocab, "some", device=device)
    out, grad = run_sparse(s, teacher, y, temperature=2.0, divergence=divergence, beta=0.4)
    dense, dense_grad = run_sparse_reference(
        s, teacher, y, dtype=torch.float64, temperature=2.0, divergence=divergence, beta=0.4
    )
    ref = reference.distill_loss(
        s.double().cpu(), t, y.cpu(), temperature=2.0, divergence=divergence, beta=0.4
    )
    torch.testing.assert_close(dense.loss, ref)
    torch.testing.assert_close(out.loss.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), dense_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_k1_and_ignored_rows(device):
    vocab = 64
    s = make_logits((2, 4, vocab), device=device, seed=8)
    teacher, _ = make_teacher((2, 4), vocab, 1, device=device)
    y = make_labels((2, 4), vocab, "some", device=device)
    out, grad = check_sparse(s, teacher, y, divergence="jsd")
    ignored = y == -100
    assert torch.all(grad[ignored] == 0)
    all_ignored = torch.full_like(y, -100)
    out, grad = run_sparse(s, teacher, all_ignored)
    assert out.loss.item() == 0 and torch.all(grad == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_16_bit_logits_and_logprobs(device, dtype, divergence):
    """fp16 / bf16 student logits and stored log-probs: within 2x of PyTorch's
    own error in that dtype (float64 reference)."""
    vocab, k = 1031, 32
    s = make_logits((9, vocab), dtype, device, seed=9)
    teacher, _ = make_teacher((9,), vocab, k, dtype=dtype, device=device, pad_rows=(3,))
    y = make_labels((9,), vocab, "some", device=device)
    check_sparse(s, teacher, y, divergence=divergence, reduction="none")


@pytest.mark.parametrize("device", DEVICES)
def test_confident_student_tail(device):
    """A student whose kept ids hold all but ~1e-12 of its mass: the tail is
    summed on its own, not as 1 - sum p_s[kept], which would be 0 in float32
    and make the loss inf."""
    vocab = 50
    s = torch.full((2, vocab), -30.0, device=device)
    s[:, :4] = torch.tensor([10.0, 9.0, 8.0, 7.0], device=device)
    ids = torch.arange(4, device=device).expand(2, 4).contiguous()
    lp = torch.log(torch.tensor([0.5, 0.2, 0.1, 0.1], device=device)).expand(2, 4).contiguous()
    teacher = SparseTeacher(ids, lp, "ghost", 1.0)
    out, grad = run_sparse(s, teacher, None, alpha=0.0, temperature=1.0)
    ref, ref_grad = run_sparse_reference(
        s, teacher, None, dtype=torch.float64, alpha=0.0, temperature=1.0
    )
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.double().cpu(), ref.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_module_options_and_micro_batches(device):
    """FusedDistillLoss takes the teacher; label smoothing; num_items_in_batch
    splits a batch into micro-batches whose losses and gradients add up."""
    vocab = 211
    s = make_logits((8, vocab), device=device, seed=10)
    teacher, _ = make_teacher((8,), vocab, 12, device=device, store_temperature=2.0)
    y = make_labels((8,), vocab, "some", device=device)
    check_sparse(s, teacher, y, label_smoothing=0.1)
    loss_fn = kdfused.FusedDistillLoss(temperature=2.0)
    whole = s.detach().clone().requires_grad_()
    loss_fn(whole, teacher, y).backward()
    parts = s.detach().clone().requires_grad_()
    count = int((y != -100).sum())
    total = sum(
        loss_fn(parts[a:b], teacher[a:b], y[a:b], num_items_in_batch=count)
        for a, b in ((0, 3), (3, 8))
    )
    total.backward()
    torch.testing.assert_close(total, loss_fn(whole.detach(), teacher, y))
    torch.testing.assert_close(parts.grad, whole.grad)


def test_no_grad_allocates_no_gradient():
    s = make_logits((4, 100), seed=11)
    teacher, _ = make_teacher((4,), 100, 5)
    flat = teacher.flatten()
    _, _, grad = ops.sparse_distill_forward(
        s,
        flat.indices,
        flat.logprobs,
        None,
        None,
        compute_grad=False,
        temperature=2.0,
        store_temperature=1.0,
        tail="ghost",
        alpha=0.0,
        divergence="forward_kl",
        beta=0.5,
        ignore_index=-100,
        scale_by_t2=True,
    )
    assert grad.numel() == 0


# ---- top-k ------------------------------------------------------------------


def _torch_topk(t, k, temperature):
    """What sparse.topk must return: a stable sort of log_softmax (ties in id order)."""
    logp = torch.log_softmax(t.double() / temperature, -1)
    values, idx = torch.sort(logp, dim=-1, descending=True, stable=True)
    return idx[..., :k], values[..., :k]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5, 64])
def test_topk_against_torch(device, dtype, k):
    t = make_logits((3, 4, 1000), dtype, device, seed=13)
    got = sparse.topk(t, k, temperature=2.0)
    idx, values = _torch_topk(t.cpu(), k, 2.0)
    assert isinstance(got, SparseTeacher) and got.shape == (3, 4) and got.k == k
    assert got.tail == "ghost" and got.store_temperature == 2.0
    assert torch.equal(got.indices.cpu(), idx)
    torch.testing.assert_close(got.logprobs.double().cpu(), values, rtol=0, atol=2e-6 * 8)
    # Against torch.topk's values too (its tie order is not defined).
    ref_values = torch.topk(torch.log_softmax(t.float() / 2.0, -1), k).values
    torch.testing.assert_close(got.logprobs, ref_values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_ties_take_the_lower_id(device):
    t = torch.zeros(4, 700, device=device)
    t[1, 100:600] = 1.0  # 500 ties for the top
    t[2, ::7] = 2.0
    t[3, 650] = 5.0
    t[3, 10:20] = 4.0
    got = sparse.topk(t, 13)
    idx, values = _torch_topk(t.cpu(), 13, 1.0)
    assert torch.equal(got.indices.cpu(), idx)
    torch.testing.assert_close(got.logprobs.double().cpu(), values, rtol=0, atol=1e-6)


def test_topk_k_equal_vocab_and_masked():
    t = make_logits((2, 33), seed=14)
    t[0, 5:9] = -float("inf")
    got = sparse.topk(t, 33)
    idx, values = _torch_topk(t, 33, 1.0)
    assert torch.equal(got.indices, idx)
    torch.testing.assert_close(got.logprobs.double(), values, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        sparse.topk(t, 34)


def _nan_rows(device, dtype=torch.float32):
    """Rows with a NaN: one among numbers, all NaN, fewer numbers than k."""
    t = make_logits((4, 50), dtype, device, seed=16)
    t[0, 7] = float("nan")
    t[1] = float("nan")
    t[2] = float("nan")
    t[2, 30], t[2, 9] = 2.0, 1.0
    return t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_of_a_nan_row_is_nan(device, dtype):
    """A row with a NaN logit has NaN log-probs and k valid, distinct ids: the
    top k of its numbers, then its NaN ids lowest first (a row of numbers is
    untouched); so the loss on it is NaN, as the dense loss is."""
    t = _nan_rows(device, dtype)
    got = sparse.topk(t, 4)
    ids, lp = got.indices.cpu(), got.logprobs.cpu()
    assert torch.isnan(lp[:3]).all() and torch.isfinite(lp[3]).all()
    top = torch.where(torch.isnan(t[0].float()), -math.inf, t[0].float()).cpu()
    assert ids[0].tolist() == torch.sort(top, descending=True, stable=True).indices[:4].tolist()
    assert ids[1].tolist() == [0, 1, 2, 3]
    assert ids[2].tolist() == [30, 9, 0, 1]
    idx, values = _torch_topk(t[3:].cpu(), 4, 1.0)
    assert torch.equal(ids[3:], idx)
    s = make_logits((4, 50), device=device, seed=17).requires_grad_()
    for teacher in (got, sparse.topk(t, 4, top_p=0.5)):
        loss = kdfused.fused_distill_loss(s, teacher, None, alpha=0.0, reduction="none")
        dense = kdfused.fused_distill_loss(s, t.float(), None, alpha=0.0, reduction="none")
        assert torch.equal(torch.isnan(loss), torch.isnan(dense))
        assert torch.isnan(loss[:3]).all() and torch.isfinite(loss[3])


def test_top_p_of_a_nan_row_keeps_k():
    """top_p: a NaN row never reaches the mass, so it keeps all k (NaN)."""
    got = sparse.topk(_nan_rows("cpu"), 4, top_p=0.5)
    assert got.lengths().tolist()[:3] == [4, 4, 4]
    assert torch.isnan(got.logprobs[:12]).all()
    assert got[2:3].indices.tolist() == [30, 9, 0, 1]


# ---- the store ----------------------------------------------------------------

# The store's tests need its optional dependency (pip install 'kdfused[store]').
needs_safetensors = pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is None,
    reason="safetensors is not installed (the store's optional dependency: kdfused[store])",
)


@needs_safetensors
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    teacher = sparse.topk(make_logits((10, 6, 500), seed=15), 8, temperature=2.0)
    sparse.save(tmp_path / "store", teacher, vocab_size=500, dtype=dtype, shard_rows=16)
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    assert index["rows"] == 60 and [rows for _, rows in index["shards"]] == [16, 16, 16, 12]
    store = sparse.SparseStore(tmp_path / "store", vocab_size=500, k=8)
    assert len(store) == 60 and store.store_temperature == 2.0
    flat = teacher.flatten()
    for a, b in ((0, 60), (5, 37), (16, 32), (59, 60), (30, 30)):
        part = store[a:b]  # ragged rows, 2-byte ids (V = 500)
        assert part.indices.dtype == torch.uint16 and part.logprobs.dtype == dtype
        assert torch.equal(part.padded(8).indices, flat.indices[a:b])
        assert torch.equal(part.padded(8).logprobs, flat.logprobs[a:b].to(dtype))  # bit-exact
    loaded = sparse.load(tmp_path / "store", rows=range(5, 37))
    assert torch.equal(loaded.padded(8).logprobs, flat.logprobs[5:37].to(dtype))


@needs_safetensors
def test_shard_writer_streams(tmp_path):
    """Batches written one after another as a teacher would produce them."""
    batches = [sparse.topk(make_logits((n, 300), seed=16 + n), 4) for n in (7, 20, 3, 1)]
    with sparse.ShardWriter(tmp_path / "s", vocab_size=300, k=4, shard_rows=10) as writer:
        for batch in batches:
            writer.write(batch)
    store = sparse.SparseStore(tmp_path / "s")
    want = torch.cat([b.indices for b in batches])
    assert torch.equal(store[0:31].padded(4).indices, want)
    assert len(list((tmp_path / "s").glob("shard-*.safetensors"))) == 4


def _store(tmp_path):
    teacher = sparse.topk(make_logits((40, 100), seed=20), 5)
    sparse.save(tmp_path / "st", teacher, vocab_size=100, shard_rows=16)
    return tmp_path / "st"


@needs_safetensors
def test_store_errors(tmp_path):
    path = _store(tmp_path)
    with pytest.raises(ValueError, match="vocabulary of 100, expected 128"):
        sparse.SparseStore(path, vocab_size=128)
    with pytest.raises(ValueError, match="k = 5 per row, expected k = 6"):
        sparse.load(path, k=6)
    with pytest.raises(FileExistsError):
        sparse.save(path, sparse.topk(make_logits((2, 100)), 5), vocab_size=100)
    with pytest.raises(ValueError, match="outside"):
        sparse.save(tmp_path / "bad", sparse.topk(make_logits((2, 100)), 5), vocab_size=50)
    with pytest.raises(TypeError, match="contiguous"):
        sparse.SparseStore(path)[::2]


@needs_safetensors
def test_store_truncated_shard(tmp_path):
    path = _store(tmp_path)
    shard = path / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(ValueError, match="shard-00001.safetensors"):
        sparse.SparseStore(path)


@needs_safetensors
def test_store_missing_or_mismatched_files(tmp_path):
    path = _store(tmp_path)
    (path / "shard-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="shard-00002.safetensors is missing"):
        sparse.load(path)
    path = _store(tmp_path / "b")
    index = json.loads((path / "index.json").read_text())
    index["k"] = 6
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="metadata k"):
        sparse.load(path)
    (path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index"):
        sparse.load(path)
    (path / "index.json").unlink()
    with pytest.raises(ValueError, match="index.json is missing"):
        sparse.load(path)


@needs_safetensors
def test_training_from_the_store(tmp_path):
    """A student trained on batches streamed from the store gets the same
    gradients as from the in-memory teacher (the stored dtype aside)."""
    vocab = 150
    teacher = sparse.topk(make_logits((32, vocab), seed=21), 10)
    sparse.save(tmp_path / "st", teacher, vocab_size=vocab, dtype=torch.float32, shard_rows=12)
    store = sparse.SparseStore(tmp_path / "st", vocab_size=vocab)
    s = make_logits((32, vocab), seed=22)
    y = make_labels((32,), vocab)
    for a in range(0, 32, 8):
        got = kdfused.fused_distill_loss(s[a : a + 8], store[a : a + 8], y[a : a + 8])
        want = kdfused.fused_distill_loss(s[a : a + 8], teacher[a : a + 8], y[a : a + 8])
        assert torch.equal(got, want)


# ---- bad input ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    "bad,match",
    [(-2, "outside"), (100, "outside"), ("repeat", "distinct|twice")],
)
def test_bad_indices(backend, bad, match):
    s = make_logits((3, 100), seed=23)
    teacher, _ = make_teacher((3,), 100, 4)
    ids = teacher.indices.clone()
    ids[1, 2] = ids[1, 0] if bad == "repeat" else bad
    bad_teacher = SparseTeacher(ids, teacher.logprobs)
    with pytest.raises(ValueError, match=match):
        kdfused.fused_distill_loss(s, bad_teacher, None, alpha=0.0, backend=backend)


def test_bad_arguments():
    s = make_logits((3, 100), seed=24)
    teacher, _ = make_teacher((3,), 100, 4)
    with pytest.raises(ValueError, match="renormalize"):
        kdfused.fused_distill_loss(
            s,
            SparseTeacher(teacher.indices, teacher.logprobs, "renormalize"),
            None,
            alpha=0.0,
            divergence="jsd",
        )
    with pytest.raises(ValueError, match="leading dims"):
        kdfused.fused_distill_loss(s[:2], teacher, None, alpha=0.0)
    with pytest.raises(ValueError, match="teacher_vocab"):
        kdfused.fused_distill_loss(s, teacher, None, alpha=0.0, teacher_vocab="truncate")
    with pytest.raises(TypeError, match="int32, int64 or uint16"):
        SparseTeacher(teacher.indices.float(), teacher.logprobs)
    with pytest.raises(ValueError, match="same shape"):
        SparseTeacher(teacher.indices[:, :3], teacher.logprobs)
    with pytest.raises(ValueError, match="tail"):
        SparseTeacher(teacher.indices, teacher.logprobs, "zero")
    with pytest.raises(ValueError, match="store_temperature"):
        SparseTeacher(teacher.indices, teacher.logprobs, "ghost", 0.0)


# ---- the fused-linear loss with a sparse teacher ----------------------------------


def _linear_run(fn, h, w, b, y, teacher, upstream, dtype=None, **options):
    cast = (lambda x: x) if dtype is None else (lambda x: x.detach().cpu().to(dtype))
    leaves = [None if x is None else cast(x).detach().requires_grad_() for x in (h, w, b)]
    if dtype is not None:
        teacher = SparseTeacher(
            teacher.indices.cpu(),
            teacher.logprobs.cpu().to(dtype),
            teacher.tail,
            teacher.store_temperature,
        )
        y = None if y is None else y.cpu()
    out = fn(
        leaves[0],
        leaves[1],
        y,
        student_bias=leaves[2],
        teacher_logits=teacher,
        return_components=True,
        **options,
    )
    up = torch.ones_like(out.loss) if upstream is None else upstream.to(out.loss)
    (out.loss * up).sum().backward()
    return out, [None if x is None else x.grad for x in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_sparse_teacher(device, divergence, reduction, dtype):
    """FusedLinearDistillLoss takes a sparse teacher: chunk by chunk through
    the sparse kernel, against the float64 reference (logits materialised)."""
    g = torch.Generator().manual_seed(30)
    vocab, hidden = 173, 12
    h = torch.randn(3, 25, hidden, generator=g, dtype=torch.float64).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.9).to(device, dtype)
    b = torch.randn(vocab, generator=g, dtype=torch.float64).to(device, dtype)
    teacher, _ = make_teacher(
        (3, 25), vocab, 11, store_temperature=1.5, device=device, pad_rows=(0, 7)
    )
    y = make_labels((3, 25), vocab, "some", device=device)
    upstream = torch.rand(3, 25, device=device) if reduction == "none" else None
    options = dict(divergence=divergence, reduction=reduction, temperature=2.0, chunk_size=16)
    out, grads = _linear_run(
        kdfused.fused_linear_distill_loss, h, w, b, y, teacher, upstream, **options
    )
    ref_fn = kdfused.reference.fused_linear_distill_loss
    pt, pt_grads = _linear_run(ref_fn, h, w, b, y, teacher, upstream, **options)
    ref, ref_grads = _linear_run(ref_fn, h, w, b, y, teacher, upstream, torch.float64, **options)
    for field in ("loss", "hard_loss", "soft_loss"):
        size = _log_prob_size(F.linear(h.double(), w.double(), b.double()), teacher, y, **options)
        assert_2x_of_torch(
            field, getattr(out, field), getattr(pt, field), getattr(ref, field), size
        )
    for name, got, same, want in zip(
        ("hidden", "weight", "bias"), grads, pt_grads, ref_grads, strict=True
    ):
        assert got.dtype == dtype and got.device.type == device
        assert_2x_of_torch(f"grad of {name}", got, same, want)
    module = kdfused.FusedLinearDistillLoss(
        divergence=divergence, reduction=reduction, chunk_size=7
    )
    again = module(h, w, None, None, y, student_bias=b, teacher_logits=teacher)
    torch.testing.assert_close(again, out.loss, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [1, 3])
def test_student_rows_off_a_pack_boundary(device, offset):
    """Student rows that start off a 16-byte boundary (a view at an odd
    storage offset) while the gradient, a new tensor, starts on one: on CUDA
    the gradient's packed stores give way to single ones there. The numbers
    are the contiguous copy's."""
    n, vocab = 4, 2056
    base = make_logits((n * vocab + 8,), torch.bfloat16, device=device, seed=171)
    s = base[offset : offset + n * vocab].view(n, vocab)
    teacher, _ = make_teacher((n,), vocab, 13, device=device)
    y = make_labels((n,), vocab, "some", device=device)
    leaf = s.detach().requires_grad_()
    assert leaf.storage_offset() == offset
    loss = kdfused.fused_distill_loss(leaf, teacher, y, temperature=2.0)
    loss.backward()
    out_c, grad_c = run_sparse(s.clone(), teacher, y, temperature=2.0)
    torch.testing.assert_close(loss, out_c.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(leaf.grad, grad_c)
