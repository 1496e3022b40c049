"""The sparse teacher (docs/design.md, "The sparse teacher"): what training from stored top-k
costs next to the dense teacher, what extracting the top k costs next to
PyTorch, and what the store takes on disk.

    python -m benchmarks.sparse --sizes 4096x32000 --k 64 --reps 9

Three measurements per size, each with its cases taking turns run by run in
one process (ratios from turns are steadier on a noisy machine):

- step: kdfused's full training step (forward + backward) with the dense
  teacher logits and with a sparse teacher of the same rows' top k (ghost
  tail), in turns; then the pure-PyTorch reference of the sparse loss (eager)
  on its own. Median time, ratio to the dense step, and the peak memory
  growth of one step in N x V buffers of the student's dtype (the gradient
  alone is 1).
- ragged (--ragged): the sparse step from ragged rows (row lengths uniform
  in [1, k], mean m; int64 ids and float32 log-probs, and the uint16 /
  float16 entries a store gives; and padded first, as before the kernel
  read them in place) against fixed rows of k = round(m) and of k, in
  turns: what rows of uneven length cost.
- top-k: kdfused.sparse.topk against torch.topk(torch.log_softmax(t / T), k).
- store: bytes per token on disk (a store of the N rows written with
  float16 log-probs), against k * 6 and the V * 2 of bf16 logits.
- checksum (--checksum): what the store's per-shard checksums cost. A store
  of one full shard (65536 rows by default, top k of random logits) is
  written; then, in turns, a training step (reading N rows, FusedDistillLoss
  forward and backward) from a store opened afresh (the step that first reads
  the shard, so it checks the shard's checksum) and from a store whose shard
  is already checked, the reads timed on their own; and
  SparseStore.verify() over the whole store in MB/s (the shard's pages in
  the page cache).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import kdfused
from kdfused import reference, sparse

from .run import (
    DTYPES,
    PeakMemory,
    Timer,
    bench_cases,
    commit,
    device_name,
    make_inputs,
    parse_sizes,
)


def sparse_teacher(teacher_logits, k, temperature):
    """The teacher's top k at the loss temperature (what a store would hold)."""
    return sparse.topk(teacher_logits, k, temperature=temperature)


