"""LLM distillation end to end on real text: ``python -m kdfused.lm_demo``.

The data is the Python standard library's own source (found through
``sysconfig``, so it ships with every Python and nothing is downloaded), split
by file into train and held-out sets. A byte-level BPE tokenizer (Hugging Face
``tokenizers``) is trained on the train split. A teacher ``LlamaForCausalLM``
(Hugging Face ``transformers``, built from a small config, no weights
downloaded) is trained on it with cross-entropy and cached on disk, keyed by
its config and data. A smaller student is then trained three times from the
same initialisation, with the same batches and steps:

* ``ce``: cross-entropy on the next token only;
* ``online``: :class:`kdfused.FusedLinearDistillLoss` on the student's and the
  teacher's last hidden states and ``lm_head.weight`` (no N x V logits);
* ``offline``: the teacher's top-k log-probabilities written once to a
  :mod:`kdfused.sparse` store over the training tokens, the student trained
  from the store (a :class:`kdfused.SparseTeacher`, ghost tail).

The table gives held-out bits per byte, train time, the peak memory of one
loss step (lm_head, loss and backward to the hidden states) and the store's
size on disk; a PNG plots held-out bits per byte against step. Needs the
``lm`` extra: ``pip install -e ".[lm]"``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import kdfused
from kdfused._measure import PeakMemory
from kdfused._validation import DIVERGENCES

EOS = "<|endoftext|>"
CACHE_VERSION = 1


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - message for users only
        raise SystemExit(
            f"the LM demo needs {module.split('.')[0]}: pip install -e '.[lm]' "
            "(transformers, tokenizers, safetensors, matplotlib, tqdm)"
        ) from err


# ----------------------------------------------------------------------------- data


def stdlib_sources() -> tuple[Path, list[Path]]:
    """(root, the standard library's .py files, sorted), without installed
    packages (site-packages / dist-packages are not walked)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages")]
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    if not files:
        raise SystemExit(f"no Python source files under {root}")
    return root, sorted(files)


def split_files(root: Path, files: list[Path], heldout_fraction: float, seed: int):
    """(train, held-out): each file goes to one side by a hash of its path
    relative to the standard library's root, so the split does not depend on
    the order files are found in, nor on where Python is installed."""
    train, heldout = [], []
    for p in files:
        key = f"{seed}:{p.relative_to(root).as_posix()}".encode()
        (heldout if zlib.crc32(key) / 2**32 < heldout_fraction else train).append(p)
    # A fixed shuffle of each side, so a byte budget takes files from all of
    # the library rather than the alphabetically first packages.
    order = lambda p: zlib.crc32(f"order:{seed}:{p.relative_to(root).as_posix()}".encode())  # noqa: E731
    return sorted(train, key=order), sorted(heldout, key=order)


def read_texts(files: list[Path], max_bytes: int) -> list[str]:
    """The files' text (UTF-8, undecodable bytes replaced), whole files, until
    max_bytes of UTF-8 are taken."""
    texts, total = [], 0
    for p in files:
        text = p.read_bytes().decode("utf-8", errors="replace")
        size = len(text.encode())
        if size == 0:
            continue
        if total + size > max_bytes and texts:
            break
        texts.append(text)
        total += size
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) with one special token, EOS."""
    tk = _require("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok, texts: list[str]) -> torch.Tensor:
    """All texts' ids, each file followed by EOS, as one int64 stream."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def token_bytes(tok) -> torch.Tensor:
    """UTF-8 bytes each id stands for ([V] float64): with the byte-level
    alphabet every character of a token is one byte; EOS stands for none."""
    sizes = torch.zeros(tok.get_vocab_size(), dtype=torch.float64)
    for token, i in tok.get_vocab().items():
        sizes[i] = 0 if token == EOS else len(token)
    return sizes


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[W, seq_len + 1] non-overlapping windows: each token is predicted once
    (the last token of one window is the first input of the next)."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise SystemExit(f"only {len(ids)} tokens: fewer than one window of {seq_len + 1}")
    return ids[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len).contiguous()


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelShape:
    layers: int
    width: int
    heads: int

    def config(self, vocab_size: int, seq_len: int):
        tf = _require("transformers")
        return tf.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.width,
            intermediate_size=(8 * self.width // 3 + 63) // 64 * 64,  # SwiGLU's ~8/3 width
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=seq_len,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )


