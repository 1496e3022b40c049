"""The pytest-benchmark suite: provider x mode x size, with the providers and
the step definitions of the CLI (benchmarks/run.py), timed by pytest-benchmark.

    bash scripts/kdfused.sh bench                       # this machine's sizes
    KDFUSED_BENCH_SIZES=2048x128256 KDFUSED_BENCH_DTYPE=bfloat16 \\
        bash scripts/kdfused.sh bench --benchmark-json out.json

Defaults: on CPU float32 at 512 x 32000 and 128 x 128256, on CUDA bfloat16 at
8192 x 128256 and 4096 x 32000 (KDFUSED_BENCH_DEVICE picks the device). The
fused-linear cases (providers of benchmarks/linear.py, sizes N x Hs x Ht x V in
KDFUSED_BENCH_LINEAR_SIZES) default to 1024 x 512 x 1024 x 32000 on CPU and
8192 x 2048 x 4096 x 128256 on CUDA. Each
case first checks that the provider computes the loss being compared (against
the plain loss in float64), so a fast wrong loss fails rather than wins. Every
row's extra_info names the device, torch, dtype, sizes and commit, and gives
the peak memory of one full step in N x V student-dtype buffers; kdfused's full
steps also give the share of the copy bandwidth (measured in the same session)
achieved against the byte floor of 3 N V element sizes.
"""

import dataclasses
import functools
import os

import pytest
import torch

import kdfused

from . import linear
from . import sparse as sparse_bench
from .providers import PROVIDERS, LossOptions, plain_loss
from .run import (
    DTYPES,
    MODES,
    PeakMemory,
    bandwidth,
    conditions,
    copy_bandwidth,
    make_inputs,
    make_step,
    parse_sizes,
)

