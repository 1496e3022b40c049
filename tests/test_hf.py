"""kdfused.hf: the lm_head of real transformers models (softcap, logit
scale), and the Hugging Face Trainer for off-policy distillation from a live
teacher or a SparseStore, with real train() steps on tiny models built from
configs (nothing downloaded): its loss against the loss of the models' own
logits, gradient accumulation over micro-batches of different token counts
against one batch k times larger, gradient checkpointing, bf16, bad input."""

import os
import tempfile

import pytest
import torch

pytest.importorskip("transformers", reason="kdfused.hf needs transformers ([hf] extra)")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate ([hf] extra)")
datasets = pytest.importorskip("datasets", reason="the tests' datasets need datasets ([hf] extra)")

import transformers  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import kdfused  # noqa: E402
import kdfused.hf as khf  # noqa: E402
from kdfused import ops, sparse  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="needs kdfused's CPU kernel")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

VOCAB = 97


def llama(hidden, seed, vocab=VOCAB, **extra):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        **extra,
    )
    return transformers.LlamaForCausalLM(config)


def windows(n=12, seed=0, low=5, high=20):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [{"input_ids": torch.randint(1, VOCAB, (k,), generator=g).tolist()} for k in lengths]


def args(tmp, **overrides):
    base = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=2,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    base.update(overrides)
    return TrainingArguments(tmp, **base)


@pytest.mark.parametrize(
    "family",
    ["gemma2-softcap", "cohere-logit-scale", "granite-logits-scaling", "llama-plain"],
)
def test_lm_head_reads_what_the_model_applies(family):
    """lm_head(model) and the fused-linear loss give the loss of the model's
    own logits, for models that cap and scale them."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if family == "gemma2-softcap":
        config = transformers.Gemma2Config(final_logit_softcapping=3.0, head_dim=8, **common)
        model = transformers.Gemma2ForCausalLM(config)
        want = (3.0, 1.0)
    elif family == "cohere-logit-scale":
        config = transformers.CohereConfig(logit_scale=0.3, **common)
        model = transformers.CohereForCausalLM(config)
        want = (None, 0.3)
    elif family == "granite-logits-scaling":
        config = transformers.GraniteConfig(logits_scaling=4.0, **common)
        model = transformers.GraniteForCausalLM(config)
        want = (None, 0.25)
    else:
        model = llama(32, 0)
        want = (None, 1.0)
    head = khf.lm_head(model)
    assert (head.softcap, head.logit_scale) == pytest.approx(want)
    ids = torch.randint(0, VOCAB, (2, 9))
    logits = model(input_ids=ids).logits.detach()
    hidden = khf.last_hidden_state(model, ids).detach()
    t = torch.randn(2, 9, VOCAB)
    y = torch.randint(0, VOCAB, (2, 9))
    fused = kdfused.fused_linear_distill_loss(
        hidden,
        head.weight.detach(),
        y,
        student_bias=head.bias,
        student_softcap=head.softcap,
        student_logit_scale=head.logit_scale,
        teacher_logits=t,
    )
    plain = kdfused.fused_distill_loss(logits, t, y)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def _reference_step_loss(student, teacher, batch, loss_fn):
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    s = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    options = {k: v for k, v in loss_fn.options().items() if k != "backend"}
    return kdfused.reference.distill_loss(s.double(), t.detach().double(), labels[:, 1:], **options)


def test_online_loss_equals_the_models_logits():
    student, teacher = llama(32, 0), llama(48, 1)
    loss_fn = kdfused.FusedLinearDistillLoss(temperature=2.0, alpha=0.3, divergence="jsd")
    data = datasets.Dataset.from_list(windows(4))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = khf.DistillationTrainer(
            student, teacher, loss_fn, args=args(tmp), train_dataset=data
        )
        batch = trainer.data_collator([data[i] for i in range(4)])
        got = trainer.compute_loss(trainer.model, batch)
        want = _reference_step_loss(student, teacher, batch, loss_fn)
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)
        (g,) = torch.autograd.grad(got, student.lm_head.weight)
        (w,) = torch.autograd.grad(
            _reference_step_loss(student, teacher, batch, loss_fn), student.lm_head.weight
        )
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-7)
        out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))


def _store_of(teacher, rows, k, path):
    """A store of the teacher's top-k over every window, written in order,
    and the windows with their store_start."""
    starts, at = [], 0
    with sparse.ShardWriter(path, vocab_size=VOCAB, k=k, shard_rows=17) as writer:
        for row in rows:
            ids = torch.tensor(row["input_ids"])[None]
            with torch.no_grad():
                logits = teacher(input_ids=ids).logits[0, :-1]
            writer.write(sparse.topk(logits, k))
            starts.append(at)
            at += logits.shape[0]
    return [dict(r, store_start=s) for r, s in zip(rows, starts, strict=True)]


def test_offline_from_a_store():
    """The store's rows are read per example at store_start; the loss equals
    the stored teacher's loss over the model's own logits."""
    student, teacher = llama(32, 0), llama(48, 1)
    rows = windows(6, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store")
        rows = _store_of(teacher, rows, 8, path)
        store = sparse.SparseStore(path, vocab_size=VOCAB)
        loss_fn = kdfused.FusedLinearDistillLoss(temperature=1.0, alpha=0.5)
        data = datasets.Dataset.from_list(rows)
        trainer = khf.DistillationTrainer(
            student, store, loss_fn, args=args(tmp), train_dataset=data
        )
        batch = trainer.data_collator([data[i] for i in (4, 1, 2)])
        got = trainer.compute_loss(trainer.model, batch)
        # The reference: each example's stored rows against its own logits.
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        s = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
        idx = torch.full((*labels[:, 1:].shape, 8), -1)
        lp = torch.full((*labels[:, 1:].shape, 8), -float("inf"))
        for b, i in enumerate((4, 1, 2)):
            n = len(rows[i]["input_ids"]) - 1
            part = store[rows[i]["store_start"] : rows[i]["store_start"] + n].padded(8)
            idx[b, :n], lp[b, :n] = part.indices.long(), part.logprobs.float()
        want = kdfused.reference.sparse_distill_loss(
            s.double(), idx, lp.double(), labels[:, 1:], temperature=1.0, alpha=0.5
        )
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)
        out = trainer.train()
        assert out.global_step == 2


def _one_step(tmp, data, batch_size, accumulation, **extra):
    student, teacher = llama(32, 0), llama(48, 1)
    loss_fn = kdfused.FusedLinearDistillLoss(temperature=2.0, alpha=0.5)
    trainer = khf.DistillationTrainer(
        student,
        teacher,
        loss_fn,
        args=args(
            tmp,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
            **extra,
        ),
        train_dataset=data,
    )
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    return {n: p.detach() - before[n] for n, p in student.named_parameters()}


def test_gradient_accumulation_equals_one_larger_batch():
    """k = 2 micro-batches of 2 examples (their token counts differ) make the
    step of one batch of 4: the loss is the mean over the accumulated batch's
    tokens (num_items_in_batch), not the mean of the micro-batches' means."""
    rows = windows(4, seed=5, low=4, high=18)
    lengths = [len(r["input_ids"]) for r in rows]
    data = datasets.Dataset.from_list(rows)
    with tempfile.TemporaryDirectory() as tmp:
        accumulated = _one_step(tmp, data, 2, 2, dataloader_drop_last=False)
        whole = _one_step(tmp, data, 4, 1)
    assert len(set(lengths)) > 1
    for name, step in whole.items():
        torch.testing.assert_close(accumulated[name], step, rtol=2e-4, atol=1e-6, msg=name)
    assert any(step.abs().max() > 0 for step in whole.values())


