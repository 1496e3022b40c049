"""The sparse teacher's store under faults (docs/usage.md, "The store"): real
failures (a file-size limit, SIGKILL, altered bytes, a second writer), each
case bounded by a timeout.

A read-only directory does not fail a write made as root, so a write fails
here through RLIMIT_FSIZE, set in a child process with SIGXFSZ ignored: the
write that would pass the limit raises OSError(EFBIG), as a full disk's
ENOSPC would.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdfused import SparseTeacher, sparse_store
from kdfused.sparse_store import ShardWriter, SparseStore

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is None,
    reason="safetensors is not installed (the store's optional dependency: kdfused[store])",
)

HERE = Path(__file__).resolve().parent
V, K = 1000, 8
LIMIT_S = 120  # each test's bound
CHILD_S = 60  # a child process's


@pytest.fixture(autouse=True)
def bounded():
    """Fails a test that runs past LIMIT_S seconds (SIGALRM in the main thread)."""

    def expire(signum, frame):
        raise TimeoutError(f"the test ran past its {LIMIT_S} s bound")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def rows_of(a: int, b: int, *, k: int = K, tail: str = "ghost", store_temperature: float = 1.0):
    """Rows a..b of a made-up teacher, each a function of its row number alone
    (so any split into batches gives the same store); every 11th row keeps one
    id fewer (a -1 pad)."""
    r = torch.arange(a, b, dtype=torch.int64)[:, None]
    j = torch.arange(k, dtype=torch.int64)[None, :]
    idx = (r * 7 + j * 13) % V
    logprobs = -(3.0 + ((r * 31 + j * 17) % 1000).double() / 97.0).float()
    pad = (r % 11 == 0) & (j == k - 1)
    idx = torch.where(pad, -1, idx)
    logprobs = torch.where(pad, float("-inf"), logprobs)
    return SparseTeacher(idx, logprobs, tail, store_temperature)


def build(path, n: int, *, shard_rows: int = 64, batch: int = 25, **options) -> Path:
    """A store of rows_of(0, n), written in batches, closed."""
    with ShardWriter(path, vocab_size=V, k=K, shard_rows=shard_rows, **options) as writer:
        for a in range(0, n, batch):
            writer.write(rows_of(a, min(n, a + batch)))
    return Path(path)


def same_rows(got: SparseTeacher, want: SparseTeacher, dtype=torch.float16) -> bool:
    """The same rows, bit for bit: the ids each keeps, in order, and their
    log-probabilities in the stored dtype (a store reads rows back ragged)."""
    a, b = got.padded(want.k), want.padded(want.k)
    return torch.equal(a.indices, b.indices) and torch.equal(a.logprobs, b.logprobs.to(dtype))


def assert_rows(store: SparseStore, n: int, dtype=torch.float16) -> None:
    """The store holds exactly rows_of(0, n), in order, bit for bit."""
    assert len(store) == n
    assert same_rows(store[0:n], rows_of(0, n), dtype)


def shard(path: Path, i: int) -> Path:
    return path / f"shard-{i:05d}.safetensors"


def data_start(file: Path) -> int:
    """Where a safetensors file's tensor bytes begin (after its header)."""
    return 8 + int.from_bytes(file.read_bytes()[:8], "little")


def flip(file: Path, at: int) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0x01
    file.write_bytes(bytes(data))


def command(code: str, *args) -> list[str]:
    """A fresh interpreter running code after importing this module's functions."""
    prelude = f"import sys; sys.path.insert(0, {str(HERE)!r}); from test_store import *\n"
    return [sys.executable, "-c", prelude + code, *map(str, args)]


def child(code: str, *args, timeout: float = CHILD_S) -> subprocess.CompletedProcess:
    return subprocess.run(command(code, *args), capture_output=True, text=True, timeout=timeout)


def start_child(code: str, *args) -> subprocess.Popen:
    pipe = subprocess.PIPE
    return subprocess.Popen(command(code, *args), stdout=pipe, stderr=pipe, text=True)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- a failed shard write ------------------------------------------------------