def build_model(shape: ModelShape, vocab_size: int, seq_len: int, seed: int):
    tf = _require("transformers")
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(shape.config(vocab_size, seq_len))
    return model.float()


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """The last hidden states [B, L, H] (after the final norm): what a user
    hands the fused-linear loss together with ``model.lm_head.weight``."""
    return model.model(input_ids=ids).last_hidden_state


def next_token_ce(model, h: torch.Tensor, y: torch.Tensor, _teacher=None) -> torch.Tensor:
    """Plain next-token cross-entropy through the model's lm_head (the
    [B, L, V] logits materialised, as transformers computes its loss)."""
    logits = model.lm_head(h).float()
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def blocks(n_windows: int, batch_size: int, steps: int, seed: int) -> list[int]:
    """`steps` batch numbers: batch b is windows [b * B, (b + 1) * B) of the
    (once shuffled) training windows, and the store's rows [b * B * L,
    (b + 1) * B * L), so every batch is one contiguous read of the store. The
    order of the batches is reshuffled each epoch."""
    per_epoch = n_windows // batch_size
    if per_epoch < 1:
        raise SystemExit(f"{n_windows} training windows: fewer than one batch of {batch_size}")
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < steps:
        out.extend(torch.randperm(per_epoch, generator=g).tolist()[: steps - len(out)])
    return out


def train(model, step_loss, plan, *, lr, desc, progress, evaluate=None, eval_every=0):
    """AdamW with a cosine schedule over `plan` (batch numbers, see blocks());
    `step_loss(model, b)` gives batch b's loss. Returns (seconds, curve): the
    held-out curve [(step, bits per byte)] when `evaluate` is given (its time
    is not counted)."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, len(plan) // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / len(plan)))))
        ),
    )
    curve = []
    if evaluate is not None:
        curve.append((0, evaluate(model)))
    seconds = 0.0
    with tqdm(
        total=len(plan), desc=desc, unit="step", mininterval=0.5, disable=not progress
    ) as bar:
        for step, batch in enumerate(plan, 1):
            model.train()
            begin = time.perf_counter()
            loss = step_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            seconds += time.perf_counter() - begin
            bar.update(1)
            if evaluate is not None and (step % eval_every == 0 or step == len(plan)):
                curve.append((step, evaluate(model)))
                bar.set_postfix(loss=f"{loss.item():.3f}", heldout_bpb=f"{curve[-1][1]:.3f}")
    model.eval()
    return seconds, curve


@torch.no_grad()
def bits_per_byte(model, heldout: torch.Tensor, nbytes: torch.Tensor, batch_size: int) -> float:
    """Held-out bits per UTF-8 byte: the summed next-token cross-entropy over
    the held-out windows, in bits, over the bytes those tokens stand for."""
    model.eval()
    nats = 0.0
    for i in range(0, len(heldout), batch_size):
        w = heldout[i : i + batch_size]
        logits = model.lm_head(hidden_states(model, w[:, :-1])).float()
        nats += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
    return nats / math.log(2) / nbytes[heldout[:, 1:]].sum().item()


# ----------------------------------------------------------------------------- cache


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def prepare_data(args, cache: Path, progress: bool):
    """(tokenizer, train windows, held-out windows, bytes per id, data key),
    tokenized once and cached."""
    tk = _require("tokenizers")
    root, files = stdlib_sources()
    train_files, heldout_files = split_files(root, files, args.heldout_fraction, args.seed)
    listing = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in files]
    key = _key(
        dict(
            v=CACHE_VERSION,
            files=hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
            vocab=args.vocab_size,
            train_bytes=args.train_bytes,
            heldout_bytes=args.heldout_bytes,
            heldout_fraction=args.heldout_fraction,
            seed=args.seed,
        )
    )
    where = cache / f"data-{key}"
    if (where / "ids.pt").exists():
        tok = tk.Tokenizer.from_file(str(where / "tokenizer.json"))
        ids = torch.load(where / "ids.pt")
        return tok, ids["train"], ids["heldout"], token_bytes(tok), key
    if progress:
        print(f"tokenizing the standard library under {root} (cached in {where})")
    train_texts = read_texts(train_files, args.train_bytes)
    heldout_texts = read_texts(heldout_files, args.heldout_bytes)
    tok = train_tokenizer(train_texts, args.vocab_size)
    train_ids, heldout_ids = encode(tok, train_texts), encode(tok, heldout_texts)
    where.mkdir(parents=True, exist_ok=True)
    tok.save(str(where / "tokenizer.json"))
    torch.save(dict(train=train_ids, heldout=heldout_ids), where / "ids.tmp")
    os.replace(where / "ids.tmp", where / "ids.pt")
    return tok, train_ids, heldout_ids, token_bytes(tok), key


# ----------------------------------------------------------------------------- runs


def write_store(
    teacher, train_w, path: Path, *, k: int, batch_size: int, progress: bool, top_p=None
) -> dict:
    """The teacher's top-k (top-p) log-probabilities (temperature 1) at every
    position of every whole batch of training windows, in window order, as a
    kdfused.sparse store at `path`, by the store CLI's build
    (kdfused.store.build_store): a store whose build was interrupted
    continues. Returns the build's measurements (seconds, tokens/s and the
    shares of the model, top-k and writing)."""
    from .store import build_store

    n = len(train_w) // batch_size * batch_size
    report = build_store(
        teacher,
        train_w[:n],
        path,
        k=k,
        top_p=top_p,
        temperature=1.0,
        batch_size=batch_size,
        progress=progress,
        resume=(path / "journal.json").exists(),
    )
    (path / "kdfused-store.json").write_text(json.dumps(report))
    return report


def store_bytes(path: Path) -> int:
    """The store's shards and index on disk (what a student reads)."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


