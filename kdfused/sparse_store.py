"""The sparse teacher's store: safetensors shards (docs/usage.md, the store).

A store is a directory::

    index.json                 {"format": "kdfused.sparse", "version": 3, "store_id": ..,
                                "k": .., "vocab_size": .., "store_temperature": .., "tail": ..,
                                "logprob_dtype": .., "id_bytes": .., "shard_rows": ..,
                                "rows": .., "shards": [[file, rows], ...], "checksum": "crc32",
                                "checksums": {file: [bytes, hex digest], ...}}
    shard-00000.safetensors    "lengths" uint16 [rows] (the ids each row keeps, at most k),
                               "indices" [entries] (as few bytes an id as V needs, id_bytes:
                               uint16 for V <= 65536, three uint8 [entries, 3] little-endian
                               for V <= 2^24, else int32), "logprobs" [entries], and the
                               index's fields as string metadata (plus "rows", "first_row",
                               "entries")

Rows are ragged: a row stores the ids it keeps and nothing for the ones it
does not (a top-p row of 5 ids takes 5 entries, not k), 4 bytes an entry with
2-byte ids and float16 log-probabilities, and 2 bytes a row for its length.
They read back as a ragged :class:`SparseTeacher` (offsets), uint16 ids as
they are on disk (the kernels read them), 3-byte ids decoded to int32 in one
pass.

Shards are written one at a time while a teacher runs over a token dataset
(:class:`ShardWriter`), and read back memory-mapped, any row range at a time
(:class:`SparseStore`, :func:`load`), so a training loop streams its batches
from disk.

What holds (docs/usage.md, the store):

- A row given to ``write()`` ends in the finished store at its place, or the
  store is not finished: a shard is written to a temporary name, fsynced and
  renamed; a failed write raises and keeps its rows pending; ``index.json`` is
  written last, so a store without it is not read.
- One writer per directory: ``writer.lock``, held with ``flock`` (released by
  the kernel when the writer's process dies, so a killed writer blocks nobody).
- ``journal.json``, rewritten atomically after each shard, records the
  complete shards with their checksums: ``ShardWriter(..., resume=True)``
  continues a writer that was killed, from ``writer.rows``.
- The index records every shard's size and checksum and the store's id, which
  every shard's metadata repeats: a shard altered, truncated or copied from
  another store is a ValueError naming the file when the store is opened or,
  for the checksum, when a row of that shard is first read;
  :meth:`SparseStore.verify` checks every shard.

Version-1 and version-2 stores (padded rows: int32 ids [rows, k]) are still
read, as padded teachers; version 1 has no store id and no checksums, so its
shards cannot be verified.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import uuid
import warnings
import zlib
from bisect import bisect_right
from collections import deque
from pathlib import Path

import torch

from ._types import SparseTeacher

FORMAT = "kdfused.sparse"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# The most ids a row keeps in a version-3 store (its length is a uint16).
MAX_K = 65535
INDEX = "index.json"
JOURNAL = "journal.json"
LOCK = "writer.lock"
TMP = ".tmp"  # suffix of a file being written; never read
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")
# What the writer's parameters are called in the index (and the journal).
PARAMETERS = {
    "vocab_size": "vocab_size",
    "k": "k",
    "store_temperature": "store_temperature",
    "tail": "tail",
    "dtype": "logprob_dtype",
    "shard_rows": "shard_rows",
}


class _Crc32:
    """zlib.crc32 behind hashlib's update / hexdigest."""

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


# The checksum an index names (the "checksum" field) and its implementation.
# zlib.crc32 is the standard library's fastest (2.4-4.2 GB/s in memory on a
# 2-core EPYC, hashlib.sha256 1.1-1.6, blake2b 0.5) and catches every burst of
# up to 32 flipped bits; the store id, not the checksum, tells one store's
# shards from another's. It guards against damage, not against an adversary.
CHECKSUMS = {"crc32": _Crc32}
CHECKSUM = "crc32"
_CHUNK = 1 << 20  # bytes hashed per read of a shard file (64 KiB to 4 MiB: the same speed)