FSIZE_CHILD = """
import errno, json, resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write raises EFBIG instead
path = Path(sys.argv[1])
writer = ShardWriter(path, vocab_size=V, k=K, shard_rows=64)
writer.write(rows_of(0, 100))  # shard 0 on disk, 36 rows pending
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))  # a shard is ~3.5 kB, the journal < 2 kB
report = dict(errors=[], notes=[])
for a in (100, 130):  # the producer catches the error and carries on
    try:
        writer.write(rows_of(a, a + 30))
    except OSError as err:
        report["errors"].append(err.errno)
        report["notes"] += getattr(err, "__notes__", [])
report["rows_after_failures"] = writer.rows
try:
    writer.close()
except OSError as err:
    report["close_error"] = err.errno
report["files_after_failed_close"] = sorted(p.name for p in path.iterdir())
try:
    SparseStore(path)
except ValueError as err:
    report["open_error"] = str(err)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space again
writer.close()  # the 96 pending rows: a whole shard and the last
report["files"] = sorted(p.name for p in path.iterdir())
print(json.dumps(report))
"""


def test_failed_shard_write_keeps_its_rows(tmp_path):
    """A shard write that fails (EFBIG under RLIMIT_FSIZE) raises, leaves no
    temporary file and keeps the rows pending: a producer that carries on gets
    every row at its place once writes succeed again; until then close()
    raises and the store does not open."""
    report = last_json(child(FSIZE_CHILD, tmp_path / "s"))
    assert report["errors"] == [errno.EFBIG, errno.EFBIG]
    assert any("its 64 rows stay pending" in note for note in report["notes"]), report["notes"]
    assert report["rows_after_failures"] == 64
    assert report["close_error"] == errno.EFBIG
    assert report["files_after_failed_close"] == [
        "journal.json",
        "shard-00000.safetensors",
        "writer.lock",
    ]
    assert "index.json is missing" in report["open_error"]
    assert "resume=True" in report["open_error"]
    assert report["files"] == ["index.json"] + [f"shard-0000{i}.safetensors" for i in range(3)]
    store = SparseStore(tmp_path / "s")
    index = json.loads((tmp_path / "s/index.json").read_text())
    assert [rows for _, rows in index["shards"]] == [64, 64, 32]
    assert_rows(store, 160)
    assert store.verify() is True


JOURNAL_CHILD = """
import errno, json, resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = Path(sys.argv[1])
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
# One-row shards are ~0.6 kB; the journal grows ~70 bytes a shard and passes
# the limit first.
resource.setrlimit(resource.RLIMIT_FSIZE, (1500, hard))
writer = ShardWriter(path, vocab_size=V, k=1, shard_rows=1)
report = dict(errors=[])
for a in range(40):
    try:
        writer.write(rows_of(a, a + 1, k=1))
    except OSError as err:
        if not report["errors"]:
            report["rows_at_first_error"] = writer.rows
            report["journal_rows"] = json.loads((path / "journal.json").read_text())["rows"]
            report["tmp_files"] = [p.name for p in path.iterdir() if p.name.endswith(".tmp")]
            # The shard made it; the journal naming it did not.
            report["shard_written"] = (path / f"shard-{a:05d}.safetensors").is_file()
        report["errors"].append((a, err.errno))
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
writer.close()
print(json.dumps(report))
"""


def test_failed_journal_write_keeps_its_rows(tmp_path):
    """The journal written after a shard fails (EFBIG): the shard's rows stay
    pending, the journal keeps its last state, and the store comes out whole."""
    report = last_json(child(JOURNAL_CHILD, tmp_path / "s"))
    assert report["errors"], "the file-size limit never failed a journal write"
    first = report["errors"][0][0]
    assert all(e == errno.EFBIG for _, e in report["errors"])
    assert [a for a, _ in report["errors"]] == list(range(first, 40))
    assert report["rows_at_first_error"] == report["journal_rows"] == first
    assert report["tmp_files"] == [] and report["shard_written"]
    store = SparseStore(tmp_path / "s")
    index = json.loads((tmp_path / "s/index.json").read_text())
    assert [rows for _, rows in index["shards"]] == [1] * 40  # close() wrote them one by one
    assert same_rows(store[0:40], rows_of(0, 40, k=1))


# ---- a killed writer and resume ------------------------------------------------

SLOW_CHILD = """
import time
writer = ShardWriter(sys.argv[1], vocab_size=V, k=K, shard_rows=64)
for a in range(0, 1000, 25):
    writer.write(rows_of(a, min(1000, a + 25)))
    print(writer.rows, flush=True)
    time.sleep(0.02)
writer.close()
"""


