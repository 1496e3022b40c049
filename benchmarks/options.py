"""What two options of docs/usage.md cost: kdfused's full step by
default, with label smoothing, and with a padded teacher read in place
(teacher_vocab="truncate"), the three taking turns run by run in one process
(this machine is noisy; ratios from turns are steadier than from runs).

    python -m benchmarks.options --sizes 4096x32000 --reps 9

Prints, per size, each case's median time and its ratio to the default step.
"""

from __future__ import annotations

import argparse

import torch

import kdfused

from .run import DTYPES, bench_cases, make_inputs, parse_sizes


def compare(n, v, dtype, device, smoothing, pad, warmup, reps):
    """[(case, median seconds)] for the default step, label_smoothing and a
    teacher with pad more columns."""
    inputs = make_inputs(n, v, dtype, device)
    padded_teacher = make_inputs(n, v, dtype, device, teacher_pad=pad)[1]
    default = kdfused.FusedDistillLoss()
    smoothed = kdfused.FusedDistillLoss(label_smoothing=smoothing)
    truncated = kdfused.FusedDistillLoss(teacher_vocab="truncate")
    cases = [
        ("default", default),
        (f"label_smoothing={smoothing}", smoothed),
        (f"teacher +{pad} columns, truncate", lambda s, t, y: truncated(s, padded_teacher, y)),
    ]
    results = bench_cases([(fn, "full") for _, fn in cases], inputs, device, warmup, reps, True)
    return [(name, seconds) for (name, _), (seconds, _) in zip(cases, results, strict=True)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--sizes", default="4096x32000", help="NxV[,NxV...]")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--teacher-pad", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args(argv)
    rows = []
    for n, v in parse_sizes(args.sizes):
        results = compare(
            n,
            v,
            DTYPES[args.dtype],
            args.device,
            args.label_smoothing,
            args.teacher_pad,
            args.warmup,
            args.reps,
        )
        base = results[0][1]
        for name, seconds in results:
            rows.append((n, v, name, seconds, seconds / base))
            print(f"{n}x{v}  {name}: {seconds * 1e3:.1f} ms, {seconds / base:.3f}x", flush=True)
    return rows


if __name__ == "__main__":
    main()
