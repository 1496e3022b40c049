"""Ragged sparse teachers (docs/design.md, "The sparse teacher"): the same rows
padded and ragged give the same loss and gradients through every entry point
(logits and fused-linear, every tail and divergence, against the float64
reference); slicing and moving keep them; bad offsets are clear errors;
topk(top_p=) against a float64 sort; a store holds them compactly (2-byte and
3-byte ids) and reads them back bit for bit."""

import math

import pytest
import torch
from oracle import make_labels, make_logits

import kdfused
from kdfused import SparseTeacher, ops, reference, sparse

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="needs kdfused's CPU kernel")
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


def ragged_teacher(n, vocab, k, *, seed=0, store_temperature=1.5, tail="ghost"):
    """A top-k teacher whose rows keep 1 .. k ids (row i keeps 1 + i % k),
    padded and the same rows ragged."""
    t = make_logits((n, vocab), torch.float64, seed=seed)
    values, idx = torch.log_softmax(t / store_temperature, -1).topk(k, dim=-1)
    keep = torch.arange(k)[None, :] <= (torch.arange(n) % k)[:, None]
    idx = torch.where(keep, idx, -1)
    values = torch.where(keep, values, -math.inf).float()
    padded = SparseTeacher(idx, values, tail, store_temperature)
    return padded, padded.compact()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", ["ghost", "renormalize"])
def test_ragged_equals_padded(divergence, tail):
    if tail == "renormalize" and divergence != "forward_kl":
        pytest.skip("renormalize is defined for forward_kl only")
    padded, ragged = ragged_teacher(23, 301, 7, tail=tail)
    assert ragged.ragged and ragged.k == 7 and len(ragged) == 23
    s = make_logits((23, 301), seed=3)
    y = make_labels((23,), 301, "some")
    options = dict(divergence=divergence, temperature=2.0, alpha=0.3, label_smoothing=0.1)
    results = []
    for teacher in (padded, ragged):
        x = s.clone().requires_grad_()
        out = kdfused.fused_distill_loss(x, teacher, y, return_components=True, **options)
        out.loss.backward()
        results.append((out, x.grad))
    for field in ("loss", "hard_loss", "soft_loss"):
        assert torch.equal(getattr(results[0][0], field), getattr(results[1][0], field))
    assert torch.equal(results[0][1], results[1][1])
    x64 = s.double().requires_grad_()
    ref = reference.sparse_distill_loss(
        x64,
        ragged.indices,
        ragged.logprobs.double(),
        y,
        tail=tail,
        store_temperature=1.5,
        offsets=ragged.offsets,
        **options,
    )
    ref.backward()
    torch.testing.assert_close(results[1][0].loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1].double(), x64.grad, rtol=1e-4, atol=1e-7)


def test_ragged_in_the_fused_linear_loss_and_with_leading_dims():
    padded, ragged = ragged_teacher(2 * 9, 211, 6)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 9, 16, generator=g)
    w = torch.randn(211, 16, generator=g)
    y = make_labels((2, 9), 211, "some")
    shaped = SparseTeacher(
        padded.indices.reshape(2, 9, 6), padded.logprobs.reshape(2, 9, 6), "ghost", 1.5
    )
    got = [
        kdfused.fused_linear_distill_loss(h, w, y, teacher=t, chunk_size=5, reduction="none")
        for t in (shaped, ragged)
    ]
    assert got[0].shape == got[1].shape == (2, 9)
    assert torch.equal(got[0], got[1])
    dense = kdfused.fused_distill_loss(h @ w.t(), ragged, y, reduction="none")
    torch.testing.assert_close(got[1], dense, rtol=1e-5, atol=1e-6)


def test_slicing_moving_and_layout_round_trips():
    padded, ragged = ragged_teacher(10, 50, 4)
    part = ragged[3:7]
    assert torch.equal(part.offsets, ragged.offsets[3:8] - ragged.offsets[3])
    assert torch.equal(part.padded(4).indices, padded.indices[3:7])
    assert len(ragged[5:5]) == 0 and ragged[5:5].offsets.tolist() == [0]
    assert torch.equal(ragged.padded().logprobs, padded.logprobs)
    assert torch.equal(ragged.to("cpu").indices, ragged.indices)
    assert ragged.compact() is ragged
    assert ragged.lengths().tolist() == padded.lengths().tolist() == [1 + i % 4 for i in range(10)]
    small = SparseTeacher(ragged.indices.to(torch.uint16), ragged.logprobs, offsets=ragged.offsets)
    assert torch.equal(small.padded().indices, padded.indices)
    with pytest.raises(TypeError, match="contiguous slice"):
        ragged[[1, 2]]