@dataclass
class Run:
    """One student run: `teacher(b)` gives batch b's teacher operand (None for
    CE only), `loss(model, hidden, labels, operand)` the loss from the
    student's last hidden states [B, L, H] and next-token labels [B, L]."""

    name: str
    teacher: object
    loss: object


def student_runs(args, teacher, train_w, stores: dict) -> list[Run]:
    B, L = args.batch_size, args.seq_len
    distill = kdfused.FusedLinearDistillLoss(
        temperature=args.temperature, alpha=args.alpha, divergence=args.divergence
    )

    @torch.no_grad()
    def teacher_hidden(b):
        return hidden_states(teacher, train_w[b * B : (b + 1) * B, :-1])

    def online(model, h, y, t_hidden):
        return distill(h, model.lm_head.weight, t_hidden, teacher.lm_head.weight, y)

    def stored_in(store):
        return lambda b: store[b * B * L : (b + 1) * B * L]

    def offline(model, h, y, top_k):
        # The store's rows are the flattened positions: flatten the student's too.
        return distill(
            h.flatten(0, 1), model.lm_head.weight, None, None, y.flatten(), teacher_logits=top_k
        )

    return [
        Run("ce", lambda b: None, next_token_ce),
        Run("online", teacher_hidden, online),
        *(Run(name, stored_in(st), offline) for name, st in stores.items()),
    ]


def loss_step_peak(run: Run, model, w: torch.Tensor, operand) -> int:
    """Peak memory (bytes) of one loss step on its own: the lm_head, the loss
    and the backward to the hidden states, the teacher's operand made
    beforehand."""
    with torch.no_grad():
        h = hidden_states(model, w[:, :-1])
    h.requires_grad_()
    return PeakMemory("cpu")(lambda: run.loss(model, h, w[:, 1:], operand).backward())


