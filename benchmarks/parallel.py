"""The vocab-parallel loss (docs/design.md, "Vocab-parallel"): the full step on W ranks,
each with its shard of the vocabulary, next to W = 1, and what crosses
between the ranks against what an all-gather of the logits would move.

    python -m benchmarks.parallel --sizes 4096x32000 --worlds 1,2 --reps 5

Spawns W processes (gloo on the CPU, NCCL with --device cuda: one GPU a rank)
per world size. Each times its own full steps (forward + backward, median of
reps after a warm-up); rank 0 prints the slowest rank's median. Bytes per row:
what each rank receives per row (the 12-float statistics of the W - 1 other
ranks, +2 floats each for JSD), against (W - 1) / W of both models' logits
rows, the least a logits all-gather would bring to each rank.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdfused

from .run import DTYPES, commit, device_name, parse_sizes


def _rank_main(rank, world, init_file, device, n, v, dtype_name, divergence, reps, out_file):
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    if device == "cuda":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, os.cpu_count() // world))
        dev = torch.device("cpu")
    dtype = DTYPES[dtype_name]
    widths = [v // world] * world
    widths[-1] += v - sum(widths)
    width = widths[rank]
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(n, width, generator=g)).to(dev, dtype)
    t = (3 * torch.randn(n, width, generator=g)).to(dev, dtype)
    y = torch.randint(0, v, (n,), generator=g).to(dev)
    group = dist.group.WORLD if world > 1 else dist.new_group([0])
    loss_fn = kdfused.FusedDistillLoss(divergence=divergence, process_group=group)
    x = s.clone().requires_grad_()

    def step():
        x.grad = None
        loss_fn(x, t, y).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # learns the layout
    times = []
    for _ in range(reps):
        dist.barrier()
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    median = torch.tensor([statistics.median(times)], dtype=torch.float64)
    if device == "cuda":
        median = median.cuda()
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out_file, "w") as f:
            f.write(str(float(median)))
    dist.destroy_process_group()


def measure(world, device, n, v, dtype_name, divergence, reps) -> float:
    """The slowest rank's median full step in seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out")
        mp.start_processes(
            _rank_main,
            args=(world, init_file, device, n, v, dtype_name, divergence, reps, out_file),
            nprocs=world,
            start_method="spawn",
        )
        with open(out_file) as f:
            return float(f.read())


def exchanged_bytes(world: int, v: int, element: int, divergence: str):
    """(bytes a rank receives per row, bytes a logits all-gather would bring)."""
    floats = 12 + (2 if divergence == "jsd" else 0)
    ours = (world - 1) * floats * 4
    logits = 2 * (v - v // world) * element  # both models' other shards
    return ours, logits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--sizes", default="4096x32000", help="NxV[,NxV...]")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--divergences", default="forward_kl,jsd")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    print(
        f"# {device_name(args.device)}, torch {torch.__version__}, commit {commit()}, "
        f"{args.dtype}, {'NCCL' if args.device == 'cuda' else 'gloo'}, median of {args.reps}",
        flush=True,
    )
    element = torch.empty(0, dtype=DTYPES[args.dtype]).element_size()
    rows = []
    for n, v in parse_sizes(args.sizes):
        for divergence in args.divergences.split(","):
            base = None
            for world in (int(w) for w in args.worlds.split(",")):
                seconds = measure(world, args.device, n, v, args.dtype, divergence, args.reps)
                base = base or seconds
                ours, logits = exchanged_bytes(world, v, element, divergence)
                rows.append((n, v, divergence, world, seconds, ours, logits))
                print(
                    f"{n}x{v} {divergence} W={world}: {seconds * 1e3:.1f} ms "
                    f"({seconds / base:.2f}x W=1); a rank receives {ours} bytes a row, "
                    f"a logits all-gather {logits}",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    main()
