"""Benchmark CLI: provider x divergence x mode x size, side by side in one process.

    python -m benchmarks.run --device cuda --dtype bfloat16 --sizes 8192x128256 \\
        --providers kdfused,eager,compile,liger --csv out.csv --md out.md

Times are medians over --reps runs after --warmup runs (CUDA events on GPU,
perf_counter on CPU); with --interleave a provider's divergences and modes take
turns run by run, for ratios between them on a noisy machine. Modes: "forward"
(the loss call, graph built), "backward" (loss.backward() alone) and "full"
(both). Peak memory is what one full step
allocates beyond its inputs: torch.cuda.max_memory_allocated on GPU, peak RSS
growth (VmHWM after resetting it) on CPU; also given in N x V student-dtype
buffers. kdfused rows also give the achieved bandwidth against the byte floor
(read student + read teacher + write gradient = 3 N V element size) as a share
of the copy bandwidth measured in the same run. Every row names the device,
torch version, dtype, sizes and commit.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from kdfused._measure import PeakMemory

from .providers import PROVIDERS, LossOptions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("forward", "backward", "full")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def commit() -> str:
    if os.environ.get("KDFUSED_COMMIT"):
        return os.environ["KDFUSED_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


class Timer:
    """Wall time of fn() in seconds, synchronised with the device."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def copy_bandwidth(n: int, v: int, dtype, device: str, reps: int) -> float:
    """Bytes per second of dst.copy_(src) for one N x V tensor (read + write)."""
    src = torch.empty(n, v, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    timer = Timer(device)
    for _ in range(2):
        dst.copy_(src)
    t = statistics.median(timer(lambda: dst.copy_(src)) for _ in range(reps))
    return 2 * src.numel() * src.element_size() / t


def make_inputs(n, v, dtype, device, seed=0, teacher_pad=0):
    """(student, teacher, labels); teacher_pad > 0 gives the teacher that many
    more columns (a padded vocabulary), for teacher_vocab="truncate"."""
    g = torch.Generator(device=device).manual_seed(seed)
    student = torch.randn(n, v, generator=g, device=device, dtype=dtype).mul_(3)
    teacher = torch.randn(n, v + teacher_pad, generator=g, device=device, dtype=dtype).mul_(3)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[::7] = -100  # some ignored rows, as with padding
    return student, teacher, labels


def make_step(loss_fn, inputs, mode):
    """(prepare, timed) for one `mode` of a training step: prepare() is the
    untimed part (clears the gradient; for "backward" it also runs the
    forward), then timed() is what is measured."""
    student, teacher, labels = inputs
    s = student.detach().clone().requires_grad_()
    pending = []  # the loss whose graph "backward" runs

    def prepare():
        s.grad = None
        pending.clear()
        if mode == "backward":
            pending.append(loss_fn(s, teacher, labels))

    def forward():
        return loss_fn(s, teacher, labels)

    def full():
        forward().backward()

    def backward():
        pending.pop().backward()

    return prepare, {"forward": forward, "backward": backward, "full": full}[mode]


def bench_cases(cases, inputs, device, warmup, reps, interleave=False, step=None):
    """[(median seconds, peak bytes of one full step)] for each (loss_fn, mode)
    case. interleave: the cases take turns run by run instead of one after the
    other, so that a slow spell of the machine falls on all of them alike (for
    ratios between them on a noisy machine). step: what makes a case's
    (prepare, timed) pair (default make_step; the fused-linear benchmark has
    its own)."""
    make_step_ = step or make_step
    steps = [make_step_(loss_fn, inputs, mode) for loss_fn, mode in cases]
    timer = Timer(device)
    times = [[] for _ in steps]
    runs = [(i, k) for i in range(warmup + reps) for k in range(len(steps))]
    if not interleave:
        runs.sort(key=lambda run: run[1])
    for i, k in runs:
        prepare, timed = steps[k]
        prepare()
        elapsed = timer(timed)
        if i >= warmup:
            times[k].append(elapsed)
    results = []
    for (loss_fn, _), t in zip(cases, times, strict=True):
        prepare_full, full = make_step_(loss_fn, inputs, "full")
        prepare_full()
        results.append((statistics.median(t), PeakMemory(device)(full)))
    return results


def conditions(device: str, dtype: str, opts: LossOptions) -> dict:
    """What every row names: machine, software, commit, date and loss options
    (the divergence is set per row)."""
    return dict(
        device=device_name(device),
        torch=torch.__version__,
        commit=commit(),
        date=datetime.date.today().isoformat(),
        dtype=dtype,
        temperature=opts.temperature,
        alpha=opts.alpha,
        label_smoothing=opts.label_smoothing,
        teacher_vocab=opts.teacher_vocab,
    )


def bandwidth(n: int, v: int, element_size: int, seconds: float, copy_bw: float) -> dict:
    """The byte floor (read student + read teacher + write gradient) per second,
    in GB/s and as a share of the copy bandwidth."""
    floor = 3 * n * v * element_size
    return dict(
        floor_gbps=round(floor / seconds / 1e9, 1),
        pct_of_copy=round(100 * floor / seconds / copy_bw, 1),
    )


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        n, v = item.lower().split("x")
        sizes.append((int(n), int(v)))
    return sizes


def run(args) -> list[dict]:
    device, dtype = args.device, DTYPES[args.dtype]
    opts = LossOptions(
        temperature=args.temperature,
        alpha=args.alpha,
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        teacher_vocab="truncate" if args.teacher_pad else "exact",
    )
    meta = conditions(device, args.dtype, opts)
    rows = []
    for n, v in parse_sizes(args.sizes):
        inputs = make_inputs(n, v, dtype, device, teacher_pad=args.teacher_pad)
        elem = inputs[0].element_size()
        copy_bw = copy_bandwidth(n, v, dtype, device, max(args.reps, 3))
        for name in args.providers.split(","):
            provider = PROVIDERS[name]
            why = provider.missing(device)
            if why:
                print(f"skipped {name}: {why}", file=sys.stderr)
                continue
            cases = [
                (divergence, mode, provider.make(dataclasses.replace(opts, divergence=divergence)))
                for divergence, mode in itertools.product(
                    args.divergence.split(","), args.modes.split(",")
                )
            ]
            # Interleaved cases are timed together; otherwise one by one, so
            # that an out-of-memory case loses only its own row.
            groups = [cases] if args.interleave else [[case] for case in cases]
            measured = []
            for group in groups:
                try:
                    results = bench_cases(
                        [(fn, mode) for _, mode, fn in group],
                        inputs,
                        device,
                        args.warmup,
                        args.reps,
                        args.interleave,
                    )
                except torch.OutOfMemoryError:
                    what = ", ".join(f"{d} {m}" for d, m, _ in group)
                    print(f"{name} {what} {n}x{v}: out of memory", file=sys.stderr)
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                for (divergence, mode, _), result in zip(group, results, strict=True):
                    measured.append((divergence, mode, *result))
            for divergence, mode, seconds, peak in measured:
                row = dict(meta, divergence=divergence, provider=name, mode=mode, n=n, v=v)
                row.update(
                    ms=round(seconds * 1e3, 3),
                    peak_mib=round(peak / 2**20, 1),
                    peak_nv=round(peak / (n * v * elem), 2),
                    copy_gbps=round(copy_bw / 1e9, 1),
                )
                if name.startswith("kdfused") and mode == "full":
                    row.update(bandwidth(n, v, elem, seconds, copy_bw))
                rows.append(row)
                print(format_row(row), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


COLUMNS = ["provider", "mode", "n", "v", "ms", "peak_mib", "peak_nv", "floor_gbps", "pct_of_copy"]
META = ["device", "torch", "commit", "date", "dtype", "divergence", "temperature", "alpha"]
META += ["label_smoothing", "teacher_vocab"]
FIELDS = META + COLUMNS + ["copy_gbps"]


def format_row(row) -> str:
    return "  ".join(f"{k}={row.get(k, '')}" for k in COLUMNS + ["divergence"])


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    first = rows[0]
    divergences = sorted({row["divergence"] for row in rows})
    columns = (["divergence"] if len(divergences) > 1 else []) + COLUMNS
    head = (
        f"{first['device']}, torch {first['torch']}, commit {first['commit']}, {first['date']}; "
        f"{first['dtype']}, {', '.join(divergences)}, T = {first['temperature']}, "
        f"alpha = {first['alpha']}; median times; copy bandwidth {first['copy_gbps']} GB/s\n\n"
    )
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(k, "")) for k in columns) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--sizes", default="4096x32000", help="NxV[,NxV...]")
    parser.add_argument("--providers", default="kdfused,eager,compile,liger")
    parser.add_argument("--modes", default="full", help=",".join(MODES))
    parser.add_argument(
        "--divergence", default="forward_kl", help="forward_kl,reverse_kl,jsd: one or several"
    )
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument(
        "--teacher-pad",
        type=int,
        default=0,
        help="give the teacher this many more columns (kdfused: teacher_vocab='truncate')",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time a provider's divergences and modes in turns, run by run",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--csv", help="write the rows to this CSV file")
    parser.add_argument("--md", help="write a markdown table to this file")
    args = parser.parse_args(argv)
    check_arguments(parser, args, mode=MODES, divergence=DIVERGENCES, provider=PROVIDERS)
    rows = run(args)
    write_outputs(rows, markdown(rows), FIELDS, args.csv, args.md)


def check_arguments(parser, args, **choices) -> None:
    """parser.error for --device cuda without a GPU, or for a comma-separated
    --<name>s (or --<name>) list naming something outside choices[name]."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda, but torch {torch.__version__} sees no CUDA GPU")
    for name, allowed in choices.items():
        given = getattr(args, name + "s", None) or getattr(args, name)
        for item in given.split(","):
            if item not in allowed:
                parser.error(f"unknown {name} {item!r}: choose from {', '.join(allowed)}")


def write_outputs(rows: list[dict], table: str, fields: list[str], csv_path, md_path) -> None:
    """Prints the markdown table and appends it and the rows to the files
    named (a CSV gets its header when it is new)."""
    print(table)
    if md_path:
        with open(md_path, "a") as f:
            f.write(table + "\n")
    if csv_path and rows:
        new = not os.path.exists(csv_path)
        with open(csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
