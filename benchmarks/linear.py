"""Benchmark CLI for the fused-linear loss (hidden states in): provider x mode x
size, side by side in one process.

    python -m benchmarks.linear --device cpu --dtype float32 --sizes 2048x512x1024x32000 \\
        --providers kdfused,kdfused-dense,eager,compile,matmuls --csv out.csv --md out.md

A size is N x Hs x Ht x V: N tokens, the student's and the teacher's hidden
sizes and the vocabulary. Providers (each computes the same loss, checked
against the plain loss in float64 before it is timed, bar the floor):

- ``kdfused``: ``FusedLinearDistillLoss`` (chunks; no N x V logits).
- ``kdfused-dense``: both models' logits materialised by matmul, then
  kdfused's dense ``FusedDistillLoss``.
- ``eager`` / ``compile``: the logits materialised, then the loss as users
  write it in PyTorch (providers.plain_loss), eager or under torch.compile.
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunked, torch.compile
  per chunk), with weights that give the same loss (it has no T^2 factor).
- ``matmuls``: the floor: the same four products alone (student and teacher
  logits, then the two backward products grad_hidden = G W and grad_weight =
  G^T h with a stand-in G), and nothing else.

Times are medians over --reps runs after --warmup runs, the providers taken
in turns run by run (--interleave, on by default: this machine is noisy).
Peak memory is what one full step allocates beyond its inputs (as run.py
measures it); ``beyond_grads_nv`` is that peak less the gradients of the
hidden states, weight and bias, in N x V float32 buffers. ``vs_matmuls`` is a
full step's time over the floor's, measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import torch

import kdfused

from .providers import LossOptions, plain_loss
from .run import DIVERGENCES, DTYPES, bench_cases, check_arguments, conditions, write_outputs

MODES = ("forward", "full")


@dataclasses.dataclass(frozen=True)
class LinearSize:
    n: int
    hs: int
    ht: int
    v: int

    @staticmethod
    def parse(text: str) -> list[LinearSize]:
        sizes = []
        for item in text.split(","):
            parts = item.lower().split("x")
            if len(parts) != 4:
                raise ValueError(f"a size is NxHsxHtxV, got {item!r}")
            sizes.append(LinearSize(*(int(p) for p in parts)))
        return sizes


def make_inputs(size: LinearSize, dtype, device, seed=0):
    """(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
    weights scaled so that the logits spread over a few units, as a trained
    model's do."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).mul_(scale)

    hidden = rand(size.n, size.hs)
    weight = rand(size.v, size.hs, scale=3 / math.sqrt(size.hs))
    t_hidden = rand(size.n, size.ht)
    t_weight = rand(size.v, size.ht, scale=3 / math.sqrt(size.ht))
    labels = torch.randint(0, size.v, (size.n,), generator=g, device=device)
    labels[::7] = -100  # some ignored rows, as with padding
    return hidden, weight, t_hidden, t_weight, labels


class _MatmulFloor(torch.autograd.Function):
    """The products a fused-linear loss cannot avoid, alone: forward forms both
    models' logits, backward the gradients of the hidden states and the weight
    from a stand-in logits gradient (the student's logits themselves)."""

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight):
        s = hidden @ weight.t()
        t = t_hidden @ t_weight.t()
        ctx.save_for_backward(hidden, weight, s)
        return s[0, 0] + t[0, 0]

    @staticmethod
    def backward(ctx, _grad):
        hidden, weight, g = ctx.saved_tensors
        return g @ weight, g.t() @ hidden, None, None


def _kdfused(opts: LossOptions):
    loss_fn = kdfused.FusedLinearDistillLoss(**dataclasses.asdict(opts))
    return lambda h, w, th, tw, y: loss_fn(h, w, th, tw, y)


def _logits(h, w, th, tw):
    s = h @ w.t()
    with torch.no_grad():
        t = th @ tw.t()
    return s, t


def _kdfused_dense(opts: LossOptions):
    loss_fn = kdfused.FusedDistillLoss(**dataclasses.asdict(opts))
    return lambda h, w, th, tw, y: loss_fn(*_logits(h, w, th, tw), y)


def _eager(opts: LossOptions):
    return lambda h, w, th, tw, y: plain_loss(*_logits(h, w, th, tw), y, opts)


def _compiled(opts: LossOptions):
    return torch.compile(_eager(opts))


def _liger(opts: LossOptions):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(opts.divergence, opts.beta)
    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=opts.alpha,
        weight_soft_loss=(1 - opts.alpha) * opts.temperature**2,
        beta=beta,
        ignore_index=opts.ignore_index,
        temperature=opts.temperature,
    )
    return lambda h, w, th, tw, y: loss_fn(h, w, th, tw, y)


def _liger_missing(device: str) -> str | None:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except ImportError as err:
        return f"liger-kernel is not importable ({err})"
    return None


def _floor(opts: LossOptions):
    return lambda h, w, th, tw, y: _MatmulFloor.apply(h, w, th, tw)


