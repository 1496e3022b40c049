"""Plots benchmark CSV rows (from benchmarks/run.py): full-step time and peak
memory against V (at one N) and against N (at one V), one line per provider.

    python -m benchmarks.plot results.csv -o plot.png [--n 1024] [--v 32000]

Only full-step rows of one divergence (--divergence, default forward_kl) are
drawn. By default the N with the most distinct V values and the V with the most
distinct N values are used. The title names the device, torch, dtype, commit
and date of the rows (which must agree: one run's rows).
"""

from __future__ import annotations

import argparse
import collections
import csv

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

SAME = ("device", "torch", "dtype", "commit", "date")


def load(path: str, divergence: str = "forward_kl") -> list[dict]:
    with open(path, newline="") as f:
        rows = [
            r for r in csv.DictReader(f) if r["mode"] == "full" and r["divergence"] == divergence
        ]
    if not rows:
        raise SystemExit(f"{path}: no full-step {divergence} rows")
    for key in SAME:
        values = {r[key] for r in rows}
        if len(values) > 1:
            raise SystemExit(f"{path}: rows of several runs ({key}: {sorted(values)})")
    return rows


def most_varied(rows, fixed: str, varying: str) -> int:
    spread = collections.defaultdict(set)
    for r in rows:
        spread[int(r[fixed])].add(int(r[varying]))
    return max(spread, key=lambda k: (len(spread[k]), k))


def panel(ax, rows, fixed, value, varying, metric, label):
    lines = collections.defaultdict(list)
    for r in rows:
        if int(r[fixed]) == value and r.get(metric):
            lines[r["provider"]].append((int(r[varying]), float(r[metric])))
    # Distinct markers and dashes: equal values (the memory of kdfused and
    # torch.compile, say) stay visible as two lines.
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-"), ("x", "--")]
    for k, (provider, points) in enumerate(sorted(lines.items())):
        marker, dashes = styles[k % len(styles)]
        points.sort()
        ax.plot(*zip(*points, strict=True), marker=marker, linestyle=dashes, label=provider)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"{varying.upper()} (at {fixed.upper()} = {value})")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def plot(rows, out: str, n: int | None = None, v: int | None = None) -> None:
    n = n or most_varied(rows, "n", "v")
    v = v or most_varied(rows, "v", "n")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    panel(axes[0][0], rows, "n", n, "v", "ms", "full step (ms)")
    panel(axes[0][1], rows, "v", v, "n", "ms", "full step (ms)")
    panel(axes[1][0], rows, "n", n, "v", "peak_mib", "peak memory beyond inputs (MiB)")
    panel(axes[1][1], rows, "v", v, "n", "peak_mib", "peak memory beyond inputs (MiB)")
    first = rows[0]
    fig.suptitle(
        f"{first['device']}, torch {first['torch']}, {first['dtype']}, {first['divergence']}, "
        f"T = {first['temperature']}, alpha = {first['alpha']}; "
        f"commit {first['commit']}, {first['date']}"
    )
    fig.savefig(out, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv")
    parser.add_argument("-o", "--out", required=True, help="PNG file to write")
    parser.add_argument("--n", type=int, help="N of the panels against V")
    parser.add_argument("--v", type=int, help="V of the panels against N")
    parser.add_argument("--divergence", default="forward_kl")
    args = parser.parse_args(argv)
    plot(load(args.csv, args.divergence), args.out, args.n, args.v)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