def compare_stores(got: Path, want: Path) -> None:
    """Two stores hold the same shards, bit for bit in their tensors, and the
    same index and metadata but for the store id and checksums."""
    from safetensors import safe_open

    a, b = (json.loads((p / "index.json").read_text()) for p in (got, want))
    for index in (a, b):
        del index["store_id"], index["checksums"]
    assert a == b
    for name, _ in b["shards"]:
        with safe_open(str(got / name), "pt") as x, safe_open(str(want / name), "pt") as y:
            mx, my = x.metadata(), y.metadata()
            assert mx.pop("store_id") != my.pop("store_id")
            assert mx == my
            for key in ("lengths", "indices", "logprobs"):
                assert torch.equal(x.get_tensor(key), y.get_tensor(key)), (name, key)


def test_killed_writer_resumes(tmp_path):
    """A writer killed (SIGKILL) after a few shards; resume=True keeps the
    complete ones, says how many rows it holds, and the producer's rest makes
    a store equal to one written in one go."""
    path = tmp_path / "s"
    with start_child(SLOW_CHILD, path) as proc:
        try:
            deadline = time.monotonic() + CHILD_S
            while int(proc.stdout.readline() or -1) < 3 * 64:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.03)  # somewhere in the next batches
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=CHILD_S)
    assert proc.returncode == -signal.SIGKILL
    assert not (path / "index.json").exists()
    with pytest.raises(ValueError, match="index.json is missing.*resume=True"):
        SparseStore(path)
    with pytest.raises(FileExistsError, match="unfinished .*pass resume=True"):
        ShardWriter(path, vocab_size=V, k=K, shard_rows=64)
    writer = ShardWriter(path, vocab_size=V, k=K, shard_rows=64, resume=True)
    assert writer.rows >= 3 * 64 and writer.rows % 64 == 0 and writer.rows < 1000
    for a in range(writer.rows, 1000, 40):
        writer.write(rows_of(a, min(1000, a + 40)))
    writer.close()
    assert_rows(SparseStore(path), 1000)
    compare_stores(path, build(tmp_path / "whole", 1000))


KILL_AT_CHILD = """
import os, signal
root, points = Path(sys.argv[1]), int(sys.argv[2])

def write(path, n):
    # The writer's run, killed (SIGKILL) just before its n-th fsync, rename or
    # unlink; n = -1 runs it whole and returns how many it made.
    count = [0]
    def hook(fn):
        def kill_first(*args, **kwargs):
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1
            return fn(*args, **kwargs)
        return kill_first
    os.fsync, os.replace, os.unlink = hook(os.fsync), hook(os.replace), hook(os.unlink)
    writer = ShardWriter(path, vocab_size=V, k=K, shard_rows=8)
    for a in range(0, 20, 6):
        writer.write(rows_of(a, min(20, a + 6)))
    writer.close()
    return count[0]

status = {}
for n in range(-1, points):
    pid = os.fork()  # one import of torch for all the runs
    if pid == 0:
        steps = write(root / f"kill-{n}", n)
        with open(root / "steps", "w") as f:
            f.write(str(steps))
        os._exit(0)
    _, code = os.waitpid(pid, 0)
    status[n] = os.waitstatus_to_exitcode(code)
print(json.dumps(status))
"""


def test_killed_at_every_step_resumes(tmp_path):
    """A writer killed (SIGKILL) just before each fsync, rename and unlink it
    makes, in turn: every time the directory is either a finished store of
    all the rows or one that resume=True continues to the same store as an
    uninterrupted writer's (never a store with rows missing or shifted)."""
    # 2 stale temporary files unlinked, the first journal, 2 shards with their
    # journals (3 steps a file), the last shard and the index, 2 unlinks.
    steps = 2 + 3 + 2 * 6 + 6 + 2
    status = last_json(child(KILL_AT_CHILD, tmp_path, steps, timeout=LIMIT_S - 20))
    assert int((tmp_path / "steps").read_text()) == steps
    assert status == {"-1": 0, **{str(n): -signal.SIGKILL for n in range(steps)}}
    whole = build(tmp_path / "whole", 20, shard_rows=8, batch=6)
    finished = 0
    for n in range(steps):
        path = tmp_path / f"kill-{n}"
        if (path / "index.json").exists():  # killed after the index was renamed
            finished += 1
            with pytest.raises(FileExistsError, match="never a finished one"):
                ShardWriter(path, vocab_size=V, k=K, shard_rows=8, resume=True)
        else:
            with pytest.raises(ValueError, match="index.json is missing"):
                SparseStore(path)
            writer = ShardWriter(path, vocab_size=V, k=K, shard_rows=8, resume=True)
            assert writer.rows % 8 == 0, n
            for a in range(writer.rows, 20, 5):
                writer.write(rows_of(a, min(20, a + 5)))
            writer.close()
        names = {p.name for p in path.iterdir()}
        store_files = {"index.json"} | {f"shard-0000{i}.safetensors" for i in range(3)}
        # A kill after the index was written may leave the journal and lock file.
        assert store_files <= names <= store_files | {"journal.json", "writer.lock"}, n
        assert_rows(SparseStore(path), 20)
        compare_stores(path, whole)
    assert finished == 3  # before the directory's fsync and the two unlinks