def step_cases(n, v, k, dtype, device, warmup, reps, with_eager=True):
    """[(case, median seconds, peak growth in N x V student-dtype buffers)]:
    the dense and the sparse kdfused steps in turns, then (with_eager) the
    eager reference alone. (Run in the same turns, the reference's 7 N x V
    buffers, freed each run, cost the kdfused steps after it fresh page faults
    on their gradient: +80-90 ms each at 4096 x 32000 here.)"""
    inputs = make_inputs(n, v, dtype, device)
    student, teacher_logits, labels = inputs
    teacher = sparse_teacher(teacher_logits, k, 2.0)
    loss_fn = kdfused.FusedDistillLoss(temperature=2.0)
    cases = [
        ("dense teacher, kdfused", loss_fn),
        (f"sparse teacher k={k}, kdfused", lambda s, t, y: loss_fn(s, teacher, y)),
    ]
    results = bench_cases([(fn, "full") for _, fn in cases], inputs, device, warmup, reps, True)
    if with_eager:

        def eager(s, t, y):
            return reference.sparse_distill_loss(
                s, teacher.indices, teacher.logprobs, y, store_temperature=2.0, temperature=2.0
            )

        cases.append((f"sparse teacher k={k}, eager (reference), alone", eager))
        results += bench_cases([(eager, "full")], inputs, device, 1, max(1, reps // 3))
    nv = n * v * student.element_size()
    return [
        (name, seconds, peak / nv)
        for (name, _), (seconds, peak) in zip(cases, results, strict=True)
    ]


def ragged_cases(n, v, k, dtype, device, warmup, reps, seed=0):
    """[(case, median seconds, peak growth in N x V buffers)]: the sparse step
    from ragged rows of lengths uniform in [1, k] and from fixed rows of
    k = round(mean length) and of k, in turns."""
    inputs = make_inputs(n, v, dtype, device)
    student, teacher_logits, labels = inputs
    top = sparse_teacher(teacher_logits, k, 2.0)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, k + 1, (n,), generator=g).to(device)
    keep = torch.arange(k, device=device)[None, :] < lengths[:, None]
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    ragged = sparse.SparseTeacher(
        top.indices[keep], top.logprobs[keep], "ghost", 2.0, offsets=offsets
    )
    stored = sparse.SparseTeacher(
        ragged.indices.to(torch.int32 if v > 65536 else torch.uint16),
        ragged.logprobs.half(),
        "ghost",
        2.0,
        offsets=offsets,
    )
    m = round(float(lengths.double().mean()))
    fixed_m = sparse_teacher(teacher_logits, m, 2.0)
    loss_fn = kdfused.FusedDistillLoss(temperature=2.0)
    cases = [
        (f"ragged rows (mean {m}), int64 / float32", ragged),
        (f"ragged rows (mean {m}), {stored.indices.dtype} / float16", stored),
        (f"fixed k={m}", fixed_m),
        (f"fixed k={k}", top),
    ]
    fns = [(lambda s, t, y, teacher=teacher: loss_fn(s, teacher, y)) for _, teacher in cases]
    # The path before the kernel read ragged rows: an int64 [N, longest] copy each step.
    cases.insert(2, (f"ragged rows (mean {m}), padded first", None))
    fns.insert(2, lambda s, t, y: loss_fn(s, ragged.padded(), y))
    results = bench_cases([(fn, "full") for fn in fns], inputs, device, warmup, reps, True)
    nv = n * v * student.element_size()
    return [
        (name, seconds, peak / nv)
        for (name, _), (seconds, peak) in zip(cases, results, strict=True)
    ]


def topk_cases(n, v, k, dtype, device, warmup, reps):
    """[(case, median seconds, peak growth in N x V buffers of the logits' dtype)]."""
    logits = make_inputs(n, v, dtype, device)[1]
    cases = [
        ("kdfused sparse.topk", lambda: sparse.topk(logits, k, temperature=2.0)),
        (
            "torch.topk(log_softmax(t / T), k)",
            lambda: torch.topk(torch.log_softmax(logits.float() / 2.0, -1), k),
        ),
    ]
    ours = sparse.topk(logits, k, temperature=2.0)
    values = torch.topk(torch.log_softmax(logits.double() / 2.0, -1), k).values
    torch.testing.assert_close(ours.logprobs.double(), values, rtol=0, atol=1e-4)
    timer = Timer(device)
    times = [[] for _ in cases]
    for i in range(warmup + reps):
        for c, (_, fn) in enumerate(cases):
            elapsed = timer(fn)
            if i >= warmup:
                times[c].append(elapsed)
    nv = n * v * logits.element_size()
    return [
        (name, statistics.median(t), PeakMemory(device)(fn) / nv)
        for (name, fn), t in zip(cases, times, strict=True)
    ]


def store_bytes(n, v, k, device) -> float:
    """Bytes per row on disk of a float16 store of n rows' top k."""
    logits = make_inputs(n, v, torch.float32, device)[1]
    teacher = sparse_teacher(logits, k, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        sparse.save(Path(tmp) / "store", teacher, vocab_size=v)
        total = sum(f.stat().st_size for f in (Path(tmp) / "store").iterdir())
    return total / n


def checksum_cases(n, v, k, device, reps, shard_rows=1 << 16):
    """(fresh read s, checked read s, step s, steps per shard, verify MB/s, store bytes):
    medians of reps, in turns. A read is store[0:n]; the step is that read and
    the loss's forward and backward. The step varies by more than the
    checksum costs, so the reads are timed on their own too."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        g = torch.Generator().manual_seed(0)
        with sparse.ShardWriter(
            path, vocab_size=v, k=k, store_temperature=2.0, shard_rows=shard_rows
        ) as writer:
            for start in range(0, shard_rows, n):
                rows = min(n, shard_rows - start)
                logits = torch.randn(rows, v, generator=g) * 4
                writer.write(sparse_teacher(logits.to(device), k, 2.0))
        size = sum(f.stat().st_size for f in path.iterdir())
        student = torch.randn(n, v, generator=g, device="cpu").to(device).requires_grad_()
        labels = torch.randint(0, v, (n,), generator=g).to(device)
        loss_fn = kdfused.FusedDistillLoss(temperature=2.0)
        checked = sparse.SparseStore(path, vocab_size=v)
        checked[0:1]  # its shard's checksum is checked here, once

        def step(store):
            """(seconds to read the rows, seconds of the whole step)."""
            begin = time.perf_counter()
            teacher = store[0:n].to(device)
            read = time.perf_counter() - begin
            loss_fn(student, teacher, labels).backward()
            student.grad = None
            if device == "cuda":
                torch.cuda.synchronize()
            return read, time.perf_counter() - begin

        fresh_reads, checked_reads, steps, verify = [], [], [], []
        for i in range(reps + 1):
            fresh = step(sparse.SparseStore(path, vocab_size=v))
            again = step(checked)
            store = sparse.SparseStore(path, vocab_size=v)
            begin = time.perf_counter()
            assert store.verify()
            seconds = time.perf_counter() - begin
            if i:  # the first turn warms up
                fresh_reads.append(fresh[0])
                checked_reads.append(again[0])
                steps += [fresh[1], again[1]]
                verify.append(seconds)
        return (
            statistics.median(fresh_reads),
            statistics.median(checked_reads),
            statistics.median(steps),
            shard_rows / n,
            size / statistics.median(verify) / 1e6,
            size,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--sizes", default="4096x32000", help="NxV[,NxV...]")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--no-eager", action="store_true", help="skip the eager reference")
    parser.add_argument(
        "--ragged", action="store_true", help="only ragged rows against fixed k (the step)"
    )
    parser.add_argument(
        "--checksum",
        action="store_true",
        help="only the cost of the store's checksums (a step's first read, verify())",
    )
    parser.add_argument(
        "--shard-rows", type=int, default=1 << 16, help="--checksum: the store's rows a shard"
    )
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    print(
        f"# {device_name(args.device)}, torch {torch.__version__}, commit {commit()}, "
        f"{args.dtype}, k = {args.k}, median of {args.reps} (turns)",
        flush=True,
    )
    rows = []
    for n, v in parse_sizes(args.sizes):
        if args.checksum:
            fresh, checked, step, per_shard, rate, size = checksum_cases(
                n, v, args.k, args.device, args.reps, args.shard_rows
            )
            extra = fresh - checked
            rows.append(("checksum", n, v, "first read", fresh, extra / step, None))
            rows.append(("checksum", n, v, "verify MB/s", rate, None, None))
            print(
                f"{n}x{v} checksum: reading {n} rows {fresh * 1e3:.1f} ms from a shard read "
                f"first (its checksum checked), {checked * 1e3:.1f} ms from a checked one; "
                f"the step {step * 1e3:.1f} ms: {extra / step:+.1%} on the step that first "
                f"reads a shard, one in {per_shard:.0f} steps: {extra / per_shard / step:+.2%} "
                f"a step amortised; verify() {rate:.0f} MB/s over {size / 1e6:.1f} MB",
                flush=True,
            )
            continue
        if args.ragged:
            cases = ragged_cases(n, v, args.k, dtype, args.device, args.warmup, args.reps)
            base = cases[-1][1]
            for name, seconds, peak in cases:
                rows.append(("ragged", n, v, name, seconds, seconds / base, peak))
                print(
                    f"{n}x{v} step  {name}: {seconds * 1e3:.1f} ms, {seconds / base:.3f}x "
                    f"fixed k={args.k}, peak growth {peak:.2f} N x V",
                    flush=True,
                )
            continue
        steps = step_cases(
            n, v, args.k, dtype, args.device, args.warmup, args.reps, not args.no_eager
        )
        base = steps[0][1]
        for name, seconds, peak in steps:
            rows.append(("step", n, v, name, seconds, seconds / base, peak))
            print(
                f"{n}x{v} step  {name}: {seconds * 1e3:.1f} ms, {seconds / base:.3f}x dense, "
                f"peak growth {peak:.2f} N x V",
                flush=True,
            )
        picks = topk_cases(n, v, args.k, dtype, args.device, args.warmup, args.reps)
        base = picks[1][1]
        for name, seconds, peak in picks:
            rows.append(("topk", n, v, name, seconds, seconds / base, peak))
            print(
                f"{n}x{v} top-k {name}: {seconds * 1e3:.1f} ms, {base / seconds:.2f}x as fast "
                f"as torch, peak growth {peak:.2f} N x V",
                flush=True,
            )
        try:
            per_row = store_bytes(min(n, 4096), v, args.k, args.device)
        except ImportError as err:  # safetensors is the store's optional dependency
            print(f"{n}x{v} store: not measured ({err})", flush=True)
            continue
        rows.append(("store", n, v, "bytes per token", per_row, per_row / (2 * v), None))
        print(
            f"{n}x{v} store: {per_row:.1f} bytes per token on disk (k * 6 = {args.k * 6}; "
            f"bf16 logits V * 2 = {2 * v}: {2 * v / per_row:.0f}x more)",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