def main(argv=None) -> dict:
    args = parse_args(argv)
    for module in ("transformers", "tokenizers", "safetensors"):
        _require(module)  # a clear message before any work, not halfway through
    progress = not args.no_progress
    if not progress:
        _require("transformers").utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    cache = Path(args.cache_dir).expanduser()
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    tok, train_ids, heldout_ids, nbytes, data_key = prepare_data(args, cache, progress)
    vocab = tok.get_vocab_size()
    L, B = args.seq_len, args.batch_size
    train_w, heldout_w = windows(train_ids, L), windows(heldout_ids, L)
    # Shuffled once, so that a batch of consecutive windows comes from many files.
    train_w = train_w[
        torch.randperm(len(train_w), generator=torch.Generator().manual_seed(args.seed))
    ]
    heldout_w = heldout_w[: args.eval_windows]
    print(
        f"data: {len(train_ids):,} training tokens ({len(train_w)} windows of {L}), "
        f"{heldout_w.shape[0] * L:,} held-out tokens "
        f"({nbytes[heldout_w[:, 1:]].sum().item() / (heldout_w.shape[0] * L):.2f} bytes/token); "
        f"vocabulary {vocab}; {torch.get_num_threads()} CPU threads; seed {args.seed}"
    )

    def evaluate(model):
        return bits_per_byte(model, heldout_w, nbytes, args.eval_batch)

    def ce_loss(model, b):
        w = train_w[b * B : (b + 1) * B]
        return next_token_ce(model, hidden_states(model, w[:, :-1]), w[:, 1:])

    # The teacher: trained once, cached by its config and the data.
    t_shape = ModelShape(args.teacher_layers, args.teacher_width, args.teacher_heads)
    t_key = _key(
        dict(
            v=CACHE_VERSION,
            data=data_key,
            shape=asdict(t_shape),
            seq_len=L,
            batch=B,
            steps=args.teacher_steps,
            lr=args.teacher_lr,
            seed=args.seed,
        )
    )
    t_dir = cache / f"teacher-{t_key}"
    tf = _require("transformers")
    if (t_dir / "config.json").exists() and (t_dir / "kdfused-teacher.json").exists():
        teacher = tf.LlamaForCausalLM.from_pretrained(t_dir).float().eval()
        t_info = json.loads((t_dir / "kdfused-teacher.json").read_text())
        print(f"teacher: loaded from {t_dir}")
    else:
        teacher = build_model(t_shape, vocab, L, args.seed + 1)
        plan = blocks(len(train_w), B, args.teacher_steps, args.seed + 1)
        seconds, _ = train(
            teacher, ce_loss, plan, lr=args.teacher_lr, desc="teacher (CE)", progress=progress
        )
        teacher.save_pretrained(t_dir)
        t_info = dict(seconds=seconds, steps=args.teacher_steps)
        (t_dir / "kdfused-teacher.json").write_text(json.dumps(t_info))
    teacher.requires_grad_(False)
    t_bpb = evaluate(teacher)

    # The teacher's top-k store over the training windows (and with --top-p a
    # ragged top-p one), cached with it.
    stores, builds = {}, {}
    for top_p in (None, args.top_p) if args.top_p is not None else (None,):
        name = f"offline top-{args.k}" + ("" if top_p is None else f", top-p {top_p}")
        suffix = "" if top_p is None else f"-p{top_p}"
        store_dir = cache / f"store-v3-{t_key}-k{args.k}{suffix}"
        if (store_dir / "index.json").exists():
            builds[name] = json.loads((store_dir / "kdfused-store.json").read_text())
        else:
            builds[name] = write_store(
                teacher,
                train_w,
                store_dir,
                k=args.k,
                batch_size=B,
                progress=progress,
                top_p=top_p,
            )
        stores[name] = kdfused.sparse.SparseStore(store_dir, vocab_size=vocab, k=args.k)

    # The students: one initialisation, one batch plan for all three runs.
    s_shape = ModelShape(args.student_layers, args.student_width, args.student_heads)
    init = build_model(s_shape, vocab, L, args.seed + 2)
    plan = blocks(len(train_w), B, args.steps, args.seed + 2)
    results = []
    for run in student_runs(args, teacher, train_w, stores):

        def step_loss(model, b, run=run):
            w = train_w[b * B : (b + 1) * B]
            return run.loss(model, hidden_states(model, w[:, :-1]), w[:, 1:], run.teacher(b))

        model = copy.deepcopy(init)
        seconds, curve = train(
            model,
            step_loss,
            plan,
            lr=args.lr,
            desc=f"student, {run.name}",
            progress=progress,
            evaluate=evaluate,
            eval_every=args.eval_every,
        )
        mem = loss_step_peak(
            run, model, train_w[plan[0] * B : (plan[0] + 1) * B], run.teacher(plan[0])
        )
        results.append(
            dict(run=run.name, bpb=curve[-1][1], seconds=seconds, loss_step_bytes=mem, curve=curve)
        )

    report(
        args,
        results,
        teacher_bpb=t_bpb,
        teacher_info=t_info,
        stores=stores,
        builds=builds,
        out=out,
    )
    return dict(
        teacher_bpb=t_bpb, runs=results, store_dirs={n: str(s.path) for n, s in stores.items()}
    )