def _safetensors():
    try:
        from safetensors import safe_open
        from safetensors.torch import save
    except ImportError as err:  # an optional dependency: the store's alone
        raise ImportError(
            "kdfused.sparse.save / load need safetensors: pip install 'kdfused[store]' "
            "(or pip install safetensors)"
        ) from err
    return safe_open, save


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"logprob dtype must be one of {', '.join(DTYPES)}, got {dtype}")


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]


def id_bytes_for(vocab_size: int) -> int:
    """Bytes a version-3 store spends on an id of a V-id vocabulary."""
    return 2 if vocab_size <= 1 << 16 else 3 if vocab_size <= 1 << 24 else 4


def _encode_ids(ids: torch.Tensor, id_bytes: int) -> torch.Tensor:
    """int64/int32 ids in [0, V) as stored: uint16, uint8 [e, 3] or int32."""
    if id_bytes == 2:
        return ids.to(torch.int32).to(torch.uint16)
    if id_bytes == 3:
        x = ids.to(torch.int32)
        return torch.stack([(x >> shift) & 0xFF for shift in (0, 8, 16)], -1).to(torch.uint8)
    return ids.to(torch.int32)


def _decode_ids(stored: torch.Tensor, id_bytes: int) -> torch.Tensor:
    """Stored ids as the kernels read them: uint16 as they are, 3-byte ids as
    int32 (one pass), int32 as they are."""
    if id_bytes != 3:
        return stored
    x = stored.to(torch.int32)
    return x[:, 0] | (x[:, 1] << 8) | (x[:, 2] << 16)


# The stored ids' safetensors dtype and shape, per id_bytes ([entries] or [entries, 3]).
_ID_LAYOUT = {2: ("U16", False), 3: ("U8", True), 4: ("I32", False)}
_ID_DTYPES = {2: torch.uint16, 3: torch.uint8, 4: torch.int32}


def _digest(data, algorithm: str = CHECKSUM) -> str:
    h = CHECKSUMS[algorithm]()
    h.update(data)
    return h.hexdigest()


def _file_digest(file: Path, algorithm: str) -> tuple[int, str]:
    """(size in bytes, checksum) of a file, read in chunks."""
    h = CHECKSUMS[algorithm]()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(file: Path, data: bytes) -> None:
    """Writes ``data`` as ``file``, whole or not at all: to a temporary name,
    fsynced, renamed over ``file``, the directory fsynced. On an error the
    temporary file is removed and the error raised."""
    tmp = file.with_name(file.name + TMP)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(file.parent)


def _plain_name(name, where) -> str:
    """A shard's name from an index: a plain file name inside the store."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise ValueError(
            f"{where}: shard name {name!r} is not a plain file name inside the store's directory"
        )
    return name


class _Lock:
    """An exclusive ``flock`` on ``directory/writer.lock``, held while a writer
    is open. The kernel releases it when the holder's process dies, however it
    dies, so a killed writer does not block the next one. On release the file
    is removed while still locked; a writer that locked a file some other
    writer has since removed (its inode no longer the path's) tries again."""

    def __init__(self, directory: Path):
        self.file = directory / LOCK
        self.fd = None
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise BlockingIOError(
                    errno.EAGAIN,
                    f"{directory} is being written by another ShardWriter (pid {holder}, "
                    f"holding {LOCK}): a store takes one writer at a time",
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.file))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.file)
        os.close(self.fd)
        self.fd = None

    def __del__(self):
        self.release()