@dataclasses.dataclass(frozen=True)
class LinearProvider:
    name: str
    make: object
    missing: object = lambda device: None
    computes_loss: bool = True


PROVIDERS = {
    p.name: p
    for p in (
        LinearProvider("kdfused", _kdfused),
        LinearProvider("kdfused-dense", _kdfused_dense),
        LinearProvider("eager", _eager),
        LinearProvider("compile", _compiled),
        LinearProvider("liger", _liger, _liger_missing),
        LinearProvider("matmuls", _floor, computes_loss=False),
    )
}


def make_step(loss_fn, inputs, mode):
    """(prepare, timed) for one mode of a training step; prepare() clears the
    gradients of the hidden states and the weight (untimed)."""
    hidden, weight, t_hidden, t_weight, labels = inputs
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()

    def prepare():
        h.grad = None
        w.grad = None

    def forward():
        return loss_fn(h, w, t_hidden, t_weight, labels)

    def full():
        forward().backward()

    return prepare, {"forward": forward, "full": full}[mode]


def check_loss(loss_fn, inputs, opts: LossOptions) -> None:
    """The provider computes the loss being compared (plain loss in float64 on
    the materialised logits; 1e-3 is far below any difference of options)."""
    got = loss_fn(*inputs)
    wide = [x.double() for x in inputs[:4]]
    with torch.no_grad():
        want = plain_loss(wide[0] @ wide[1].t(), wide[2] @ wide[3].t(), inputs[4], opts)
    if not math.isclose(float(got), float(want), rel_tol=1e-3):
        raise SystemExit(f"the provider's loss {float(got)} is not the plain loss {float(want)}")


def run(args) -> list[dict]:
    device, dtype = args.device, DTYPES[args.dtype]
    opts = LossOptions(
        temperature=args.temperature, alpha=args.alpha, divergence=args.divergence, beta=args.beta
    )
    meta = dict(conditions(device, args.dtype, opts), divergence=args.divergence)
    rows = []
    for size in LinearSize.parse(args.sizes):
        inputs = make_inputs(size, dtype, device)
        cases = []
        for name in args.providers.split(","):
            provider = PROVIDERS[name]
            why = provider.missing(device)
            if why:
                print(f"skipped {name}: {why}", file=sys.stderr)
                continue
            loss_fn = provider.make(opts)
            if provider.computes_loss:
                check_loss(loss_fn, inputs, opts)
            cases += [(name, mode, loss_fn) for mode in args.modes.split(",")]
        groups = [cases] if args.interleave else [[case] for case in cases]
        measured = {}
        for group in groups:
            results = bench_cases(
                [(fn, mode) for _, mode, fn in group],
                inputs,
                device,
                args.warmup,
                args.reps,
                args.interleave,
                step=make_step,
            )
            for (name, mode, _), result in zip(group, results, strict=True):
                measured[name, mode] = result
        nv = size.n * size.v * 4
        grads = (size.n * size.hs + size.v * size.hs) * inputs[0].element_size()
        floor = measured.get(("matmuls", "full"))
        for (name, mode), (seconds, peak) in measured.items():
            row = dict(meta, provider=name, mode=mode, **dataclasses.asdict(size))
            row.update(
                ms=round(seconds * 1e3, 1),
                peak_mib=round(peak / 2**20, 1),
                beyond_grads_nv=round((peak - grads) / nv, 3),
            )
            if floor and mode == "full":
                row["vs_matmuls"] = round(seconds / floor[0], 3)
            rows.append(row)
            print("  ".join(f"{k}={row.get(k, '')}" for k in COLUMNS), flush=True)
    return rows


COLUMNS = ["provider", "mode", "n", "hs", "ht", "v", "ms", "vs_matmuls", "peak_mib"]
COLUMNS += ["beyond_grads_nv"]
META = ["device", "torch", "commit", "date", "dtype", "divergence", "temperature", "alpha"]
META += ["label_smoothing", "teacher_vocab"]


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    first = rows[0]
    head = (
        f"{first['device']}, torch {first['torch']}, commit {first['commit']}, {first['date']}; "
        f"{first['dtype']}, {first['divergence']}, T = {first['temperature']}, "
        f"alpha = {first['alpha']}; median times\n\n"
    )
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in COLUMNS) + " |" for r in rows]
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--sizes", default="2048x512x1024x32000", help="NxHsxHtxV[,...]")
    parser.add_argument("--providers", default="kdfused,kdfused-dense,eager,compile,matmuls")
    parser.add_argument("--modes", default="full", help=",".join(MODES))
    parser.add_argument("--divergence", default="forward_kl", choices=DIVERGENCES)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument(
        "--no-interleave",
        dest="interleave",
        action="store_false",
        help="time the providers one after another instead of in turns",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--csv", help="append the rows to this CSV file")
    parser.add_argument("--md", help="append a markdown table to this file")
    args = parser.parse_args(argv)
    check_arguments(parser, args, mode=MODES, provider=PROVIDERS)
    rows = run(args)
    write_outputs(rows, markdown(rows), META + COLUMNS, args.csv, args.md)


if __name__ == "__main__":
    main()
