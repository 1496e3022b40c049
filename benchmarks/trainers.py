"""The trainers (docs/usage.md, "Trainers"): what their loss steps cost.

    python -m benchmarks.trainers trl --vocab 32000 --batch 8 --completion 512 --reps 5
    python -m benchmarks.trainers hf --vocab 32000 --steps 30

``trl``: one DistillationTrainer loss step (generation excluded: a fixed
micro-batch of completions), TRL's own ``_compute_loss`` against
kdfused.trl's, forward and backward, taken in turns run by run in one process;
median time and peak memory (what the step allocates beyond what was live:
the CUDA allocator's peak on a GPU, the process's peak RSS on the CPU). The
models are tiny Llamas (2 layers) with a V-wide lm_head, so the loss is most
of the step, as it is at LLM vocabularies.

``hf``: kdfused.hf.DistillationTrainer with a live teacher against the same
trainer reading a store of that teacher's top-k (built first, not timed):
time per step and the loss step's peak memory, and the student's held-out
loss after the same steps.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

from kdfused._measure import PeakMemory

from .run import commit, device_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def llama(vocab, hidden, layers, seed, device, dtype):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.LlamaForCausalLM(config).to(device, dtype)


def _tokenizer(vocab):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab)}
    words.update({"<pad>": 0, "<eos>": 1})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}{{ '' }}{% endif %}"
    )
    return fast


def trl_step(args) -> list[dict]:
    import datasets
    import trl

    import kdfused.trl as ktrl

    device, dtype = args.device, getattr(torch, args.dtype)
    student = llama(args.vocab, args.student_hidden, 2, 0, device, dtype)
    teacher = llama(args.vocab, args.teacher_hidden, 2, 1, device, dtype)
    tok = _tokenizer(args.vocab)
    prompts = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": "w5"}]]})
    g = torch.Generator().manual_seed(0)
    inputs = {
        "prompt_ids": torch.randint(2, args.vocab, (args.batch, 16), generator=g),
        "prompt_mask": torch.ones(args.batch, 16, dtype=torch.int64),
        "completion_ids": torch.randint(2, args.vocab, (args.batch, args.completion), generator=g),
        "completion_mask": torch.ones(args.batch, args.completion, dtype=torch.int64),
    }
    inputs = {k: v.to(device) for k, v in inputs.items()}
    tokens = args.batch * args.completion
    num_items = torch.tensor(float(tokens), device=device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = trl.DistillationConfig(
            output_dir=tmp,
            use_cpu=device == "cpu",
            bf16=dtype == torch.bfloat16,
            report_to="none",
            beta=args.beta,
            temperature=args.temperature,
            gradient_checkpointing=False,
        )
        trainer = ktrl.DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=prompts,
            processing_class=tok,
        )
        providers = {
            "trl": lambda: trl.DistillationTrainer._compute_loss(
                trainer, student, inputs, num_items
            ),
            "kdfused": lambda: trainer._compute_loss(student, inputs, num_items),
        }

        def step(fn):
            student.zero_grad(set_to_none=True)
            loss, _, _ = fn()
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            return loss.detach()

        losses = {name: step(fn) for name, fn in providers.items()}  # warm-up
        times = {name: [] for name in providers}
        for _ in range(args.reps):
            for name, fn in providers.items():
                begin = time.perf_counter()
                step(fn)
                times[name].append(time.perf_counter() - begin)
        peaks = {}
        for name, fn in providers.items():
            student.zero_grad(set_to_none=True)
            peaks[name] = PeakMemory(device)(lambda fn=fn: step(fn))
    base = statistics.median(times["trl"])
    for name in providers:
        t = statistics.median(times[name])
        rows.append(
            dict(
                provider=name,
                ms=1e3 * t,
                speedup_vs_trl=base / t,
                peak_mib=peaks[name] / 2**20,
                peak_vs_trl=peaks[name] / max(peaks["trl"], 1),
                loss=float(losses[name]),
            )
        )
    header = (
        f"# {device_name(device)}, torch {torch.__version__}, commit {commit()}, {args.dtype}, "
        f"V {args.vocab}, {args.batch} x {args.completion} completion tokens, student hidden "
        f"{args.student_hidden}, teacher {args.teacher_hidden}, beta {args.beta}, T "
        f"{args.temperature}; medians of {args.reps}, in turns"
    )
    print(header)
    print("| provider | loss step (ms) | vs TRL | peak MiB | peak vs TRL | loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['provider']} | {r['ms']:.0f} | {r['speedup_vs_trl']:.2f}x | "
            f"{r['peak_mib']:.0f} | {r['peak_vs_trl']:.2f} | {r['loss']:.6f} |"
        )
    return rows


def hf_steps(args) -> list[dict]:
    import datasets
    import transformers

    import kdfused
    import kdfused.hf as khf
    from kdfused import sparse
    from kdfused.store import build_store

    device = args.device
    teacher = llama(args.vocab, args.teacher_hidden, 2, 1, device, torch.float32)
    init = llama(args.vocab, args.student_hidden, 2, 0, device, torch.float32)
    g = torch.Generator().manual_seed(0)
    # Token windows from the teacher itself (sampled), so that there is something to learn.
    windows = torch.randint(2, args.vocab, (args.windows, args.seq_len), generator=g)
    heldout = torch.randint(2, args.vocab, (16, args.seq_len), generator=g)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = os.path.join(tmp, "store")
        build_store(teacher, windows, store_dir, k=args.k, batch_size=8, progress=False)
        store = sparse.SparseStore(store_dir)
        per_window = args.seq_len - 1
        data = datasets.Dataset.from_dict(
            {
                "input_ids": windows.tolist(),
                "store_start": [i * per_window for i in range(len(windows))],
            }
        )
        for name, source in (("live teacher", teacher), (f"store, top-{args.k}", store)):
            student = copy.deepcopy(init)
            config = transformers.TrainingArguments(
                os.path.join(tmp, name.replace(" ", "_")),
                per_device_train_batch_size=args.batch,
                max_steps=args.steps,
                learning_rate=1e-3,
                report_to=[],
                use_cpu=device == "cpu",
                save_strategy="no",
                disable_tqdm=True,
                seed=0,
                logging_steps=args.steps,
            )
            trainer = khf.DistillationTrainer(
                student,
                source,
                kdfused.FusedLinearDistillLoss(temperature=1.0, alpha=0.5),
                args=config,
                train_dataset=data,
            )
            begin = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - begin
            batch = trainer.data_collator([data[i] for i in range(args.batch)])
            batch = {k: v.to(device) for k, v in batch.items()}
            peak = PeakMemory(device)(
                lambda t=trainer, b=batch: t.compute_loss(t.model, b).backward()
            )
            with torch.no_grad():
                out = student(input_ids=heldout.to(device), labels=heldout.to(device))
            rows.append(
                dict(
                    trainer=name,
                    ms_per_step=1e3 * seconds / args.steps,
                    loss_step_peak_mib=peak / 2**20,
                    heldout_ce=float(out.loss),
                )
            )
    print(
        f"# {device_name(device)}, torch {torch.__version__}, commit {commit()}, float32, "
        f"V {args.vocab}, {args.batch} windows of {args.seq_len} a step, {args.steps} steps, "
        f"student hidden {args.student_hidden}, teacher {args.teacher_hidden}"
    )
    print("| teacher | ms / step | loss-step peak MiB | held-out CE after the steps |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['trainer']} | {r['ms_per_step']:.0f} | {r['loss_step_peak_mib']:.0f} | "
            f"{r['heldout_ce']:.4f} |"
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.trainers", description=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("trl", "hf"):
        q = sub.add_parser(name)
        q.add_argument("--device", default="cpu")
        q.add_argument("--vocab", type=int, default=32000)
        q.add_argument("--student-hidden", type=int, default=256)
        q.add_argument("--teacher-hidden", type=int, default=512)
        q.add_argument("--batch", type=int, default=8)
    t = sub.choices["trl"]
    t.add_argument("--completion", type=int, default=512)
    t.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    t.add_argument("--beta", type=float, default=0.5)
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--reps", type=int, default=5)
    h = sub.choices["hf"]
    h.add_argument("--windows", type=int, default=256)
    h.add_argument("--seq-len", type=int, default=129)
    h.add_argument("--steps", type=int, default=20)
    h.add_argument("--k", type=int, default=32)
    args = p.parse_args(argv)
    return trl_step(args) if args.what == "trl" else hf_steps(args)


if __name__ == "__main__":
    main()
