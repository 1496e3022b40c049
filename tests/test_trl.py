"""kdfused.trl.DistillationTrainer: TRL's DistillationTrainer with its
divergence through kdfused's fused-linear kernel. Its _compute_loss against
TRL's own on the same inputs (beta 0, 0.5, 1; a logit scale and a softcap;
loss, student gradients, the entropy it logs, the token count) by the 2x
rule against float64; real train() steps with TRL's on-policy generation; a
teacher whose vocabulary is padded wider, which TRL refuses. Tiny models and
a tokenizer built from configs: nothing is downloaded."""

import os
import tempfile

import pytest
import torch

pytest.importorskip("trl", reason="kdfused.trl needs trl ([trl] extra)")
datasets = pytest.importorskip("datasets", reason="TRL's trainer takes a datasets.Dataset")

import transformers  # noqa: E402
import trl  # noqa: E402
from oracle import assert_2x_of_torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

import kdfused  # noqa: E402
import kdfused.trl as ktrl  # noqa: E402
from kdfused import ops  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="needs kdfused's CPU kernel")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

WORDS = "the a cat dog sat ran on in mat park what is of tell me story how many legs".split()
SPECIALS = ["<pad>", "<unk>", "<eos>", "<user>", "<assistant>"]
TEMPLATE = (
    "{% for message in messages %}{{ '<' + message['role'] + '> ' + message['content'] + "
    "' <eos> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        additional_special_tokens=["<user>", "<assistant>"],
        padding_side="left",
    )
    fast.chat_template = TEMPLATE
    return fast


def llama(tok, hidden, seed, vocab=None, **config_extra):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab or len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    for key, value in config_extra.items():  # what TRL and kdfused read from a config
        setattr(config, key, value)
    return transformers.LlamaForCausalLM(config)


def prompts():
    rows = ["tell me a story", "what is the cat", "how many legs", "the dog ran in the park"]
    return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": r}] for r in rows]})


def config(tmp, **overrides):
    base = dict(
        output_dir=tmp,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_completion_length=6,
        beta=0.5,
        temperature=2.0,
        seed=0,
        gradient_checkpointing=False,
    )
    base.update(overrides)
    return trl.DistillationConfig(**base)


def micro_batch(tok, seed=0):
    """What TRL hands _compute_loss: left-padded prompts, right-padded
    completions with their mask, num_items_in_batch."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda *shape: torch.randint(len(SPECIALS), len(tok), shape, generator=g)  # noqa: E731
    prompt_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    return {
        "prompt_ids": ids(2, 5) * prompt_mask,
        "prompt_mask": prompt_mask,
        "completion_ids": ids(2, 6) * completion_mask,
        "completion_mask": completion_mask,
        "num_items_in_batch": torch.tensor(13.0),
    }


def _float64_reference(trainer, student, teacher, inputs, num_items):
    """The same objective in float64, unfused, from the models' own hidden
    states and heads."""
    import kdfused.hf as khf

    keep = inputs["completion_ids"].shape[1]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    valid = inputs["completion_mask"].reshape(-1) != 0
    hs = trainer._get_last_hidden_state(student, ids, mask, keep).reshape(-1, 32)[valid]
    with torch.no_grad():
        ht = trainer._get_last_hidden_state(teacher, ids, mask, keep).reshape(-1, 48)[valid]
    s_head, t_head = khf.lm_head(student), khf.lm_head(teacher)
    out = kdfused.reference.fused_linear_distill_loss(
        hs.double(),
        s_head.weight.double(),
        None,
        teacher_hidden=ht.double(),
        teacher_weight=t_head.weight[: s_head.weight.shape[0]].double(),
        student_softcap=s_head.softcap,
        teacher_softcap=t_head.softcap,
        student_logit_scale=s_head.logit_scale,
        teacher_logit_scale=t_head.logit_scale,
        temperature=trainer.temperature,
        alpha=0.0,
        scale_by_t2=False,
        reduction="sum",
        student_entropy=True,
        **ktrl.divergence_of(trainer.beta),
    )
    return out.loss / num_items, out.student_entropy


def _loss_and_grads(fn, student, inputs, num_items):
    student.zero_grad()
    loss, entropy, n_valid = fn(student, inputs, num_items)
    loss.backward()
    grads = {
        n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None
    }
    return loss.detach(), entropy, n_valid, grads


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("heads", ["plain", "scaled-and-capped"])
def test_compute_loss_equals_trls(beta, heads):
    tok = tokenizer()
    extra = dict(logit_scale=0.7, final_logit_softcapping=8.0) if heads != "plain" else {}
    student, teacher = llama(tok, 32, 0, **extra), llama(tok, 48, 1, **extra)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ktrl.DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config(tmp, beta=beta),
            train_dataset=prompts(),
            processing_class=tok,
        )
        inputs = micro_batch(tok)
        num_items = inputs["num_items_in_batch"]
        ours = _loss_and_grads(trainer._compute_loss, student, inputs, num_items)
        theirs = _loss_and_grads(
            lambda *a: trl.DistillationTrainer._compute_loss(trainer, *a),
            student,
            inputs,
            num_items,
        )
        ref_loss, ref_entropy = _float64_reference(trainer, student, teacher, inputs, num_items)
    assert int(ours[2]) == int(theirs[2]) == int(inputs["completion_mask"].sum())
    assert_2x_of_torch("loss", ours[0], theirs[0], ref_loss.detach(), 10.0)
    assert_2x_of_torch("entropy", ours[1], theirs[1], ref_entropy, 50.0)
    for name, grad in theirs[3].items():
        diff = (ours[3][name] - grad).abs().max().item()
        assert diff <= 1e-5 * (1 + grad.abs().max().item()), (name, diff)


def test_train_with_on_policy_generation():
    """Real train() steps: TRL generates with the student, kdfused computes
    the loss; the entropy metric is logged."""
    tok = tokenizer()
    student, teacher = llama(tok, 32, 0), llama(tok, 48, 1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ktrl.DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config(tmp, beta=1.0),
            train_dataset=prompts(),
            processing_class=tok,
        )
        before = student.lm_head.weight.detach().clone()
        out = trainer.train()
        logged = [h for h in trainer.state.log_history if "entropy" in h]
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    assert logged and all(h["entropy"] > 0 for h in logged)
    assert not torch.equal(before, student.lm_head.weight)


def test_teacher_with_a_wider_padded_vocabulary():
    """TRL refuses a teacher whose lm_head is padded wider; teacher_vocab=
    'truncate' trains with its first V rows, as the float64 reference."""
    tok = tokenizer()
    student, teacher = llama(tok, 32, 0), llama(tok, 48, 1, vocab=len(tok) + 8)
    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(ValueError, match="vocab_size"):
            trl.DistillationTrainer(
                model=student,
                teacher_model=teacher,
                args=config(tmp),
                train_dataset=prompts(),
                processing_class=tok,
            )
        trainer = ktrl.DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config(tmp),
            train_dataset=prompts(),
            processing_class=tok,
            teacher_vocab="truncate",
        )
        assert teacher.config.vocab_size == len(tok) + 8  # restored after TRL's check
        inputs = micro_batch(tok, seed=3)
        loss, entropy, n_valid = trainer._compute_loss(
            student, inputs, inputs["num_items_in_batch"]
        )
        ref, _ = _float64_reference(trainer, student, teacher, inputs, inputs["num_items_in_batch"])
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        assert trainer.train().global_step == 2
    with pytest.raises(ValueError, match="teacher_vocab must be 'exact' or 'truncate'"):
        ktrl.DistillationTrainer(model=student, teacher_model=teacher, teacher_vocab="pad")