def test_bad_ragged_fields():
    _, ragged = ragged_teacher(6, 40, 3)
    i, lp, off = ragged.indices, ragged.logprobs, ragged.offsets
    with pytest.raises(ValueError, match="offsets must start at 0"):
        SparseTeacher(i, lp, offsets=off + 1)
    with pytest.raises(ValueError, match="end at the number of entries"):
        SparseTeacher(i[:-1], lp[:-1], offsets=off)
    decreasing = off.clone()
    decreasing[2], decreasing[3] = decreasing[3], decreasing[2] - 1
    with pytest.raises(ValueError, match="a decrease"):
        SparseTeacher(i, lp, offsets=decreasing)
    with pytest.raises(TypeError, match="offsets must be an int64"):
        SparseTeacher(i, lp, offsets=off.int())
    with pytest.raises(ValueError, match="1-d indices and logprobs"):
        SparseTeacher(i[None], lp[None], offsets=off)
    with pytest.raises(TypeError, match="uint16 ids have no -1"):
        SparseTeacher(i.to(torch.uint16).view(2, -1), lp.view(2, -1))
    s = make_logits((5, 40))
    with pytest.raises(ValueError, match="6 ragged rows must be the 5 positions"):
        kdfused.fused_distill_loss(s, ragged, None, alpha=0.0)


def _top_p_float64(logits, k, p):
    """The float64 sort's prefix: ids by descending probability (ties: the
    lower id first), the shortest whose mass reaches p, at most k."""
    probs = torch.softmax(logits.double(), -1)
    rows = []
    for row in probs:
        order = sorted(range(len(row)), key=lambda j: (-row[j].item(), j))[:k]
        mass, kept = 0.0, []
        for j in order:
            kept.append(j)
            mass += row[j].item()
            if mass >= p:
                break
        rows.append(kept)
    return rows


@pytest.mark.parametrize("p", [0.3, 0.9, 1.0])
def test_top_p_against_a_float64_sort(p):
    logits = make_logits((40, 200), seed=7, scale=4.0)
    got = sparse.topk(logits, 12, top_p=p)
    want = _top_p_float64(logits, 12, p)
    assert got.ragged and len(got) == 40
    lengths = got.lengths().tolist()
    for i, kept in enumerate(want):
        assert got[i : i + 1].indices.tolist() == kept, i
        assert lengths[i] == len(kept)
    reference_lp = torch.log_softmax(logits.double(), -1)
    flat = torch.cat([reference_lp[i, want[i]] for i in range(40)])
    torch.testing.assert_close(got.logprobs.double(), flat, rtol=0, atol=2e-6)


def test_top_p_bounds():
    logits = make_logits((3, 20))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
            sparse.topk(logits, 4, top_p=bad)
    with pytest.raises(TypeError, match="top_p must be a real number"):
        sparse.topk(logits, 4, top_p="0.9")
    assert sparse.topk(logits, 4, top_p=1.0).lengths().tolist() == [4, 4, 4]


@pytest.mark.parametrize("vocab,id_bytes", [(301, 2), (65536, 2), (70000, 3)])
def test_store_round_trip_and_bytes(tmp_path, vocab, id_bytes):
    """Ragged rows round-trip bit for bit; 2-byte ids up to V = 65536, 3-byte
    above; an entry takes id_bytes + 2 bytes (float16), a row 2 more."""
    n, k = 300, 9
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, k + 1, (n,), generator=g)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    lengths[0] = 2
    rows = [torch.randperm(vocab, generator=g)[:m] for m in lengths.tolist()]
    rows[0] = torch.tensor([vocab - 1, 0])  # the largest id needs every byte
    ids = torch.cat(rows)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    lp = -torch.rand(len(ids), generator=g) * 10
    teacher = SparseTeacher(ids, lp, offsets=offsets)
    sparse.save(tmp_path / "s", teacher, vocab_size=vocab, shard_rows=128)
    store = sparse.SparseStore(tmp_path / "s")
    assert store.id_bytes == id_bytes and store.entries == int(lengths.sum())
    got = store[0:n]
    assert got.ragged and torch.equal(got.offsets, offsets)
    assert torch.equal(got.indices.to(torch.int64), ids)
    assert got.indices.dtype == (torch.uint16 if id_bytes == 2 else torch.int32)
    assert torch.equal(got.logprobs, lp.half())
    middle = store[100:250]
    assert torch.equal(middle.padded(k).indices, teacher[100:250].padded(k).indices)
    files = sorted((tmp_path / "s").glob("shard-*.safetensors"))
    payload = sum(f.stat().st_size for f in files)
    want = int(lengths.sum()) * (id_bytes + 2) + n * 2
    assert want <= payload <= want + 1000 * len(files)
    assert store.verify()


