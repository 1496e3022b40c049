"""``python -m kdfused.store``: the offline teacher, from a model and a dataset
to a compact store (docs/usage.md, "The store CLI").

    python -m kdfused.store build --model DIR --data FILE --out STORE --k 64 [--top-p 0.95]
        [--seq-len 512] [--batch-size 8] [--temperature 1.0] [--dtype float16]
    python -m kdfused.store inspect STORE
    python -m kdfused.store verify STORE

``build`` runs a Hugging Face causal LM saved in DIR (with its tokenizer)
over FILE -- a text file, one document a line; a ``.jsonl`` with a "text"
field; or a ``datasets`` directory saved with ``save_to_disk`` -- in windows
of L tokens (the documents' tokens joined by the tokenizer's EOS, cut into
whole windows), and writes the teacher's top-k (top-p: ragged) log-probabilities
of every window's positions 0 .. L-2 as a :mod:`kdfused.sparse` store, and
beside its shards the windows as a ``datasets`` directory
(``STORE/windows``: ``input_ids``, ``store_start``) that
:class:`kdfused.hf.DistillationTrainer` reads. A build that was killed
continues where it stopped when run again with the same arguments, and its
store equals one built in one go. ``inspect`` prints a store's metadata and
sizes; ``verify`` checks every shard's checksum and exits non-zero naming the
first bad file.

The build's parts are functions of their own (:func:`read_documents`,
:func:`token_windows`, :func:`build_store`), which the LM demo uses too.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from . import sparse
from .sparse_store import DTYPES, INDEX, JOURNAL, SparseStore, _write_atomic

BUILD = "build.json"  # the build's parameters, beside the store's index
WINDOWS = "windows"  # the token windows, a datasets directory in the store's


def read_documents(path) -> Iterator[str]:
    """The documents of a text file (one a line; empty lines skipped), a
    .jsonl (the "text" field of every object), or a datasets directory saved
    with save_to_disk (its "text" column; a DatasetDict's "train" split)."""
    path = Path(path)
    if path.is_dir():
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data:
                raise ValueError(f"{path}: a DatasetDict without a 'train' split: {list(data)}")
            data = data["train"]
        if "text" not in data.column_names:
            raise ValueError(f"{path}: no 'text' column (columns: {data.column_names})")
        yield from (t for t in data["text"] if t)
        return
    if not path.is_file():
        raise FileNotFoundError(f"no data at {path}")
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{path}:{number}: not a JSON line: {err}") from err
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{number}: no string 'text' field")
                if row["text"]:
                    yield row["text"]
        else:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line


def token_windows(tokenizer, documents, seq_len: int) -> torch.Tensor:
    """int64 [W, L]: the documents' tokens, each document followed by the
    tokenizer's EOS (when it has one), joined and cut into whole windows of
    L = seq_len tokens (a last partial window is dropped)."""
    if seq_len < 2:
        raise ValueError(
            f"seq_len must be >= 2 (a position and the token it predicts), got {seq_len}"
        )
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in documents:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"the data holds {len(stream)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def _teacher_rows(model, head, windows, *, k, top_p, temperature, chunk_rows, timing):
    """The teacher's top-k rows of positions 0 .. L-2 of a batch of windows,
    in order: the model's last hidden states, then its logits a chunk of rows
    at a time (never [rows, V] for the whole batch) and their top-k."""
    from .hf import last_hidden_state

    begin = time.perf_counter()
    ids = windows[:, :-1].to(head.weight.device)
    hidden = last_hidden_state(model, ids).flatten(0, 1)
    timing["model"] += time.perf_counter() - begin
    parts = []
    for start in range(0, hidden.shape[0], chunk_rows):
        begin = time.perf_counter()
        h = hidden[start : start + chunk_rows]
        logits = torch.nn.functional.linear(h, head.weight, head.bias)
        if head.logit_scale != 1.0:
            logits = logits * head.logit_scale
        if head.softcap is not None:
            logits = head.softcap * torch.tanh(logits / head.softcap)
        timing["model"] += time.perf_counter() - begin
        begin = time.perf_counter()
        parts.append(sparse.topk(logits, k, temperature, top_p=top_p).compact().to("cpu"))
        timing["topk"] += time.perf_counter() - begin
    return parts


def build_store(
    model,
    windows: torch.Tensor,
    out,
    *,
    k: int,
    top_p: float | None = None,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float16,
    batch_size: int = 8,
    shard_rows: int = 1 << 16,
    chunk_rows: int = 4096,
    progress: bool = True,
    resume: bool = False,
) -> dict:
    """Writes the teacher `model`'s top-k (top-p) rows of every position 0 ..
    L-2 of `windows` ([W, L] token ids), window after window, as a store at
    `out`. With resume, a store whose writer was killed continues from its
    last complete shard: the batch it was in is computed again (the same
    windows together, so the same bits) and its rows already stored skipped.
    Returns the build's measurements: tokens, seconds, tokens/s, and the
    seconds spent in the model, in top-k and in writing."""
    from tqdm.auto import tqdm

    from .hf import lm_head

    head = lm_head(model)
    vocab = head.weight.shape[0]
    n, length = windows.shape
    per_window = length - 1
    writer = sparse.ShardWriter(
        out,
        vocab_size=vocab,
        k=k,
        store_temperature=temperature,
        dtype=dtype,
        shard_rows=shard_rows,
        resume=resume,
    )
    timing = {"model": 0.0, "topk": 0.0, "write": 0.0}
    begin = time.perf_counter()
    per_batch = batch_size * per_window
    first = writer.rows // per_batch
    skip = writer.rows - first * per_batch
    model.eval()
    with writer, torch.no_grad():
        batches = range(first * batch_size, n, batch_size)
        for start in tqdm(batches, desc="teacher top-k", disable=not progress, unit="batch"):
            rows = _teacher_rows(
                model,
                head,
                windows[start : start + batch_size],
                k=k,
                top_p=top_p,
                temperature=temperature,
                chunk_rows=chunk_rows,
                timing=timing,
            )
            t0 = time.perf_counter()
            for part in rows:
                if skip >= len(part):
                    skip -= len(part)
                    continue
                writer.write(part[skip:])
                skip = 0
            timing["write"] += time.perf_counter() - t0
        t0 = time.perf_counter()
    timing["write"] += time.perf_counter() - t0
    seconds = time.perf_counter() - begin
    tokens = (n - first * batch_size) * per_window
    return dict(
        tokens=tokens,
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds else float("inf"),
        model_seconds=timing["model"],
        topk_seconds=timing["topk"],
        write_seconds=timing["write"],
    )


def _fingerprint(path: Path) -> str:
    """A file's or directory's identity for resuming: sizes and times of its
    files (not its bytes: reading a large corpus twice is what resume saves)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    listing = [
        (
            str(p.relative_to(path) if path.is_dir() else p.name),
            p.stat().st_size,
            p.stat().st_mtime_ns,
        )
        for p in files
    ]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _build(args) -> int:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(args.out)
    params = dict(
        model=str(Path(args.model).resolve()),
        data=str(Path(args.data).resolve()),
        data_fingerprint=_fingerprint(Path(args.data)),
        k=args.k,
        top_p=args.top_p,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        temperature=args.temperature,
        dtype=args.dtype,
        shard_rows=args.shard_rows,
    )
    if (out / INDEX).exists():
        print(f"{out} is a finished store: nothing to do (inspect it, or choose another --out)")
        return 0
    resume = (out / JOURNAL).exists()
    if resume:
        try:
            before = json.loads((out / BUILD).read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"{out} holds an unfinished store without its {BUILD}: {err}") from err
        differ = [key for key in params if before.get(key) != params[key]]
        if differ:
            raise SystemExit(
                f"{out} is an unfinished build with other arguments ({', '.join(differ)}): "
                "run it again with the same ones to continue, or choose another --out"
            )
        print(f"continuing the unfinished build at {out}")
    elif out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not an unfinished build: choose another --out")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    windows = token_windows(tokenizer, read_documents(args.data), args.seq_len)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        _write_atomic(out / BUILD, json.dumps(params, indent=1).encode())
    if not (out / WINDOWS).exists():
        per_window = args.seq_len - 1
        table = datasets.Dataset.from_dict(
            {
                "input_ids": windows.tolist(),
                "store_start": [i * per_window for i in range(len(windows))],
            }
        )
        tmp = out / (WINDOWS + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
        table.save_to_disk(str(tmp))
        os.replace(tmp, out / WINDOWS)
    report = build_store(
        model,
        windows,
        out,
        k=args.k,
        top_p=args.top_p,
        temperature=args.temperature,
        dtype=DTYPES[args.dtype],
        batch_size=args.batch_size,
        shard_rows=args.shard_rows,
        progress=not args.quiet,
        resume=resume,
    )
    store = SparseStore(out)
    print(json.dumps(dict(report, **_sizes(store)), indent=1))
    return 0


def _sizes(store: SparseStore) -> dict:
    files = [store.path / name for name in store._names]
    shard_bytes = sum(f.stat().st_size for f in files)
    rows = len(store)
    entries = store.entries
    return dict(
        rows=rows,
        entries=entries,
        ids_per_row=entries / rows if rows and entries is not None else None,
        shard_bytes=shard_bytes,
        bytes_per_row=shard_bytes / rows if rows else None,
    )


def _inspect(args) -> int:
    store = SparseStore(args.store)
    info = dict(
        path=str(store.path),
        version=store.version,
        vocab_size=store.vocab_size,
        k=store.k,
        tail=store.tail,
        store_temperature=store.store_temperature,
        logprob_dtype=str(store.dtype).removeprefix("torch."),
        id_bytes=store.id_bytes,
        shards=len(store._names),
        checksum=store.checksum,
        **_sizes(store),
    )
    build = store.path / BUILD
    if build.is_file():
        info["build"] = json.loads(build.read_text())
    windows = store.path / WINDOWS
    if windows.is_dir():
        info["windows"] = str(windows)
    print(json.dumps(info, indent=1))
    return 0


def _verify(args) -> int:
    begin = time.perf_counter()
    try:
        store = SparseStore(args.store)
        verified = store.verify()
    except ValueError as err:
        print(f"kdfused.store verify: {err}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - begin
    if not verified:
        print(f"{store.path}: a version-{store.version} store has no checksums to verify")
        return 1
    megabytes = _sizes(store)["shard_bytes"] / 1e6
    print(
        f"{store.path}: {len(store._names)} shards, {megabytes:.1f} MB verified in "
        f"{seconds:.2f} s ({megabytes / max(seconds, 1e-9):.0f} MB/s)"
    )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdfused.store", description=__doc__.split("\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="a teacher's top-k store from a model and a dataset")
    b.add_argument("--model", required=True, help="a causal LM saved with save_pretrained")
    b.add_argument("--data", required=True, help="a .txt, a .jsonl, or a datasets directory")
    b.add_argument("--out", required=True, help="the store's directory")
    b.add_argument("--k", type=int, required=True, help="the most ids a row keeps")
    b.add_argument("--top-p", type=float, default=None, help="keep the ids that reach this mass")
    b.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    b.add_argument("--batch-size", type=int, default=8, help="windows per teacher forward")
    b.add_argument("--temperature", type=float, default=1.0, help="the store's temperature")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    b.add_argument("--shard-rows", type=int, default=1 << 16, help="rows per shard")
    b.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    i = commands.add_parser("inspect", help="a store's metadata and sizes")
    i.add_argument("store")
    v = commands.add_parser("verify", help="check every shard's checksum")
    v.add_argument("store")
    args = p.parse_args(argv)
    return {"build": _build, "inspect": _inspect, "verify": _verify}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
