"""The LM demo's pieces: the loss wired to Hugging Face transformers models
(hidden states + lm_head.weight, as a user would) against the logits path, the
top-k store the demo writes, the data pipeline, and a --quick run end to end."""

import copy
import json

import pytest
import torch
from oracle import _log_prob_size, assert_2x_of_torch

import kdfused

transformers = pytest.importorskip("transformers", reason="the LM demo needs transformers")
pytest.importorskip("tokenizers", reason="the LM demo needs tokenizers")
pytest.importorskip("safetensors", reason="the top-k store needs safetensors")

from kdfused import lm_demo  # noqa: E402  (after the skips above)

VOCAB, SEQ = 97, 12


def tiny(layers, width, seed):
    return lm_demo.build_model(lm_demo.ModelShape(layers, width, 2), VOCAB, SEQ, seed)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_transformers_wiring_matches_logits_path(divergence):
    """FusedLinearDistillLoss on last_hidden_state + lm_head.weight gives the
    loss and every parameter gradient of the logits path (model(ids).logits
    into the float64 reference), within 2x of PyTorch's own float32 error."""
    student, teacher = tiny(2, 32, 0), tiny(2, 48, 1)
    teacher.requires_grad_(False)
    ids = torch.randint(0, VOCAB, (3, SEQ + 1), generator=torch.Generator().manual_seed(2))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :3] = -100  # padding, as a collator writes it
    opts = dict(temperature=2.0, alpha=0.3, divergence=divergence)

    def fused_linear(model):
        model.zero_grad(set_to_none=True)
        h_s = lm_demo.hidden_states(model, x)
        with torch.no_grad():
            h_t = lm_demo.hidden_states(teacher, x)
        loss = kdfused.FusedLinearDistillLoss(**opts)(
            h_s, model.lm_head.weight, h_t, teacher.lm_head.weight, y
        )
        loss.backward()
        return loss, grads(model)

    def logits_path(model, t_model, loss_fn):
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            t_logits = t_model(input_ids=x).logits
        loss = loss_fn(model(input_ids=x).logits, t_logits, y, **opts)
        loss.backward()
        return loss, grads(model)

    got, got_g = fused_linear(student)
    dense, dense_g = logits_path(student, teacher, kdfused.fused_distill_loss)
    same, same_g = logits_path(student, teacher, kdfused.reference.distill_loss)
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    ref, ref_g = logits_path(s64, t64, kdfused.reference.distill_loss)

    assert set(got_g) == set(ref_g) and "lm_head.weight" in got_g and len(got_g) > 10
    with torch.no_grad():
        size = _log_prob_size(student(input_ids=x).logits, teacher(input_ids=x).logits, y, **opts)
    assert_2x_of_torch("loss", got, same, ref, size)
    assert_2x_of_torch("loss (logits path)", dense, same, ref, size)
    for name in ref_g:
        assert_2x_of_torch(name, got_g[name], same_g[name], ref_g[name])
        assert_2x_of_torch(name + " (logits path)", dense_g[name], same_g[name], ref_g[name])


def test_store_holds_the_teachers_topk(tmp_path):
    """The store write_store makes loads back as the teacher's top-k of each
    training window, batch b at rows [b B L, (b + 1) B L)."""
    teacher = tiny(1, 32, 3).eval()
    windows = torch.randint(0, VOCAB, (7, SEQ + 1), generator=torch.Generator().manual_seed(4))
    batch, k = 3, 5
    lm_demo.write_store(teacher, windows, tmp_path / "s", k=k, batch_size=batch, progress=False)
    store = kdfused.sparse.SparseStore(tmp_path / "s", vocab_size=VOCAB, k=k)
    assert len(store) == 6 * SEQ  # whole batches only: 7 // 3 * 3 windows
    for b in range(2):
        with torch.no_grad():
            logits = teacher(input_ids=windows[b * batch : (b + 1) * batch, :-1]).logits
        want = kdfused.sparse.topk(logits.flatten(0, 1), k)
        got = store[b * batch * SEQ : (b + 1) * batch * SEQ].padded(k)
        assert torch.equal(got.indices, want.indices.long())
        assert torch.equal(got.logprobs, want.logprobs.to(got.logprobs.dtype))
        assert got.store_temperature == 1.0 and got.tail == "ghost"


def test_bytes_per_token_and_split():
    """Bits per byte divides by the bytes the tokens stand for: the per-id
    byte counts add up to the text's UTF-8 length; the split is by file,
    disjoint and repeatable."""
    root, files = lm_demo.stdlib_sources()
    train, heldout = lm_demo.split_files(root, files[:400], 0.2, seed=0)
    assert set(train).isdisjoint(heldout) and len(train) + len(heldout) == 400
    assert 0 < len(heldout) < 200
    assert (train, heldout) == lm_demo.split_files(root, files[:400], 0.2, seed=0)
    texts = lm_demo.read_texts(train, 60_000)
    tok = lm_demo.train_tokenizer(texts, 600)
    sample = "def f(x):\n    return x ** 2  # ünïcode\n"
    ids = lm_demo.encode(tok, [sample])
    nbytes = lm_demo.token_bytes(tok)
    assert nbytes[ids].sum().item() == len(sample.encode())  # EOS counts 0
    assert tok.decode(ids[:-1].tolist()) == sample


def test_quick_run_end_to_end(tmp_path):
    """`python -m kdfused.lm_demo --quick`: three student runs, a table, a
    PNG; the second run reuses the cached teacher and store and repeats the
    first run's numbers exactly (one seed)."""
    argv = ["--quick", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    first = lm_demo.main([*argv, "--out", str(tmp_path / "a")])
    second = lm_demo.main([*argv, "--out", str(tmp_path / "b")])
    names = [r["run"] for r in first["runs"]]
    assert names == ["ce", "online", "offline top-32"]
    for a, b in zip(first["runs"], second["runs"], strict=True):
        assert a["curve"] == b["curve"], a["run"]
        assert 0 < a["bpb"] < 16 and a["loss_step_bytes"] >= 0
    assert first["teacher_bpb"] == second["teacher_bpb"]
    assert (tmp_path / "a" / "lm_demo.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "a" / "lm_demo.json").read_text())
    stored = saved["stores"]["offline top-32"]
    # 2-byte ids and float16 log-probs, 32 a row, and a 2-byte length a row.
    assert stored["bytes"] >= (32 * 4 + 2) * stored["rows"]
    assert stored["build"]["tokens_per_second"] > 0