def test_resume_checks_its_parameters(tmp_path):
    path = tmp_path / "s"
    given = dict(vocab_size=V, k=K, shard_rows=64)
    with pytest.raises(RuntimeError, match="producer died"):
        with ShardWriter(path, **given) as writer:
            writer.write(rows_of(0, 150))
            raise RuntimeError("producer died")
    changed = [
        ("vocab_size", V + 1, "vocab_size = 1000, got vocab_size = 1001"),
        ("k", K + 1, "k = 8, got k = 9"),
        ("store_temperature", 2.0, "store_temperature = 1.0, got store_temperature = 2.0"),
        ("tail", "renormalize", "tail = 'ghost', got tail = 'renormalize'"),
        ("dtype", torch.bfloat16, "dtype = 'float16', got dtype = 'bfloat16'"),
        ("shard_rows", 32, "shard_rows = 64, got shard_rows = 32"),
    ]
    for name, value, message in changed:
        with pytest.raises(ValueError, match=f"started with {message}"):
            ShardWriter(path, **dict(given, **{name: value}), resume=True)
    writer = ShardWriter(path, **given, resume=True)  # the failures left it free
    assert writer.rows == 128
    writer.write(rows_of(128, 300))
    writer.close()
    assert_rows(SparseStore(path), 300)


def test_resume_on_finished_empty_and_missing(tmp_path):
    path = build(tmp_path / "done", 100)
    with pytest.raises(FileExistsError, match="never a finished one"):
        ShardWriter(path, vocab_size=V, k=K, shard_rows=64, resume=True)
    with pytest.raises(FileExistsError, match="already holds"):
        ShardWriter(path, vocab_size=V, k=K, shard_rows=64)
    for fresh in (tmp_path / "missing" / "store", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        writer = ShardWriter(fresh, vocab_size=V, k=K, shard_rows=64, resume=True)
        assert writer.rows == 0
        writer.write(rows_of(0, 70))
        writer.close()
        assert_rows(SparseStore(fresh), 70)


def test_resume_refuses_a_damaged_complete_shard(tmp_path):
    path = tmp_path / "s"
    writer = ShardWriter(path, vocab_size=V, k=K, shard_rows=64)
    writer.write(rows_of(0, 200))
    writer._release()  # as a killed writer leaves it
    flip(shard(path, 1), data_start(shard(path, 1)) + 5)
    with pytest.raises(ValueError, match="shard-00001.safetensors: its bytes do not match"):
        ShardWriter(path, vocab_size=V, k=K, shard_rows=64, resume=True)
    shard(path, 1).unlink()
    with pytest.raises(ValueError, match="shard-00001.safetensors is missing"):
        ShardWriter(path, vocab_size=V, k=K, shard_rows=64, resume=True)


def test_resume_drops_what_follows_the_journal(tmp_path):
    """Shard files the journal does not name and temporary files (a killed
    writer's) are removed by resume; other files are left alone."""
    path = tmp_path / "s"
    writer = ShardWriter(path, vocab_size=V, k=K, shard_rows=64)
    writer.write(rows_of(0, 100))
    writer._release()  # as a killed writer leaves it
    for name in ("shard-00007.safetensors", "shard-00001.safetensors.tmp", "notes.txt"):
        (path / name).write_bytes(b"x" * 10)
    writer = ShardWriter(path, vocab_size=V, k=K, shard_rows=64, resume=True)
    assert writer.rows == 64
    names = sorted(p.name for p in path.iterdir())
    assert names == ["journal.json", "notes.txt", "shard-00000.safetensors", "writer.lock"]
    writer.write(rows_of(64, 70))
    writer.close()
    assert_rows(SparseStore(path), 70)


def test_shard_files_without_journal_are_not_overwritten(tmp_path):
    path = build(tmp_path / "s", 100)
    (path / "index.json").unlink()  # e.g. a version-1 writer's unfinished store
    for resume in (False, True):
        with pytest.raises(FileExistsError, match="shard files .* but no journal.json"):
            ShardWriter(path, vocab_size=V, k=K, shard_rows=64, resume=resume)
    assert shard(path, 0).is_file() and shard(path, 1).is_file()


# ---- one writer per directory --------------------------------------------------

HOLDER_CHILD = """
import time
writer = ShardWriter(sys.argv[1], vocab_size=V, k=K, shard_rows=64)
writer.write(rows_of(0, 100))
print("ready", flush=True)
time.sleep(60)
"""


def test_one_writer_per_directory(tmp_path):
    path = tmp_path / "s"
    first = ShardWriter(path, vocab_size=V, k=K, shard_rows=64)
    for resume in (False, True):
        with pytest.raises(BlockingIOError, match=f"another ShardWriter \\(pid {os.getpid()}"):
            ShardWriter(path, vocab_size=V, k=K, shard_rows=64, resume=resume)
    first.write(rows_of(0, 10))
    first.close()
    assert not (path / "writer.lock").exists()
    assert_rows(SparseStore(path), 10)

    other = tmp_path / "other"
    with start_child(HOLDER_CHILD, other) as proc:
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            with pytest.raises(BlockingIOError, match=f"another ShardWriter \\(pid {proc.pid}"):
                ShardWriter(other, vocab_size=V, k=K, shard_rows=64, resume=True)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=CHILD_S)
    assert proc.returncode == -signal.SIGKILL
    # The kernel dropped the dead writer's lock: resume goes ahead.
    writer = ShardWriter(other, vocab_size=V, k=K, shard_rows=64, resume=True)
    assert writer.rows == 64
    writer.write(rows_of(64, 90))
    writer.close()
    assert_rows(SparseStore(other), 90)