def report(args, results, *, teacher_bpb, teacher_info, stores, builds, out):
    """Prints the table, writes it (markdown and JSON) and the PNG under `out`."""
    sizes = {name: store_bytes(store.path) for name, store in stores.items()}
    lines = [
        "| run | held-out bits/byte | train time | loss-step peak | teacher on disk |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        disk = "-"
        if r["run"] in stores:
            size, rows = sizes[r["run"]], len(stores[r["run"]])
            disk = f"{size / 2**20:.1f} MiB ({size / rows:.0f} B/token)"
        mib = r["loss_step_bytes"] / 2**20
        lines.append(
            f"| student, {r['run']} | {r['bpb']:.4f} | {r['seconds']:.1f} s | {mib:.1f} MiB "
            f"| {disk} |"
        )
    lines.append(
        f"| teacher, CE, {teacher_info['steps']} steps | {teacher_bpb:.4f} "
        f"| {teacher_info['seconds']:.1f} s | | |"
    )
    table = "\n".join(lines)
    print(f"\n{table}")
    ce = results[0]["bpb"]
    for r in results[1:]:
        print(f"{r['run']} - ce: {r['bpb'] - ce:+.4f} bits/byte")
    (out / "lm_demo.md").write_text(table + "\n")
    saved = dict(
        args=vars(args),
        teacher_bpb=teacher_bpb,
        teacher=teacher_info,
        runs=results,
        stores={
            name: dict(
                bytes=sizes[name],
                rows=len(store),
                entries=store.entries,
                build=builds[name],
            )
            for name, store in stores.items()
        },
    )
    (out / "lm_demo.json").write_text(json.dumps(saved, indent=1))
    plot(results, teacher_bpb, out / "lm_demo.png")


def plot(results, teacher_bpb, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        steps, bpb = zip(*r["curve"], strict=True)
        ax.plot(steps, bpb, label=r["run"])
    ax.axhline(teacher_bpb, color="gray", linestyle="--", label="teacher")
    ax.set_xlabel("student step")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("Student on the Python standard library's source")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m kdfused.lm_demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, under a minute (CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary, 512..32000")
    p.add_argument("--train-bytes", type=int, default=2_000_000)
    p.add_argument("--heldout-bytes", type=int, default=400_000)
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share of the files")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--teacher-width", type=int, default=256)
    p.add_argument("--teacher-heads", type=int, default=4)
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-width", type=int, default=128)
    p.add_argument("--student-heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=200, help="student steps, each run")
    p.add_argument("--lr", type=float, default=3e-3, help="student learning rate")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label term")
    p.add_argument("--divergence", choices=DIVERGENCES, default="forward_kl")
    p.add_argument("--k", type=int, default=32, help="top-k entries stored per token")
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="also train from a ragged store of the top-k's shortest prefix reaching this mass",
    )
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--cache-dir", default="~/.cache/kdfused/lm_demo")
    p.add_argument("--out", default="lm_demo_out", help="where the table, PNG and store go")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    if not 512 <= args.vocab_size <= 32000:
        p.error(f"--vocab-size must be in [512, 32000], got {args.vocab_size}")
    return args


QUICK = dict(
    vocab_size=512,
    train_bytes=200_000,
    heldout_bytes=40_000,
    seq_len=64,
    batch_size=8,
    teacher_layers=2,
    teacher_width=64,
    teacher_heads=2,
    teacher_steps=30,
    student_layers=1,
    student_width=32,
    student_heads=2,
    steps=20,
    eval_windows=16,
    eval_every=10,
)


if __name__ == "__main__":
    main()