DEVICE = os.environ.get("KDFUSED_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE == "cuda"
DTYPE = os.environ.get("KDFUSED_BENCH_DTYPE", "bfloat16" if ON_CUDA else "float32")
SIZES = parse_sizes(
    os.environ.get(
        "KDFUSED_BENCH_SIZES", "8192x128256,4096x32000" if ON_CUDA else "512x32000,128x128256"
    )
)
LINEAR_SIZES = linear.LinearSize.parse(
    os.environ.get(
        "KDFUSED_BENCH_LINEAR_SIZES",
        "8192x2048x4096x128256" if ON_CUDA else "1024x512x1024x32000",
    )
)
OPTIONS = LossOptions(temperature=2.0, alpha=0.5, divergence="forward_kl")


@functools.cache
def inputs_for(n, v):
    return make_inputs(n, v, DTYPES[DTYPE], DEVICE)


@functools.cache
def loss_for(provider):
    # One loss per provider for the session: torch.compile's compilations
    # are reused across modes and sizes instead of redone for each case.
    return PROVIDERS[provider].make(OPTIONS)


@functools.cache
def copy_bytes_per_second(n, v):
    return copy_bandwidth(n, v, DTYPES[DTYPE], DEVICE, reps=5)


def synchronised(fn):
    if not ON_CUDA:
        return fn

    def call():
        fn()
        torch.cuda.synchronize()

    return call


@pytest.mark.parametrize("size", SIZES, ids=lambda nv: f"{nv[0]}x{nv[1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_distill_step(benchmark, provider, mode, size):
    why = PROVIDERS[provider].missing(DEVICE)
    if why:
        pytest.skip(f"{provider}: {why}")
    n, v = size
    inputs = inputs_for(n, v)
    loss_fn = loss_for(provider)

    # The loss being timed is the loss being compared (float64 plain loss as
    # the yardstick; 1e-3 is far below any difference of options or scale).
    student, teacher, labels = inputs
    got = loss_fn(student, teacher, labels)
    want = plain_loss(student.double(), teacher.double(), labels, OPTIONS)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)

    prepare, timed = make_step(loss_fn, inputs, mode)
    benchmark.pedantic(synchronised(timed), setup=synchronised(prepare), rounds=5, warmup_rounds=1)
    prepare_full, full = make_step(loss_fn, inputs, "full")
    prepare_full()
    peak = PeakMemory(DEVICE)(full)
    element = student.element_size()
    benchmark.extra_info.update(conditions(DEVICE, DTYPE, OPTIONS))
    benchmark.extra_info.update(n=n, v=v, peak_nv=round(peak / (n * v * element), 2))
    if provider.startswith("kdfused") and mode == "full" and benchmark.stats:
        seconds = benchmark.stats.stats.median
        benchmark.extra_info.update(bandwidth(n, v, element, seconds, copy_bytes_per_second(n, v)))


@functools.cache
def linear_inputs_for(size):
    return linear.make_inputs(size, DTYPES[DTYPE], DEVICE)


@functools.cache
def linear_loss_for(provider):
    return linear.PROVIDERS[provider].make(OPTIONS)


@pytest.mark.parametrize("size", LINEAR_SIZES, ids=lambda s: f"{s.n}x{s.hs}x{s.ht}x{s.v}")
@pytest.mark.parametrize("mode", linear.MODES)
@pytest.mark.parametrize("provider", list(linear.PROVIDERS))
def test_fused_linear_step(benchmark, provider, mode, size):
    """The fused-linear loss and what a user would run instead, against the
    floor of the matmuls alone (provider "matmuls")."""
    why = linear.PROVIDERS[provider].missing(DEVICE)
    if why:
        pytest.skip(f"{provider}: {why}")
    inputs = linear_inputs_for(size)
    loss_fn = linear_loss_for(provider)
    if linear.PROVIDERS[provider].computes_loss:
        linear.check_loss(loss_fn, inputs, OPTIONS)
    prepare, timed = linear.make_step(loss_fn, inputs, mode)
    benchmark.pedantic(synchronised(timed), setup=synchronised(prepare), rounds=3, warmup_rounds=1)
    prepare_full, full = linear.make_step(loss_fn, inputs, "full")
    prepare_full()
    peak = PeakMemory(DEVICE)(full)
    grads = (size.n * size.hs + size.v * size.hs) * inputs[0].element_size()
    benchmark.extra_info.update(conditions(DEVICE, DTYPE, OPTIONS))
    benchmark.extra_info.update(
        dataclasses.asdict(size), beyond_grads_nv=round((peak - grads) / (size.n * size.v * 4), 3)
    )


SPARSE_K = int(os.environ.get("KDFUSED_BENCH_SPARSE_K", "64"))


@functools.cache
def sparse_teacher_for(n, v):
    return sparse_bench.sparse_teacher(inputs_for(n, v)[1], min(SPARSE_K, v), OPTIONS.temperature)


@pytest.mark.parametrize("size", SIZES, ids=lambda nv: f"{nv[0]}x{nv[1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("teacher", ["sparse", "dense"])
def test_sparse_teacher_step(benchmark, teacher, mode, size):
    """kdfused's step with a sparse teacher (the top SPARSE_K of the dense
    teacher's rows, ghost tail) next to the same step with the dense teacher;
    the sparse loss is first checked against its float64 reference."""
    n, v = size
    student, teacher_logits, labels = inputs_for(n, v)
    sparse_teacher = sparse_teacher_for(n, v)
    loss_fn = kdfused.FusedDistillLoss(temperature=OPTIONS.temperature, alpha=OPTIONS.alpha)
    if teacher == "sparse":
        got = loss_fn(student, sparse_teacher, labels)
        want = kdfused.reference.sparse_distill_loss(
            student.double(),
            sparse_teacher.indices,
            sparse_teacher.logprobs.double(),
            labels,
            store_temperature=OPTIONS.temperature,
            temperature=OPTIONS.temperature,
            alpha=OPTIONS.alpha,
        )
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)
        step_fn = lambda s, t, y: loss_fn(s, sparse_teacher, y)  # noqa: E731
    else:
        step_fn = loss_fn
    prepare, timed = make_step(step_fn, (student, teacher_logits, labels), mode)
    benchmark.pedantic(synchronised(timed), setup=synchronised(prepare), rounds=5, warmup_rounds=1)
    prepare_full, full = make_step(step_fn, (student, teacher_logits, labels), "full")
    prepare_full()
    peak = PeakMemory(DEVICE)(full)
    benchmark.extra_info.update(conditions(DEVICE, DTYPE, OPTIONS))
    benchmark.extra_info.update(
        n=n, v=v, k=sparse_teacher.k, peak_nv=round(peak / (n * v * student.element_size()), 2)
    )


@pytest.mark.parametrize("size", SIZES, ids=lambda nv: f"{nv[0]}x{nv[1]}")
@pytest.mark.parametrize("provider", ["kdfused", "torch"])
def test_topk(benchmark, provider, size):
    """sparse.topk against torch.topk(torch.log_softmax(t / T), k)."""
    n, v = size
    logits = inputs_for(n, v)[1]
    k = min(SPARSE_K, v)
    if provider == "kdfused":
        fn = lambda: kdfused.sparse.topk(logits, k, temperature=2.0).logprobs  # noqa: E731
    else:
        fn = lambda: torch.topk(torch.log_softmax(logits.float() / 2.0, -1), k).values  # noqa: E731
    want = torch.topk(torch.log_softmax(logits.double() / 2.0, -1), k).values
    torch.testing.assert_close(fn().double(), want, rtol=0, atol=1e-4)
    benchmark.pedantic(synchronised(fn), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(conditions(DEVICE, DTYPE, OPTIONS))
    benchmark.extra_info.update(n=n, v=v, k=k)