def test_gradient_checkpointing_and_bf16():
    """Checkpointing gives the same step as without; bf16 autocast trains
    and stays near fp32 (to bf16's rounding of the matmuls)."""
    rows = windows(4, seed=6)
    data = datasets.Dataset.from_list(rows)
    with tempfile.TemporaryDirectory() as tmp:
        plain = _one_step(tmp, data, 4, 1)
        checkpointed = _one_step(tmp, data, 4, 1, gradient_checkpointing=True)
        half = _one_step(tmp, data, 4, 1, bf16=True)
    for name, step in plain.items():
        torch.testing.assert_close(checkpointed[name], step, rtol=1e-4, atol=1e-7, msg=name)
        scale = step.abs().max().item()
        assert (half[name] - step).abs().max().item() <= 0.05 * scale + 1e-6, name


def test_bad_input():
    student, teacher = llama(32, 0), llama(48, 1)
    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(TypeError, match="FusedLinearDistillLoss"):
            khf.DistillationTrainer(student, teacher, kdfused.FusedDistillLoss(), args=args(tmp))
        with pytest.raises(ValueError, match="reduction='batchmean'"):
            khf.DistillationTrainer(
                student, teacher, kdfused.FusedLinearDistillLoss(reduction="sum"), args=args(tmp)
            )
        with pytest.raises(ValueError, match="student_softcap=5.0 but the student model"):
            khf.DistillationTrainer(
                student,
                teacher,
                kdfused.FusedLinearDistillLoss(student_softcap=5.0),
                args=args(tmp),
            )
        with pytest.raises(TypeError, match="causal LM .* or a kdfused.sparse.SparseStore"):
            khf.DistillationTrainer(student, "teacher", args=args(tmp))
        path = os.path.join(tmp, "store")
        rows = _store_of(teacher, windows(2), 4, path)
        store = sparse.SparseStore(path)
        wide = llama(32, 2, vocab=VOCAB + 3)
        with pytest.raises(ValueError, match="vocabulary of 97.*100 rows"):
            khf.DistillationTrainer(wide, store, args=args(tmp))
        trainer = khf.DistillationTrainer(
            student, store, args=args(tmp), train_dataset=datasets.Dataset.from_list(rows)
        )
        batch = trainer.data_collator([{"input_ids": rows[0]["input_ids"]}])
        with pytest.raises(ValueError, match="needs store_start"):
            trainer.compute_loss(trainer.model, batch)
        batch = trainer.data_collator([dict(rows[1], store_start=len(store) - 2)])
        with pytest.raises(ValueError, match="outside the store's"):
            trainer.compute_loss(trainer.model, batch)
        with pytest.raises(ValueError, match="at least 2 tokens"):
            trainer.data_collator([{"input_ids": [5]}])
