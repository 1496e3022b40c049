"""The sparse teacher's store (DESIGN.md section 6): safetensors shards.

A store is a directory::

    index.json                 {"format": "kdfused.sparse", "version": 1, "k": ..,
                                "vocab_size": .., "store_temperature": .., "tail": ..,
                                "logprob_dtype": .., "rows": .., "shards": [[file, rows], ...]}
    shard-00000.safetensors    "indices" int32 [rows, k], "logprobs" [rows, k], and the
                               same fields as string metadata (plus "first_row")

Shards are written one at a time while a teacher runs over a token dataset
(:class:`ShardWriter`), and read back memory-mapped, any row range at a time
(:class:`SparseStore`, :func:`load`), so a training loop streams its batches
from disk. Every file is checked against the index on open: a wrong vocabulary
or k, a missing, truncated or altered shard is a ValueError naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ._types import SparseTeacher

FORMAT = "kdfused.sparse"
VERSION = 1
INDEX = "index.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _safetensors():
    try:
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError as err:  # an optional dependency: the store's alone
        raise ImportError(
            "kdfused.sparse.save / load need safetensors: pip install 'kdfused[store]' "
            "(or pip install safetensors)"
        ) from err
    return safe_open, save_file


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"logprob dtype must be one of {', '.join(DTYPES)}, got {dtype}")


class ShardWriter:
    """Writes a store shard by shard.

    Args:
        path: the store's directory (created; must not hold a store already).
        vocab_size: V, the teacher's (and student's) vocabulary.
        k: entries kept per row.
        store_temperature: the temperature the log-probabilities were taken at.
        tail: the tail rule a loss reading the store will apply.
        dtype: the log-probabilities' dtype on disk (float16 by default: 6
            bytes per kept entry with the int32 ids).
        shard_rows: rows per shard.

    ``write(teacher)`` appends a :class:`SparseTeacher`'s rows (leading dims
    flattened); ``close()`` (or leaving the ``with`` block) writes the last
    shard and the index. A store without its index is incomplete and is not
    read.
    """

    def __init__(
        self,
        path,
        *,
        vocab_size: int,
        k: int,
        store_temperature: float = 1.0,
        tail: str = "ghost",
        dtype: torch.dtype = torch.float16,
        shard_rows: int = 1 << 16,
    ):
        _safetensors()
        for name, value in (("vocab_size", vocab_size), ("k", k), ("shard_rows", shard_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.path = Path(path)
        if (self.path / INDEX).exists():
            raise FileExistsError(f"{self.path} already holds a sparse-teacher store")
        self.path.mkdir(parents=True, exist_ok=True)
        self.meta = {
            "format": FORMAT,
            "version": VERSION,
            "k": k,
            "vocab_size": vocab_size,
            "store_temperature": float(store_temperature),
            "tail": tail,
            "logprob_dtype": _dtype_name(dtype),
        }
        # Checked as a teacher would be (tail, store_temperature).
        SparseTeacher(
            torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k), tail, store_temperature
        )
        self.dtype = dtype
        self.shard_rows = shard_rows
        self.rows = 0
        self.shards: list[list] = []
        self._pending: list[SparseTeacher] = []
        self._pending_rows = 0
        self._closed = False

    def write(self, teacher: SparseTeacher) -> None:
        """Appends the teacher's rows (moved to the CPU; ids checked to lie in
        [0, V) or be -1)."""
        if self._closed:
            raise ValueError("the store is closed")
        if not isinstance(teacher, SparseTeacher):
            raise TypeError(f"write takes a SparseTeacher, got {type(teacher).__name__}")
        if teacher.k != self.meta["k"]:
            raise ValueError(f"the store keeps k = {self.meta['k']} per row, got k = {teacher.k}")
        if teacher.store_temperature != self.meta["store_temperature"]:
            raise ValueError(
                f"the store's store_temperature is {self.meta['store_temperature']}, got a "
                f"teacher at {teacher.store_temperature}"
            )
        flat = teacher.flatten()
        idx = flat.indices.detach().to("cpu", torch.int64)
        bad = (idx < -1) | (idx >= self.meta["vocab_size"])
        if bool(bad.any()):
            i, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"indices[{i}, {j}] = {int(idx[i, j])} is outside [0, V) with "
                f"V = {self.meta['vocab_size']} (-1 pads)"
            )
        self._pending.append(
            SparseTeacher(
                idx.to(torch.int32),
                flat.logprobs.detach().to("cpu", self.dtype),
                teacher.tail,
                teacher.store_temperature,
            )
        )
        self._pending_rows += len(idx)
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        indices = torch.cat([t.indices for t in self._pending])
        logprobs = torch.cat([t.logprobs for t in self._pending])
        rest = SparseTeacher(indices[rows:], logprobs[rows:], self.meta["tail"])
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)
        name = f"shard-{len(self.shards):05d}.safetensors"
        meta = {key: str(value) for key, value in self.meta.items()}
        meta.update(rows=str(rows), first_row=str(self.rows))
        _, save_file = _safetensors()
        tensors = {"indices": indices[:rows].contiguous(), "logprobs": logprobs[:rows].contiguous()}
        save_file(tensors, str(self.path / name), metadata=meta)
        self.shards.append([name, rows])
        self.rows += rows

    def close(self) -> None:
        """Writes the last (partial) shard and the index."""
        if self._closed:
            return
        if self._pending_rows:
            self._flush(self._pending_rows)
        index = dict(self.meta, rows=self.rows, shards=self.shards)
        tmp = self.path / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.path / INDEX)  # the index appears whole or not at all
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()


def save(
    path,
    teacher: SparseTeacher,
    *,
    vocab_size: int,
    dtype: torch.dtype = torch.float16,
    shard_rows: int = 1 << 16,
) -> None:
    """Writes a whole teacher as a new store (see :class:`ShardWriter`)."""
    with ShardWriter(
        path,
        vocab_size=vocab_size,
        k=teacher.k,
        store_temperature=teacher.store_temperature,
        tail=teacher.tail,
        dtype=dtype,
        shard_rows=shard_rows,
    ) as writer:
        writer.write(teacher)


class SparseStore:
    """A store opened for reading: ``len(store)`` rows; ``store[a:b]`` is a
    :class:`SparseTeacher` of those rows (int32 ids, log-probs in the stored
    dtype), read from the memory-mapped shards it spans.

    Args:
        path: the store's directory.
        vocab_size, k: if given, what the caller expects (e.g. the student's
            vocabulary); a store made for another is an error.
    """

    def __init__(self, path, *, vocab_size: int | None = None, k: int | None = None):
        safe_open, _ = _safetensors()
        self.path = Path(path)
        index_file = self.path / INDEX
        if not index_file.is_file():
            raise ValueError(
                f"{self.path} is not a complete sparse-teacher store: {INDEX} is missing "
                "(a ShardWriter that was not closed leaves none)"
            )
        try:
            index = json.loads(index_file.read_text())
            if index.get("format") != FORMAT or index.get("version") != VERSION:
                raise ValueError(f"format {index.get('format')!r} version {index.get('version')!r}")
            self.k = int(index["k"])
            self.vocab_size = int(index["vocab_size"])
            self.store_temperature = float(index["store_temperature"])
            self.tail = index["tail"]
            self.dtype = DTYPES[index["logprob_dtype"]]
            self.rows = int(index["rows"])
            shards = [(str(name), int(rows)) for name, rows in index["shards"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index_file} is not a {FORMAT} index: {err}") from err
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(
                f"{self.path} was written for a vocabulary of {self.vocab_size}, "
                f"expected {vocab_size}"
            )
        if k is not None and k != self.k:
            raise ValueError(f"{self.path} keeps k = {self.k} per row, expected k = {k}")
        if sum(rows for _, rows in shards) != self.rows:
            raise ValueError(f"{index_file}: the shards' rows do not add up to {self.rows}")
        self._files = []
        self._starts = []
        first = 0
        for name, rows in shards:
            self._files.append(self._open(safe_open, name, rows, first))
            self._starts.append(first)
            first += rows

    def _open(self, safe_open, name: str, rows: int, first: int):
        file = self.path / name
        if not file.is_file():
            raise ValueError(f"{file} is missing from the store (listed in its {INDEX})")
        try:
            handle = safe_open(str(file), framework="pt")
            meta = handle.metadata() or {}
            shapes = {key: handle.get_slice(key).get_shape() for key in ("indices", "logprobs")}
            dtypes = {key: handle.get_slice(key).get_dtype() for key in ("indices", "logprobs")}
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{file} is not a readable safetensors shard: {err}") from err
        expected = {
            "format": FORMAT,
            "k": str(self.k),
            "vocab_size": str(self.vocab_size),
            "store_temperature": str(self.store_temperature),
            "rows": str(rows),
            "first_row": str(first),
        }
        for key, value in expected.items():
            if meta.get(key) != value:
                raise ValueError(
                    f"{file}: its metadata {key} = {meta.get(key)!r} does not match the "
                    f"store's {value!r}"
                )
        want = [rows, self.k]
        if shapes["indices"] != want or shapes["logprobs"] != want:
            raise ValueError(
                f"{file}: indices {shapes['indices']} and logprobs {shapes['logprobs']} "
                f"must both be {want}"
            )
        if dtypes["indices"] != "I32" or dtypes["logprobs"] != _safetensors_dtype(self.dtype):
            raise ValueError(f"{file}: tensors of dtypes {dtypes}, expected I32 ids")
        return handle

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, rows) -> SparseTeacher:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("a store is read by contiguous row ranges: store[start:stop]")
        start, stop, _ = rows.indices(self.rows)
        stop = max(start, stop)
        parts_i, parts_l = [], []
        for handle, first in zip(self._files, self._starts, strict=True):
            n = handle.get_slice("indices").get_shape()[0]
            lo, hi = max(start, first), min(stop, first + n)
            if lo >= hi:
                continue
            parts_i.append(handle.get_slice("indices")[lo - first : hi - first])
            parts_l.append(handle.get_slice("logprobs")[lo - first : hi - first])
        if not parts_i:
            parts_i = [torch.zeros(0, self.k, dtype=torch.int32)]
            parts_l = [torch.zeros(0, self.k, dtype=self.dtype)]
        return SparseTeacher(
            torch.cat(parts_i), torch.cat(parts_l), self.tail, self.store_temperature
        )

    def __repr__(self) -> str:
        return (
            f"SparseStore({str(self.path)!r}, rows={self.rows}, k={self.k}, "
            f"vocab_size={self.vocab_size}, store_temperature={self.store_temperature}, "
            f"tail={self.tail!r}, dtype={self.dtype})"
        )


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]


def load(
    path,
    rows: slice | range | None = None,
    *,
    vocab_size: int | None = None,
    k: int | None = None,
) -> SparseTeacher:
    """Reads rows of a store (all of them by default; ``rows`` a slice or a
    range with step 1) as a :class:`SparseTeacher`; see :class:`SparseStore`."""
    store = SparseStore(path, vocab_size=vocab_size, k=k)
    if rows is None:
        rows = slice(None)
    elif isinstance(rows, range):
        if rows.step != 1:
            raise TypeError("rows must be contiguous (a range with step 1)")
        rows = slice(rows.start, rows.stop)
    return store[rows]