ID_DTYPES = [torch.int64, torch.int32, torch.uint16]
LP_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TAILS_AND_DIVERGENCES = [("ghost", d) for d in DIVERGENCES] + [("renormalize", "forward_kl")]


def _as_ragged(ragged, id_dtype, lp_dtype):
    return SparseTeacher(
        ragged.indices.to(id_dtype),
        ragged.logprobs.to(lp_dtype),
        ragged.tail,
        ragged.store_temperature,
        offsets=ragged.offsets,
    )


def _loss_and_grad(s, teacher, y, **options):
    x = s.clone().requires_grad_()
    out = kdfused.fused_distill_loss(x, teacher, y, return_components=True, **options)
    out.loss.sum().backward()
    return out, x.grad


@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("lp_dtype", LP_DTYPES)
@pytest.mark.parametrize("tail,divergence", TAILS_AND_DIVERGENCES)
def test_kernel_reads_ragged_rows_in_their_dtypes(id_dtype, lp_dtype, tail, divergence):
    """Ragged rows with 8-, 4- or 2-byte ids and 4- or 2-byte log-probs, read
    by the kernel as they are: the numbers of the same rows padded (int64 ids,
    the same log-probs), loss and gradient, bit for bit."""
    padded, ragged = ragged_teacher(19, 157, 6, tail=tail)
    s = make_logits((19, 157), seed=11)
    y = make_labels((19,), 157, "some")
    options = dict(divergence=divergence, temperature=1.5, alpha=0.4, reduction="none")
    want = SparseTeacher(padded.indices, padded.logprobs.to(lp_dtype), tail, 1.5)
    got_out, got_grad = _loss_and_grad(s, _as_ragged(ragged, id_dtype, lp_dtype), y, **options)
    want_out, want_grad = _loss_and_grad(s, want, y, **options)
    for field in ("loss", "hard_loss", "soft_loss"):
        assert torch.equal(getattr(got_out, field), getattr(want_out, field)), field
    assert torch.equal(got_grad, want_grad)
    if id_dtype != torch.uint16:  # padded rows in the narrower dtypes read alike
        narrow = SparseTeacher(padded.indices.to(id_dtype), want.logprobs, tail, 1.5)
        assert torch.equal(_loss_and_grad(s, narrow, y, **options)[1], want_grad)