class ShardWriter:
    """Writes a store shard by shard.

    Args:
        path: the store's directory (created; must not hold a store already,
            unless ``resume``).
        vocab_size: V, the teacher's (and student's) vocabulary.
        k: the most ids a row keeps (rows are stored ragged: a row that
            keeps fewer, a top-p row or a padded one, takes only its own).
        store_temperature: the temperature the log-probabilities were taken at.
        tail: the tail rule a loss reading the store will apply; every teacher
            written must have it.
        dtype: the log-probabilities' dtype on disk (float16 by default: 4
            bytes per kept entry with 2-byte ids).
        shard_rows: rows per shard.
        resume: continue the unfinished store at ``path`` whose writer was
            killed: its complete shards (checked against their checksums) are
            kept, anything after them dropped, and ``rows`` says how many rows
            the store holds, so the producer continues from row ``rows``. The
            other arguments must equal the ones the store was started with.
            A finished store is not reopened (FileExistsError); an empty or
            missing directory starts a new store.

    ``write(teacher)`` appends a :class:`SparseTeacher`'s rows (leading dims
    flattened); ``close()`` (or leaving the ``with`` block) writes the last
    shard and the index. A store without its index is incomplete and is not
    read. ``rows`` counts the rows in complete shards.

    A shard write that fails (disk full, a file-size limit, ...) raises the
    OSError from ``write()`` or ``close()`` and keeps the shard's rows
    pending: the rows given are not to be written again; the next ``write()``
    or ``close()`` tries again. Leaving the ``with`` block on an exception
    releases the store unfinished (resume it with ``resume=True``).
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
        resume: bool = False,
    ):
        _safetensors()
        for name, value in (("vocab_size", vocab_size), ("k", k), ("shard_rows", shard_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.path = Path(path)
        if k > MAX_K:
            raise ValueError(f"k must be at most {MAX_K} (a row's length is a uint16), got {k}")
        self.meta = {
            "format": FORMAT,
            "version": VERSION,
            "k": k,
            "vocab_size": vocab_size,
            "store_temperature": float(store_temperature),
            "tail": tail,
            "logprob_dtype": _dtype_name(dtype),
            "id_bytes": id_bytes_for(vocab_size),
        }
        # Checked as a teacher would be (tail, store_temperature).
        SparseTeacher(
            torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k), tail, store_temperature
        )
        self.dtype = dtype
        self.shard_rows = shard_rows
        self.rows = 0
        self.shards: list[list] = []
        self.checksums: dict[str, list] = {}
        # (lengths [r], ids [e], logprobs [e]) of rows given and not yet in a shard.
        self._pending: deque[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = deque()
        self._pending_rows = 0
        self._closed = False
        self._lock = None
        if (self.path / INDEX).exists():  # before anything is created there
            raise FileExistsError(self._finished_message(resume))
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _Lock(self.path)
        try:
            self._start(resume)
        except BaseException:
            self._release()
            raise

    def _finished_message(self, resume: bool) -> str:
        message = f"{self.path} already holds a sparse-teacher store (its {INDEX} is written)"
        if resume:
            message += "; resume=True continues an unfinished store, never a finished one"
        return message

    def _start(self, resume: bool) -> None:
        if (self.path / INDEX).exists():  # finished by a writer that closed after the check
            raise FileExistsError(self._finished_message(resume))
        unfinished = (self.path / JOURNAL).exists()
        if unfinished and not resume:
            raise FileExistsError(
                f"{self.path} holds an unfinished sparse-teacher store (its writer did not "
                "close): pass resume=True to continue it from its last complete shard, or "
                "remove it"
            )
        strays = sorted(p.name for p in self.path.iterdir() if SHARD_NAME.fullmatch(p.name))
        if strays and not unfinished:
            raise FileExistsError(
                f"{self.path} holds shard files ({strays[0]}, ...) but no {JOURNAL}: not a "
                f"store this writer can {'resume' if resume else 'write'} (a version-1 "
                "writer's unfinished store?); remove them or choose another directory"
            )
        for name in (JOURNAL + TMP, INDEX + TMP):  # a kill while one was being written
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        if unfinished:
            self._resume()
        else:
            self.store_id = uuid.uuid4().hex
            self._write_journal(0, [], {})

    def _resume(self) -> None:
        journal = self.path / JOURNAL
        try:
            state = json.loads(journal.read_text())
            if not isinstance(state, dict):
                raise ValueError(f"a JSON {type(state).__name__}, not an object")
            if state.get("format") != FORMAT or state.get("version") != VERSION:
                raise ValueError(f"format {state.get('format')!r} version {state.get('version')!r}")
            store_id = str(state["store_id"])
            algorithm = state["checksum"]
            shards = [(str(name), int(rows)) for name, rows in state["shards"]]
            checksums = {
                str(name): (int(size), str(hexdigest))
                for name, (size, hexdigest) in state["checksums"].items()
            }
            stored = {key: state[key] for key in PARAMETERS.values()}
            if sum(rows for _, rows in shards) != int(state["rows"]):
                raise ValueError("its shards' rows do not add up to its rows")
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{journal} is not a {FORMAT} journal: {err}") from err
        given = dict(self.meta, shard_rows=self.shard_rows)
        for argument, key in PARAMETERS.items():
            if stored[key] != given[key]:
                raise ValueError(
                    f"resume: the store at {self.path} was started with {argument} = "
                    f"{stored[key]!r}, got {argument} = {given[key]!r}"
                )
        if algorithm not in CHECKSUMS or set(checksums) != {name for name, _ in shards}:
            raise ValueError(f"{journal}: its checksums do not cover its shards")
        first = 0
        for i, (name, rows) in enumerate(shards):
            file = self.path / name
            if name != f"shard-{i:05d}.safetensors" or rows != self.shard_rows:
                raise ValueError(f"{journal}: shard {i} is {name!r} of {rows} rows")
            if not file.is_file():
                raise ValueError(
                    f"{file} is missing: {JOURNAL} records it as a complete shard "
                    f"(rows {first}..{first + rows}); resume cannot continue without it"
                )
            if _file_digest(file, algorithm) != checksums[name]:
                raise ValueError(
                    f"{file}: its bytes do not match the checksum {JOURNAL} recorded when it "
                    f"was written (altered since?); resume cannot keep it"
                )
            first += rows
        # What a killed writer left after its last recorded shard: a shard
        # renamed before the journal named it, or a temporary file.
        kept = {name for name, _ in shards}
        for p in self.path.iterdir():
            name = p.name
            partial = name.endswith(TMP) and SHARD_NAME.fullmatch(name[: -len(TMP)])
            if partial or (SHARD_NAME.fullmatch(name) and name not in kept):
                p.unlink()
        _fsync_dir(self.path)
        self.store_id = store_id
        self.shards = [[name, rows] for name, rows in shards]
        self.checksums = {name: list(value) for name, value in checksums.items()}
        self.rows = first

    def _state(self, rows: int, shards: list, checksums: dict) -> dict:
        return dict(
            self.meta,
            store_id=self.store_id,
            shard_rows=self.shard_rows,
            rows=rows,
            shards=shards,
            checksum=CHECKSUM,
            checksums=checksums,
        )

    def _write_journal(self, rows: int, shards: list, checksums: dict) -> None:
        # Rewritten whole after every shard: compact, ~70 bytes a shard.
        state = self._state(rows, shards, checksums)
        _write_atomic(self.path / JOURNAL, json.dumps(state, separators=(",", ":")).encode())

    def write(self, teacher: SparseTeacher) -> None:
        """Appends the teacher's rows (moved to the CPU; ids checked to lie in
        [0, V) or be -1). A teacher that does not fit the store (k, tail,
        store_temperature, ids) is an error and none of its rows are taken; an
        OSError writing a shard leaves them taken and pending (see the class)."""
        if self._closed:
            raise ValueError("the store is closed")
        if self._lock is None:
            raise ValueError(
                "the writer was released unfinished after an error: continue the store "
                "with ShardWriter(..., resume=True)"
            )
        if not isinstance(teacher, SparseTeacher):
            raise TypeError(f"write takes a SparseTeacher, got {type(teacher).__name__}")
        if teacher.store_temperature != self.meta["store_temperature"]:
            raise ValueError(
                f"the store's store_temperature is {self.meta['store_temperature']}, got a "
                f"teacher at {teacher.store_temperature}"
            )
        if teacher.tail != self.meta["tail"]:
            raise ValueError(
                f"the store's tail is {self.meta['tail']!r}, got a teacher with tail = "
                f"{teacher.tail!r} (a loss reading the store applies the store's)"
            )
        if not teacher.ragged:
            flat = teacher.flatten()
            idx = flat.indices.detach().to("cpu", torch.int64)
            bad = (idx < -1) | (idx >= self.meta["vocab_size"])
            if bool(bad.any()):
                i, j = (int(x) for x in bad.nonzero()[0])
                raise ValueError(
                    f"indices[{i}, {j}] = {int(idx[i, j])} is outside [0, V) with "
                    f"V = {self.meta['vocab_size']} (-1 pads)"
                )
        rows = teacher.to("cpu").compact()
        lengths = rows.lengths()
        ids = rows.indices.to(torch.int64)
        bad = (ids < 0) | (ids >= self.meta["vocab_size"])
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            row = int(torch.searchsorted(rows.offsets, j, right=True)) - 1
            raise ValueError(
                f"row {row} keeps id {int(ids[j])}, outside [0, V) with "
                f"V = {self.meta['vocab_size']}"
            )
        if len(lengths) and int(lengths.max()) > self.meta["k"]:
            row = int(lengths.argmax())
            raise ValueError(
                f"the store keeps at most k = {self.meta['k']} ids per row, row {row} of the "
                f"teacher keeps {int(lengths[row])}"
            )
        # Copies: the caller may reuse its tensors while the rows are pending.
        logprobs = rows.logprobs.detach().to(self.dtype, copy=True)
        self._pending.append((lengths, ids.to(torch.int32, copy=True), logprobs))
        self._pending_rows += len(lengths)
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int, *, last: bool = False) -> None:
        """Writes the first ``rows`` pending rows as the next shard, then the
        journal (the index for the ``last`` shard, which finishes the store);
        only when both are on disk are the rows taken off the pending ones. On
        an error nothing changes but the error is raised (a shard file left
        behind is not in the journal: it is rewritten, or dropped by resume)."""
        parts_n, parts_i, parts_l, need = [], [], [], rows
        for lengths, indices, logprobs in self._pending:
            take = min(need, len(lengths))
            entries = int(lengths[:take].sum())
            parts_n.append(lengths[:take])
            parts_i.append(indices[:entries])
            parts_l.append(logprobs[:entries])
            need -= take
            if not need:
                break
        ids = torch.cat(parts_i)
        name = f"shard-{len(self.shards):05d}.safetensors"
        meta = {key: str(value) for key, value in self.meta.items()}
        meta.update(
            store_id=self.store_id, rows=str(rows), first_row=str(self.rows), entries=str(len(ids))
        )
        _, save = _safetensors()
        tensors = {
            "lengths": torch.cat(parts_n).to(torch.int32).to(torch.uint16),
            "indices": _encode_ids(ids, self.meta["id_bytes"]),
            "logprobs": torch.cat(parts_l),
        }
        data = save(tensors, metadata=meta)
        shards = [*self.shards, [name, rows]]
        checksums = dict(self.checksums)
        checksums[name] = [len(data), _digest(data)]
        try:
            _write_atomic(self.path / name, data)
            if last:
                index = self._state(self.rows + rows, shards, checksums)
                _write_atomic(self.path / INDEX, json.dumps(index, indent=1).encode())
            else:
                self._write_journal(self.rows + rows, shards, checksums)
        except OSError as err:
            err.add_note(
                f"kdfused: shard {name} of {self.path} was not written; its {rows} rows stay "
                f"pending with any after them (do not write them again): the next write() or "
                f"close() tries again"
            )
            raise
        self.shards, self.checksums = shards, checksums
        self.rows += rows
        self._pending_rows -= rows
        while rows:
            lengths, indices, logprobs = self._pending[0]
            if len(lengths) <= rows:
                self._pending.popleft()
                rows -= len(lengths)
            else:
                entries = int(lengths[:rows].sum())
                self._pending[0] = (lengths[rows:], indices[entries:], logprobs[entries:])
                rows = 0

    def close(self) -> None:
        """Writes the last (partial) shard and the index, which finishes the
        store, and releases it. If a write fails, the error is raised and the
        store stays unfinished and held: ``close()`` may be called again."""
        if self._closed:
            return
        if self._lock is None:
            raise ValueError(
                "the writer was released unfinished after an error: continue the store "
                "with ShardWriter(..., resume=True)"
            )
        while self._pending_rows > self.shard_rows:  # left by failed writes
            self._flush(self.shard_rows)
        if self._pending_rows:
            self._flush(self._pending_rows, last=True)
        else:
            index = self._state(self.rows, self.shards, self.checksums)
            _write_atomic(self.path / INDEX, json.dumps(index, indent=1).encode())
        self._closed = True  # the index is on disk: the store is finished
        try:
            with contextlib.suppress(FileNotFoundError):
                (self.path / JOURNAL).unlink()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:  # unfinished, as its journal says; another writer may resume it
            self._release()


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


def _read_index(path: Path) -> dict:
    index_file = path / INDEX
    if not index_file.is_file():
        message = (
            f"{path} is not a complete sparse-teacher store: {INDEX} is missing "
            "(a ShardWriter that was not closed leaves none)"
        )
        if (path / JOURNAL).is_file():
            message += f"; its {JOURNAL} says so: continue it with ShardWriter(..., resume=True)"
        raise ValueError(message)
    try:
        index = json.loads(index_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{index_file} is not a {FORMAT} index: {err}") from err
    if not isinstance(index, dict):
        raise ValueError(
            f"{index_file} is not a {FORMAT} index: a JSON {type(index).__name__} where an "
            "object is expected"
        )
    return index


class SparseStore:
    """A store opened for reading: ``len(store)`` rows; ``store[a:b]`` is a
    :class:`SparseTeacher` of those rows (int32 ids, log-probs in the stored
    dtype), read from the memory-mapped shards it spans.

    Every shard's metadata, size and tensor shapes are checked against the
    index on open; its checksum when a row of it is first read (or by
    :meth:`verify`). A store pickles (for DataLoader workers): the copy
    reopens the shards on its first read, and keeps which were verified.

    Args:
        path: the store's directory.
        vocab_size, k: if given, what the caller expects (e.g. the student's
            vocabulary); a store made for another is an error.
    """

    def __init__(self, path, *, vocab_size: int | None = None, k: int | None = None):
        _safetensors()
        self.path = Path(path)
        index = _read_index(self.path)
        index_file = self.path / INDEX
        try:
            version = index.get("version")
            if index.get("format") != FORMAT or type(version) is not int:
                raise ValueError(f"format {index.get('format')!r} version {version!r}")
            if version not in READABLE_VERSIONS:
                raise ValueError(
                    f"version {version} (this kdfused reads versions "
                    f"{', '.join(map(str, READABLE_VERSIONS))})"
                )
            self.version = version
            self.k = int(index["k"])
            self.vocab_size = int(index["vocab_size"])
            self.store_temperature = float(index["store_temperature"])
            self.tail = index["tail"]
            self.dtype = DTYPES[index["logprob_dtype"]]
            self.rows = int(index["rows"])
            self.id_bytes = int(index["id_bytes"]) if version >= 3 else None
            if version >= 3 and self.id_bytes not in _ID_LAYOUT:
                raise ValueError(f"id_bytes {self.id_bytes} (2, 3 or 4)")
            shards = [(name, int(rows)) for name, rows in index["shards"]]
            if version >= 2:
                self.store_id = str(index["store_id"])
                self.checksum = index["checksum"]
                if self.checksum not in CHECKSUMS:
                    raise ValueError(f"unknown checksum {self.checksum!r}")
                checksums = {
                    str(name): (int(size), str(hexdigest))
                    for name, (size, hexdigest) in index["checksums"].items()
                }
                if set(checksums) != {name for name, _ in shards}:
                    raise ValueError("its checksums do not cover its shards")
            else:
                self.store_id = self.checksum = None
                checksums = {}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index_file} is not a {FORMAT} index: {err}") from err
        for name, _ in shards:
            _plain_name(name, index_file)
        if self.tail not in ("ghost", "renormalize"):
            raise ValueError(f"{index_file}: tail {self.tail!r} is not 'ghost' or 'renormalize'")
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(
                f"{self.path} was written for a vocabulary of {self.vocab_size}, "
                f"expected {vocab_size}"
            )
        if k is not None and k != self.k:
            raise ValueError(f"{self.path} keeps k = {self.k} per row, expected k = {k}")
        if sum(rows for _, rows in shards) != self.rows:
            raise ValueError(f"{index_file}: the shards' rows do not add up to {self.rows}")
        if len({name for name, _ in shards}) != len(shards):
            raise ValueError(f"{index_file} lists a shard twice")
        self._names = [name for name, _ in shards]
        self._rows = [rows for _, rows in shards]
        self._starts = []
        first = 0
        for rows in self._rows:
            self._starts.append(first)
            first += rows
        self._checksums = [checksums.get(name) for name in self._names]
        self._verified = [False] * len(shards)
        self._entries = [None] * len(shards)  # version 3: each shard's entries
        self._files = None
        self._handles()  # every shard opened and checked now

    def _handles(self) -> list:
        if self._files is None:
            safe_open, _ = _safetensors()
            self._files = [
                self._open(safe_open, i, name, rows, first)
                for i, (name, rows, first) in enumerate(
                    zip(self._names, self._rows, self._starts, strict=True)
                )
            ]
        return self._files

    def _open(self, safe_open, i: int, name: str, rows: int, first: int):
        file = self.path / name
        if not file.is_file():
            raise ValueError(f"{file} is missing from the store (listed in its {INDEX})")
        if self._checksums[i] is not None:
            size, want = file.stat().st_size, self._checksums[i][0]
            if size != want:
                raise ValueError(
                    f"{file} is {size} bytes, its store's {INDEX} records {want}: the shard "
                    "is truncated, altered or from another store"
                )
        ragged = self.version >= 3
        keys = ("lengths", "indices", "logprobs") if ragged else ("indices", "logprobs")
        try:
            handle = safe_open(str(file), framework="pt")
            meta = handle.metadata() or {}
            shapes = {key: handle.get_slice(key).get_shape() for key in keys}
            dtypes = {key: handle.get_slice(key).get_dtype() for key in keys}
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{file} is not a readable safetensors shard: {err}") from err
        if self.store_id is not None and meta.get("store_id") != self.store_id:
            raise ValueError(
                f"{file} belongs to another store: its store_id {meta.get('store_id')!r} is "
                f"not this store's {self.store_id!r} (a shard copied from another store?)"
            )
        expected = {
            "format": FORMAT,
            "version": str(self.version),
            "k": str(self.k),
            "vocab_size": str(self.vocab_size),
            "store_temperature": str(self.store_temperature),
            "tail": self.tail,
            "logprob_dtype": _dtype_name(self.dtype),
            "rows": str(rows),
            "first_row": str(first),
        }
        if ragged:
            expected["id_bytes"] = str(self.id_bytes)
        for key, value in expected.items():
            if meta.get(key) != value:
                raise ValueError(
                    f"{file}: its metadata {key} = {meta.get(key)!r} does not match the "
                    f"store's {value!r}"
                )
        logprob_dtype = _safetensors_dtype(self.dtype)
        if not ragged:
            want = [rows, self.k]
            if shapes["indices"] != want or shapes["logprobs"] != want:
                raise ValueError(
                    f"{file}: indices {shapes['indices']} and logprobs {shapes['logprobs']} "
                    f"must both be {want}"
                )
            if dtypes["indices"] != "I32" or dtypes["logprobs"] != logprob_dtype:
                raise ValueError(
                    f"{file}: tensors of dtypes {dtypes}, expected I32 ids and "
                    f"{logprob_dtype} log-probabilities"
                )
            return handle
        try:
            entries = int(meta.get("entries"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{file}: its metadata entries = {meta.get('entries')!r}") from err
        self._entries[i] = entries
        id_dtype, triple = _ID_LAYOUT[self.id_bytes]
        want = {
            "lengths": [rows],
            "indices": [entries, 3] if triple else [entries],
            "logprobs": [entries],
        }
        want_dtypes = {"lengths": "U16", "indices": id_dtype, "logprobs": logprob_dtype}
        if shapes != want or dtypes != want_dtypes:
            raise ValueError(
                f"{file}: tensors of shapes {shapes} and dtypes {dtypes}, expected {want} "
                f"and {want_dtypes}"
            )
        return handle

    def _verify_shard(self, i: int) -> None:
        file = self.path / self._names[i]
        want_size, want = self._checksums[i]
        try:
            size, got = _file_digest(file, self.checksum)
        except OSError as err:
            raise ValueError(f"{file} cannot be read to check its checksum: {err}") from err
        if (size, got) != (want_size, want):
            raise ValueError(
                f"{file}: its bytes do not match its store's {INDEX} ({self.checksum} {got} of "
                f"{size} bytes, recorded {want} of {want_size}): the shard is damaged, "
                "truncated or from another store"
            )
        self._verified[i] = True

    def verify(self) -> bool:
        """Checks every shard's bytes against the checksum in the index;
        raises a ValueError naming the first that differs. Returns True; a
        version-1 store, whose index holds no checksums, cannot be verified:
        a warning says so and False is returned."""
        if self.checksum is None:
            warnings.warn(
                f"{self.path} is a version-{self.version} store: its {INDEX} holds no "
                "checksums, so its shards cannot be verified (rewrite it to get them)",
                stacklevel=2,
            )
            return False
        self._handles()
        for i in range(len(self._names)):
            self._verify_shard(i)
        return True

    def __len__(self) -> int:
        return self.rows

    @property
    def entries(self) -> int:
        """The ids the store keeps, all rows together (padded stores: rows x k)."""
        if self.version < 3:
            return self.rows * self.k
        self._handles()
        return sum(self._entries)

    def __getitem__(self, rows) -> SparseTeacher:
        """Rows [start:stop] as a SparseTeacher: ragged (version 3: uint16
        ids as stored, or 3-byte ids as int32) or padded int32 [rows, k]
        (versions 1 and 2)."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("a store is read by contiguous row ranges: store[start:stop]")
        start, stop, _ = rows.indices(self.rows)
        stop = max(start, stop)
        files = self._handles()
        parts: list[tuple] = []
        i = max(bisect_right(self._starts, start) - 1, 0)
        while start < stop and i < len(files):
            first = self._starts[i]
            lo, hi = max(start, first), min(stop, first + self._rows[i])
            if lo < hi:
                if not self._verified[i] and self._checksums[i] is not None:
                    self._verify_shard(i)
                parts.append(self._read(files[i], lo - first, hi - first))
            if first + self._rows[i] >= stop:
                break
            i += 1
        if self.version < 3:
            if not parts:
                parts = [(torch.zeros(0, self.k, dtype=torch.int32), torch.zeros(0, self.k))]
            return SparseTeacher(
                torch.cat([p[0] for p in parts]),
                torch.cat([p[1].to(self.dtype) for p in parts]),
                self.tail,
                self.store_temperature,
            )
        if not parts:
            empty_ids = _decode_ids(
                torch.zeros(
                    (0, 3) if self.id_bytes == 3 else (0,), dtype=_ID_DTYPES[self.id_bytes]
                ),
                self.id_bytes,
            )
            parts = [
                (torch.zeros(0, dtype=torch.int64), empty_ids, torch.zeros(0, dtype=self.dtype))
            ]
        lengths = torch.cat([p[0] for p in parts])
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        return SparseTeacher(
            torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]),
            self.tail,
            self.store_temperature,
            offsets=offsets,
        )

    def _read(self, handle, lo: int, hi: int) -> tuple:
        """A shard's rows [lo, hi): (indices, logprobs) padded, or (lengths
        int64, ids, logprobs) ragged, whose entries start after the lengths of
        the rows before lo."""
        if self.version < 3:
            return (handle.get_slice("indices")[lo:hi], handle.get_slice("logprobs")[lo:hi])
        lengths = handle.get_slice("lengths")[:hi].to(torch.int64)
        e_lo = int(lengths[:lo].sum())
        e_hi = e_lo + int(lengths[lo:].sum())
        ids = _decode_ids(handle.get_slice("indices")[e_lo:e_hi], self.id_bytes)
        return lengths[lo:], ids, handle.get_slice("logprobs")[e_lo:e_hi]

    def __getstate__(self) -> dict:
        # safetensors handles do not pickle: the copy reopens the shards.
        return dict(self.__dict__, _files=None)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"SparseStore({str(self.path)!r}, rows={self.rows}, k={self.k}, "
            f"vocab_size={self.vocab_size}, store_temperature={self.store_temperature}, "
            f"tail={self.tail!r}, dtype={self.dtype})"
        )


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
