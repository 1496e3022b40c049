"""Distillation end to end on real data: ``python -m kdfused.demo``.

The scikit-learn digits set (1,797 8x8 handwritten digits, shipped inside the
scikit-learn package, so nothing is downloaded) is split into train and
held-out test sets. A teacher MLP (two hidden layers of 100) is trained on all
training images. A student MLP (one hidden layer of 50) is then trained twice
from the same initialisation on a labelled subset of them (``--student-fraction``,
the usual reason to distil: labels are scarce, a teacher is at hand): once on
the labels alone (cross-entropy), once with ``kdfused.FusedDistillLoss``
against the teacher's logits. Every model gets the same number of optimisation
steps. The table compares held-out accuracy and training time.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import kdfused
from kdfused._validation import DIVERGENCES


def load_digits_split(seed: int, test_fraction: float, student_fraction: float = 1.0):
    """(x_train, y_train, x_test, y_test, student_idx): student_idx is a
    stratified subset of the training rows with the students' labels."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - message for users only
        raise SystemExit(
            "the demo needs scikit-learn (it ships the digits data): pip install scikit-learn"
        ) from err
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    student_idx = range(len(y_train))
    if student_fraction < 1.0:
        student_idx, _ = train_test_split(
            student_idx, train_size=student_fraction, random_state=seed, stratify=y_train
        )
    as_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731 (pixels 0..16)
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    idx = torch.tensor(sorted(student_idx), dtype=torch.int64)
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test), idx


def mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train(model, x, loss_of_batch, *, steps, batch_size, lr, seed, desc, progress):
    """Adam for `steps` mini-batches, reshuffling every epoch; returns seconds."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    with tqdm(total=steps, desc=desc, unit="step", mininterval=0.2, disable=not progress) as bar:
        done = 0
        while done < steps:
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size]
                loss = loss_of_batch(model(x[idx]), idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                bar.update(1)
                if done == steps:
                    break
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m kdfused.demo", description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed for split, init and batches")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.3, help="weight of the hard-label term")
    p.add_argument("--divergence", choices=DIVERGENCES, default="forward_kl")
    p.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight")
    p.add_argument(
        "--epochs",
        type=int,
        default=40,
        help="teacher epochs over the training set; each student takes as many steps",
    )
    p.add_argument(
        "--student-fraction",
        type=float,
        default=0.1,
        help="share of the training images (with labels) the students train on",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--test-fraction", type=float, default=0.4)
    p.add_argument("--backend", choices=["auto", "cpu", "reference"], default="auto")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test, sub = load_digits_split(
        args.seed, args.test_fraction, args.student_fraction
    )
    x_sub, y_sub = x_train[sub], y_train[sub]
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    print(
        f"digits: {len(x_train)} training images ({len(sub)} of them for the students), "
        f"{len(x_test)} held out; {steps} steps per model; seed {args.seed}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    common = dict(
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=not args.no_progress,
    )
    ce = nn.CrossEntropyLoss()

    teacher = mlp(64, 100, 100, 10)
    t_time = train(
        teacher, x_train, lambda out, idx: ce(out, y_train[idx]), desc="teacher", **common
    )
    with torch.no_grad():
        teacher_logits = teacher(x_sub)

    student_init = mlp(64, 50, 10)
    scratch = copy.deepcopy(student_init)
    s_time = train(
        scratch, x_sub, lambda out, idx: ce(out, y_sub[idx]), desc="student, scratch", **common
    )

    distill = kdfused.FusedDistillLoss(
        temperature=args.temperature,
        alpha=args.alpha,
        divergence=args.divergence,
        beta=args.beta,
        backend=args.backend,
    )
    distilled = copy.deepcopy(student_init)
    d_time = train(
        distilled,
        x_sub,
        lambda out, idx: distill(out, teacher_logits[idx], y_sub[idx]),
        desc="student, distilled",
        **common,
    )

    rows = [
        (f"teacher 64-100-100-10, {len(x_train)} labels", teacher, t_time),
        (f"student 64-50-10, {len(sub)} labels", scratch, s_time),
        ("  + distilled from teacher", distilled, d_time),
    ]
    print(f"\n{distill}\n")
    print(f"{'model':<34} {'params':>7} {'held-out acc':>13} {'train time':>11}")
    accs = []
    for name, model, seconds in rows:
        accs.append(accuracy(model, x_test, y_test))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name:<34} {n_params:>7} {100 * accs[-1]:>12.2f}% {seconds:>10.2f}s")
    print(f"\ndistilled - scratch: {100 * (accs[2] - accs[1]):+.2f} points of held-out accuracy")
    return dict(teacher=accs[0], scratch=accs[1], distilled=accs[2])


if __name__ == "__main__":
    main()