@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_fused_linear_chunks_slice_the_ragged_rows(id_dtype, chunk_size):
    """The fused-linear chunk loop hands each chunk its rows' slice of the
    ragged entries (offsets rebased to 0): the padded teacher's loss and
    gradients, rows of length 0 included."""
    padded, ragged = ragged_teacher(13, 97, 5)
    lengths = ragged.lengths()
    keep = torch.repeat_interleave(torch.arange(13) != 4, lengths)  # row 4 keeps nothing
    offsets = torch.zeros(14, dtype=torch.int64)
    torch.cumsum(torch.where(torch.arange(13) == 4, 0, lengths), 0, out=offsets[1:])
    ragged = SparseTeacher(
        ragged.indices[keep].to(id_dtype), ragged.logprobs[keep].half(), offsets=offsets
    )
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(13, 8, generator=g), torch.randn(97, 8, generator=g)
    y = make_labels((13,), 97, "some")
    grads = []
    for teacher in (ragged, ragged.padded()):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = kdfused.fused_linear_distill_loss(hh, ww, y, teacher=teacher, chunk_size=chunk_size)
        loss.backward()
        grads.append((loss, hh.grad, ww.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_the_kernel_is_not_given_a_padded_copy(monkeypatch):
    """The single-process kernel path never pads ragged rows (no int64 [N, k]
    copy of the batch): SparseTeacher.padded is not called."""
    _, ragged = ragged_teacher(12, 80, 5)
    small = _as_ragged(ragged, torch.uint16, torch.float16)

    def refuse(self, k=None):
        raise AssertionError("the kernel path padded the ragged rows")

    monkeypatch.setattr(SparseTeacher, "padded", refuse)
    s = make_logits((12, 80), seed=2).requires_grad_()
    y = make_labels((12,), 80, "some")
    kdfused.fused_distill_loss(s, small, y).backward()
    kdfused.FusedDistillLoss(divergence="jsd")(s, small, y).backward()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(12, 6, generator=g, requires_grad=True)
    w = torch.randn(80, 6, generator=g, requires_grad=True)
    kdfused.fused_linear_distill_loss(h, w, y, teacher=small, chunk_size=5).backward()
    top_p = sparse.topk(make_logits((12, 80), seed=3), 8, top_p=0.8)
    kdfused.fused_distill_loss(s, top_p, y).backward()


def test_the_op_takes_offsets_and_names_a_bad_entry():
    """sparse_distill_forward(offsets=): ragged rows read as the padded ones;
    a bad id is named by its entry and row; bad offsets are refused."""
    padded, ragged = ragged_teacher(7, 40, 3)
    s = make_logits((7, 40), seed=4)
    options = dict(
        temperature=1.0,
        store_temperature=1.5,
        tail="ghost",
        alpha=0.0,
        divergence="forward_kl",
        beta=0.5,
        ignore_index=-100,
        scale_by_t2=True,
    )
    want = ops.sparse_distill_forward(
        s, padded.indices, padded.logprobs, None, None, compute_grad=True, **options
    )
    for id_dtype in ID_DTYPES:
        got = ops.sparse_distill_forward(
            s,
            ragged.indices.to(id_dtype),
            ragged.logprobs,
            None,
            None,
            compute_grad=True,
            offsets=ragged.offsets,
            **options,
        )
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    bad = ragged.indices.clone()
    bad[5] = 40  # row 2's entry 2 (rows keep 1, 2, 3, 1, ... ids)
    with pytest.raises(ValueError, match=r"indices\[5\] \(row 2, entry 2\) = 40 is outside"):
        ops.sparse_distill_forward(
            s,
            bad,
            ragged.logprobs,
            None,
            None,
            compute_grad=False,
            offsets=ragged.offsets,
            **options,
        )
    bad[5] = bad[4]
    with pytest.raises(ValueError, match=r"indices\[5\] \(row 2, entry 2\) = .* repeats"):
        ops.sparse_distill_forward(
            s,
            bad,
            ragged.logprobs,
            None,
            None,
            compute_grad=False,
            offsets=ragged.offsets,
            **options,
        )
    for offsets, message in (
        (ragged.offsets + 1, "must start at 0"),
        (ragged.offsets[:-1], r"offsets \[N \+ 1\]"),
        (ragged.offsets.int(), "offsets must be int64"),
    ):
        with pytest.raises((ValueError, TypeError), match=message):
            ops.sparse_distill_forward(
                s,
                ragged.indices,
                ragged.logprobs,
                None,
                None,
                compute_grad=False,
                offsets=offsets,
                **options,
            )


def test_ragged_rows_compile_fullgraph():
    """The kernel path takes ragged rows with no host-side step: the loss
    compiles as one graph (2-byte ids, float16 log-probs) and matches eager."""
    _, ragged = ragged_teacher(8, 50, 4)
    ids, lp, offsets = ragged.indices.to(torch.uint16), ragged.logprobs.half(), ragged.offsets

    def loss(s, ids, lp, offsets):
        teacher = SparseTeacher(ids, lp, "ghost", 1.5, offsets=offsets)
        return kdfused.fused_distill_loss(s, teacher, None, alpha=0.0)

    s = make_logits((8, 50), seed=9)
    x, y = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = torch.compile(loss, fullgraph=True)(x, ids, lp, offsets)
    got.backward()
    want = loss(y, ids, lp, offsets)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-7)