# ---- altered, truncated and foreign shards -------------------------------------


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_in_shard_data(tmp_path, where):
    """One flipped bit in a shard's tensor bytes: the store opens (the header
    is intact), rows of other shards read, the first read of that shard is a
    ValueError naming it, and verify() names it."""
    path = build(tmp_path / "s", 200)
    file = shard(path, 1)
    start, end = data_start(file), file.stat().st_size
    flip(file, {"first": start, "middle": (start + end) // 2, "last": end - 1}[where])
    store = SparseStore(path)
    assert same_rows(store[0:64], rows_of(0, 64))
    assert same_rows(store[128:200], rows_of(128, 200))
    with pytest.raises(ValueError, match="shard-00001.safetensors: its bytes do not match"):
        store[60:70]
    with pytest.raises(ValueError, match="shard-00001.safetensors: its bytes do not match"):
        SparseStore(path).verify()


def test_flipped_byte_in_shard_header(tmp_path):
    """A flipped bit in the header's metadata is caught on open, naming the file."""
    path = build(tmp_path / "s", 200)
    file = shard(path, 2)
    at = file.read_bytes().index(b'"first_row":"128"') + len('"first_row":"1')
    flip(file, at)  # first_row "128" becomes "138"
    with pytest.raises(ValueError, match="shard-00002.safetensors: its metadata first_row"):
        SparseStore(path)


def test_verify_names_the_first_bad_shard(tmp_path):
    path = build(tmp_path / "s", 300)
    assert SparseStore(path).verify() is True
    for i in (3, 1):
        flip(shard(path, i), shard(path, i).stat().st_size - 3)
    with pytest.raises(ValueError, match="shard-00001.safetensors"):
        SparseStore(path).verify()


@pytest.mark.parametrize("cut", [1, 1000])
def test_truncated_shard(tmp_path, cut):
    path = build(tmp_path / "s", 200)
    file = shard(path, 1)
    file.write_bytes(file.read_bytes()[:-cut])
    with pytest.raises(ValueError, match="shard-00001.safetensors is .* bytes.*truncated"):
        SparseStore(path)


def test_shard_copied_from_another_store(tmp_path):
    """Two stores of the same parameters and rows: a shard of one copied
    into the other is refused on open (its store id); one whose metadata was
    rewritten to this store's id is refused on its first read (its checksum)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    a, b = build(tmp_path / "a", 200), build(tmp_path / "b", 200)
    shutil.copy(shard(b, 1), shard(a, 1))
    with pytest.raises(ValueError, match="shard-00001.safetensors belongs to another store"):
        SparseStore(a)

    c = tmp_path / "c"
    with ShardWriter(c, vocab_size=V, k=K, shard_rows=64) as writer:  # other rows
        writer.write(rows_of(1000, 1200))
    a = build(tmp_path / "a2", 200)
    with safe_open(str(shard(a, 1)), "pt") as own, safe_open(str(shard(c, 1)), "pt") as foreign:
        meta, tensors = own.metadata(), {key: foreign.get_tensor(key) for key in own.keys()}
    save_file(tensors, str(shard(a, 1)), metadata=meta)
    store = SparseStore(a)  # metadata and size agree
    with pytest.raises(ValueError, match="shard-00001.safetensors: its bytes do not match"):
        store[64:65]


# ---- the index -----------------------------------------------------------------


def edit_index(path: Path, edit) -> None:
    index = json.loads((path / "index.json").read_text())
    edit(index)
    (path / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("tail", "renormalize", "metadata tail = 'ghost' does not match the store's 'renormalize'"),
        ("logprob_dtype", "bfloat16", "metadata logprob_dtype = 'float16'"),
        ("store_temperature", 2.0, "metadata store_temperature = '1.0'"),
        ("vocab_size", 1024, "metadata vocab_size = '1000'"),
    ],
)
def test_index_disagreeing_with_its_shards(tmp_path, key, value, message):
    path = build(tmp_path / "s", 100)
    edit_index(path, lambda index: index.update({key: value}))
    with pytest.raises(ValueError, match=f"shard-00000.safetensors: its {message}"):
        SparseStore(path)


@pytest.mark.parametrize("kind", ["parent", "absolute", "subdirectory", "dot-dot"])
def test_shard_names_stay_inside_the_store(tmp_path, kind):
    """A shard named outside the store's directory is refused, though a valid
    copy of the shard lies where the name points."""
    path = build(tmp_path / "s", 100)
    outside = {
        "parent": tmp_path / "other" / "shard-00000.safetensors",
        "absolute": tmp_path / "abs" / "shard-00000.safetensors",
        "subdirectory": path / "sub" / "shard-00000.safetensors",
        "dot-dot": path / "shard-00000.safetensors",
    }[kind]
    outside.parent.mkdir(exist_ok=True)
    if kind != "dot-dot":
        shutil.copy(shard(path, 0), outside)
    name = {
        "parent": "../other/shard-00000.safetensors",
        "absolute": str(outside),
        "subdirectory": "sub/shard-00000.safetensors",
        "dot-dot": "..",
    }[kind]

    def rename(index):
        index["shards"][0][0] = name
        index["checksums"][name] = index["checksums"].pop("shard-00000.safetensors")

    edit_index(path, rename)
    with pytest.raises(ValueError, match=re.escape(f"shard name {name!r} is not a plain file")):
        SparseStore(path)


@pytest.mark.parametrize("text,kind", [("[1, 2]", "list"), ("7", "int"), ('"x"', "str")])
def test_index_not_an_object(tmp_path, text, kind):
    path = build(tmp_path / "s", 10)
    (path / "index.json").write_text(text)
    with pytest.raises(
        ValueError, match=f"index.json is not a kdfused.sparse index: a JSON {kind} "
    ):
        SparseStore(path)


def test_index_malformed_entries(tmp_path):
    path = build(tmp_path / "s", 100)
    edit_index(path, lambda index: index["shards"].append(index["shards"][0]))
    with pytest.raises(ValueError, match="its checksums do not cover|add up|twice"):
        SparseStore(path)
    path = build(tmp_path / "t", 100)
    edit_index(path, lambda index: index.update(checksums=[]))
    with pytest.raises(ValueError, match="index.json is not a kdfused.sparse index"):
        SparseStore(path)
    edit_index(path, lambda index: index.update(version=4, checksums={}))
    with pytest.raises(ValueError, match="version 4 .*reads versions 1, 2, 3"):
        SparseStore(path)


# ---- version 1 -----------------------------------------------------------------


def write_v1(path: Path, n: int, shard_rows: int) -> None:
    """A store as version 1 of the format wrote it: no store id, no checksums."""
    from safetensors.torch import save_file

    path.mkdir()
    meta = dict(
        format="kdfused.sparse",
        version=1,
        k=K,
        vocab_size=V,
        store_temperature=1.0,
        tail="ghost",
        logprob_dtype="float16",
    )
    shards = []
    for i, a in enumerate(range(0, n, shard_rows)):
        t = rows_of(a, min(n, a + shard_rows))
        name = f"shard-{i:05d}.safetensors"
        tensors = {"indices": t.indices.int(), "logprobs": t.logprobs.half()}
        shard_meta = {key: str(value) for key, value in meta.items()}
        shard_meta.update(rows=str(len(t)), first_row=str(a))
        save_file(tensors, str(path / name), metadata=shard_meta)
        shards.append([name, len(t)])
    (path / "index.json").write_text(json.dumps(dict(meta, rows=n, shards=shards)))


def test_version_1_store_reads_but_cannot_be_verified(tmp_path):
    write_v1(tmp_path / "v1", 150, 64)
    store = SparseStore(tmp_path / "v1", vocab_size=V, k=K)
    assert store.version == 1 and store.store_id is None
    assert_rows(store, 150)
    with pytest.warns(UserWarning, match="version-1 store: .*cannot be verified"):
        assert store.verify() is False


# ---- reading from DataLoader workers -------------------------------------------


def test_store_pickles(tmp_path):
    path = build(tmp_path / "s", 200)
    store = SparseStore(path)
    store[0:10]  # shard 0 verified and open
    copy = pickle.loads(pickle.dumps(store))
    assert copy._files is None and copy._verified == [True, False, False, False]
    assert_rows(copy, 200)
    again = pickle.loads(pickle.dumps(copy))  # a copy that had reopened
    assert_rows(again, 200)
    # The copy checks what it reopens: a shard altered since is refused.
    flip(shard(path, 3), data_start(shard(path, 3)))
    late = pickle.loads(pickle.dumps(store))
    with pytest.raises(ValueError, match="shard-00003.safetensors: its bytes do not match"):
        late[190:200]


@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_dataloader_workers(tmp_path, context):
    """A DataLoader with two workers reads the store's batches (spawned
    workers get it pickled) in order, bit for bit."""
    path = build(tmp_path / "s", 500, shard_rows=128)
    store = SparseStore(path)
    batches = [slice(a, min(500, a + 48)) for a in range(0, 500, 48)]
    loader = torch.utils.data.DataLoader(
        store,
        sampler=batches,
        batch_size=None,
        num_workers=2,
        multiprocessing_context=context,
        timeout=CHILD_S,
    )
    got = list(loader)
    assert len(got) == len(batches)
    for part, rows in zip(got, batches, strict=True):
        want = rows_of(rows.start, rows.stop)
        assert isinstance(part, SparseTeacher) and part.tail == "ghost"
        assert same_rows(part, want)


# ---- what write() takes --------------------------------------------------------


def test_tail_must_match_the_store(tmp_path):
    """A 'renormalize' teacher into a 'ghost' store (and the converse) raises
    and takes none of its rows."""
    path = tmp_path / "s"
    with ShardWriter(path, vocab_size=V, k=K, shard_rows=4) as writer:
        with pytest.raises(ValueError, match="store's tail is 'ghost', got .*'renormalize'"):
            writer.write(rows_of(0, 10, tail="renormalize"))
        writer.write(rows_of(0, 10))
    assert_rows(SparseStore(path), 10)
    other = tmp_path / "r"
    with ShardWriter(other, vocab_size=V, k=K, tail="renormalize") as writer:
        with pytest.raises(ValueError, match="store's tail is 'renormalize', got .*'ghost'"):
            writer.write(rows_of(0, 10))
    store = SparseStore(other)
    assert len(store) == 0 and store.tail == "renormalize"


def test_pending_rows_are_copies(tmp_path):
    """The caller may reuse its tensors once write() returns."""
    path = tmp_path / "s"
    buffer = rows_of(0, 10)
    buffer = SparseTeacher(buffer.indices.int(), buffer.logprobs.half())
    with ShardWriter(path, vocab_size=V, k=K, shard_rows=64) as writer:
        writer.write(buffer)
        buffer.indices.fill_(3)
        buffer.logprobs.fill_(-1.0)
    assert_rows(SparseStore(path), 10)


def test_module_constants():
    assert sparse_store.VERSION == 3 and sparse_store.CHECKSUM in sparse_store.CHECKSUMS
