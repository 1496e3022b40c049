"""Thin typed wrappers over torch.ops.kdfused.*, their fake implementations,
and the choice of backend.

Importing this module loads the compiled library ``kdfused._C`` if it was built
(its static initialisers register the ``kdfused`` op namespace) and registers
the fake (meta) kernels torch.compile needs to trace the ops without running
them. Each fake takes exactly its op's schema, argument by argument (FAKES;
tests/test_ops.py checks every registered op against it). This module is the
bottom of the package with _validation: it imports nothing of kdfused's but
the compiled library.
"""

from __future__ import annotations

import warnings

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.kdfused)

    LOAD_ERROR: ImportError | None = None
except ImportError as err:  # not built: functional falls back to the reference
    LOAD_ERROR = err

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The CUDA top-k kernel's largest k (kMaxTopk in csrc/cuda/sparse_kernel.cuh).
CUDA_TOPK_MAX_K = 2048
# Floats per row of a shard's statistics (ShardStats) and of the merged row
# constants (RowConsts) of the vocab-parallel phases (csrc/kdfused_math.h).
STATS = 12
CONSTS = 11
# The same for a sparse teacher's phases, before the k per-id columns
# (SparseShardStats, and RowConsts with the tail's factor: csrc/sparse_shard_op.h).
SPARSE_STATS = 8
SPARSE_CONSTS = 12

# Device types with a compiled kernel, read once from the dispatcher (a plain
# set lookup is what torch.compile can trace; the dispatcher query is not).
BUILT_DEVICES = frozenset(
    device
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if LOAD_ERROR is None
    and torch._C._dispatch_has_kernel_for_dispatch_key("kdfused::distill_forward", key)
)


# Device types whose kernel can overwrite the student logits with their
# gradient (distill_forward_inplace): the CPU's.
INPLACE_DEVICES = frozenset(
    device
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if LOAD_ERROR is None
    and torch._C._dispatch_has_kernel_for_dispatch_key("kdfused::distill_forward_inplace", key)
)


def has_kernel(device_type: str) -> bool:
    """Whether the extension is loaded and has a kernel for this device type."""
    return device_type in BUILT_DEVICES


def _loss_scalars(temperature, alpha, divergence, beta, ignore_index, scale_by_t2) -> tuple:
    """The loss options in the ops' schema order and types."""
    return (
        float(temperature),
        float(alpha),
        divergence,
        float(beta),
        int(ignore_index),
        bool(scale_by_t2),
    )


def distill_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    scale_by_t2: bool,
    compute_grad: bool,
    label_smoothing: float = 0.0,
    student_entropy: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Runs the fused kernel on [N, V] logits and [N] labels.

    Returns ``(hard_rows, soft_rows, grad)``: float32 [N] per-row hard and soft
    terms (0 at ignored rows) and, if ``compute_grad``, the student gradient
    ``grad_scale * d loss_i / d s_i`` in the student's dtype (else a [0] tensor);
    with ``student_entropy``, also ``entropy_rows`` last: float32 [N], the
    student's entropy H(softmax(s / T)) of each row (0 at ignored rows), from
    the same pass over the logits.
    Raises ValueError for a label outside [0, V) that is not ``ignore_index``.
    """
    scalars = _loss_scalars(temperature, alpha, divergence, beta, ignore_index, scale_by_t2)
    out = torch.ops.kdfused.distill_forward.default(
        student,
        teacher,
        labels,
        grad_scale,
        *scalars,
        bool(compute_grad),
        float(label_smoothing),
        bool(student_entropy),
    )
    return _entropy_last(out, student_entropy)


def _entropy_last(out: tuple, wanted: bool) -> tuple:
    """An op's results with its trailing entropy rows kept only when asked
    for (the schema always returns them, empty when not asked)."""
    return tuple(out) if wanted else tuple(out[:-1])


def distill_forward_out(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    grad: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    scale_by_t2: bool,
    label_smoothing: float = 0.0,
    student_entropy: bool = False,
) -> tuple[torch.Tensor, ...]:
    """distill_forward with the gradient written into `grad` (a contiguous
    [N, V] tensor of the student's dtype, e.g. a buffer reused chunk after
    chunk); returns ``(hard_rows, soft_rows)``, and ``entropy_rows`` last
    with ``student_entropy``."""
    scalars = _loss_scalars(temperature, alpha, divergence, beta, ignore_index, scale_by_t2)
    out = torch.ops.kdfused.distill_forward_out.default(
        student,
        teacher,
        labels,
        grad_scale,
        *scalars,
        grad,
        float(label_smoothing),
        bool(student_entropy),
    )
    return _entropy_last(out, student_entropy)


def distill_forward_inplace(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    scale_by_t2: bool,
    label_smoothing: float = 0.0,
    student_entropy: bool = False,
) -> tuple[torch.Tensor, ...]:
    """distill_forward with the (contiguous) student logits overwritten by
    their gradient (devices in INPLACE_DEVICES); returns ``(hard_rows,
    soft_rows)``, and ``entropy_rows`` last with ``student_entropy`` (formed
    before the logits are overwritten)."""
    scalars = _loss_scalars(temperature, alpha, divergence, beta, ignore_index, scale_by_t2)
    out = torch.ops.kdfused.distill_forward_inplace.default(
        student,
        teacher,
        labels,
        grad_scale,
        *scalars,
        float(label_smoothing),
        bool(student_entropy),
    )
    return _entropy_last(out, student_entropy)


def _sparse_scalars(
    temperature, store_temperature, tail, alpha, divergence, beta, ignore_index, scale_by_t2
) -> tuple:
    """The sparse ops' options in their schema order and types."""
    return (
        float(temperature),
        float(store_temperature),
        tail,
        float(alpha),
        divergence,
        float(beta),
        int(ignore_index),
        bool(scale_by_t2),
    )


def sparse_distill_forward(
    student: torch.Tensor,
    indices: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    *,
    compute_grad: bool,
    label_smoothing: float = 0.0,
    offsets: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse-teacher kernel on [N, V] student logits and an [N, k]
    teacher, or with ``offsets`` (int64 [N + 1]) ragged rows [total] (options:
    temperature, store_temperature, tail, alpha, divergence, beta,
    ignore_index, scale_by_t2). ids int64, int32 or uint16 and log-probs
    float32, float16 or bfloat16 are read as they are. Returns ``(hard_rows,
    soft_rows, grad)`` as :func:`distill_forward`. Raises ValueError for a
    kept id outside [0, V) or repeated within its row (CPU; CUDA: a
    device-side assert)."""
    return torch.ops.kdfused.sparse_distill_forward.default(
        student,
        indices,
        logprobs,
        labels,
        grad_scale,
        *_sparse_scalars(**options),
        bool(compute_grad),
        float(label_smoothing),
        offsets,
    )


def sparse_distill_forward_out(
    student: torch.Tensor,
    indices: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    grad: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    offsets: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_distill_forward with the gradient written into `grad`."""
    return torch.ops.kdfused.sparse_distill_forward_out.default(
        student,
        indices,
        logprobs,
        labels,
        grad_scale,
        *_sparse_scalars(**options),
        grad,
        float(label_smoothing),
        offsets,
    )


def sparse_topk(logits: torch.Tensor, k: int, temperature: float):
    """The k largest log_softmax(logits / temperature) per row of [N, V]
    logits, largest first (ties: the lower id first): (int64 ids, float32
    log-probs), each [N, k]."""
    return torch.ops.kdfused.sparse_topk.default(logits, int(k), float(temperature))


def _phase(name, student, teacher, labels, grad_scale, extra, options):
    """One vocab-parallel phase op (csrc/parallel_op.h): options are the loss
    options plus column_offset and vocab."""
    scalars = _loss_scalars(
        options["temperature"],
        options["alpha"],
        options["divergence"],
        options["beta"],
        options["ignore_index"],
        options["scale_by_t2"],
    )
    op = getattr(torch.ops.kdfused, name).default
    tail = (float(options["label_smoothing"]), int(options["column_offset"]), int(options["vocab"]))
    return op(student, teacher, labels, grad_scale, *scalars, *tail, *extra)


def distill_stats(student, teacher, labels, **options) -> torch.Tensor:
    """[N, 12] float32: each row's statistics over this shard (ShardStats)."""
    return _phase("distill_stats", student, teacher, labels, None, (), options)


def distill_jsd_sums(student, teacher, labels, *, consts, **options) -> torch.Tensor:
    """[N, 2] float32: this shard's JSD sums given the merged constants."""
    return _phase("distill_jsd_sums", student, teacher, labels, None, (consts,), options)


def distill_grad(student, teacher, labels, grad_scale, *, consts, **options) -> torch.Tensor:
    """This shard's gradient [N, V_r] given the merged constants."""
    return _phase("distill_grad", student, teacher, labels, grad_scale, (consts,), options)


def distill_merge(shard_stats, labels, **options):
    """[W, N, 12] statistics in rank order -> (consts [N, 11], hard, soft)."""
    return torch.ops.kdfused.distill_merge.default(
        shard_stats,
        labels,
        float(options["temperature"]),
        float(options["alpha"]),
        options["divergence"],
        float(options["beta"]),
        int(options["ignore_index"]),
        bool(options["scale_by_t2"]),
        float(options["label_smoothing"]),
    )


def distill_jsd_finish(consts, shard_sums, labels, *, temperature, beta, ignore_index, scale_by_t2):
    """consts and [W, N, 2] JSD sums in rank order -> (consts, soft)."""
    return torch.ops.kdfused.distill_jsd_finish.default(
        consts,
        shard_sums,
        labels,
        float(temperature),
        float(beta),
        int(ignore_index),
        bool(scale_by_t2),
    )


def _sparse_phase_scalars(options) -> tuple:
    """A sparse phase op's options in its schema order: the sparse ops'
    (temperature, store_temperature, tail, alpha, divergence, beta,
    ignore_index, scale_by_t2), then label_smoothing, column_offset, vocab."""
    names = ("temperature", "store_temperature", "tail", "alpha", "divergence", "beta")
    sparse = _sparse_scalars(
        *(options[k] for k in names), options["ignore_index"], options["scale_by_t2"]
    )
    shard = (int(options["column_offset"]), int(options["vocab"]))
    return (*sparse, float(options["label_smoothing"]), *shard)


def sparse_shard_stats(student, indices, logprobs, labels, **phase) -> torch.Tensor:
    """[N, 8 + k] float32: each row's statistics over this shard
    (SparseShardStats) and the student's logits at the kept ids it holds.
    phase: the loss options, tail, store_temperature, column_offset, vocab."""
    return torch.ops.kdfused.sparse_shard_stats.default(
        student, indices, logprobs, labels, None, *_sparse_phase_scalars(phase)
    )


def sparse_shard_merge(shard_stats, indices, logprobs, labels, *, tail, store_temperature, **opts):
    """[W, N, 8 + k] statistics in rank order -> (merged [N, 12 + k], hard,
    soft): the row constants, the tail's factor and each kept id's T dD/ds.
    Raises ValueError for a kept id outside [0, V) or repeated within its row,
    or a label outside [0, V) that is not ignore_index (CPU; CUDA: a
    device-side assert)."""
    return torch.ops.kdfused.sparse_shard_merge.default(
        shard_stats,
        indices,
        logprobs,
        labels,
        float(opts["temperature"]),
        float(store_temperature),
        tail,
        float(opts["alpha"]),
        opts["divergence"],
        float(opts["beta"]),
        int(opts["ignore_index"]),
        bool(opts["scale_by_t2"]),
        float(opts["label_smoothing"]),
    )


def sparse_shard_grad(student, indices, logprobs, labels, grad_scale, *, merged, **phase):
    """This shard's gradient [N, V_r] given the merged rows [N, 12 + k]."""
    return torch.ops.kdfused.sparse_shard_grad.default(
        student, indices, logprobs, labels, grad_scale, *_sparse_phase_scalars(phase), merged
    )


_warned_fallback = False


def choose_backend(backend: str, device: torch.device) -> str:
    """Returns "kernel" or "reference" for tensors on this device: "auto" takes
    the compiled kernel where there is one, else the reference with one
    warning; naming a backend that is not built is an error saying how to
    build it."""
    global _warned_fallback
    if backend == "reference":
        return "reference"
    if backend == "auto":
        if has_kernel(device.type):
            return "kernel"
        if device.type == "meta":  # shapes alone: the reference gives them, nothing to build
            return "reference"
        if not _warned_fallback:
            _warned_fallback = True
            why = (
                f"the compiled extension failed to load ({LOAD_ERROR})"
                if LOAD_ERROR is not None
                else f"it was built without a kernel for {device.type} tensors"
            )
            warnings.warn(
                f"kdfused: using the slow pure-PyTorch reference because {why}. "
                "Build it with `pip install --no-build-isolation -e .` (see README).",
                RuntimeWarning,
                stacklevel=4,
            )
        return "reference"
    if device.type != backend:
        raise ValueError(f"backend={backend!r} needs {backend} tensors, got tensors on {device}")
    if not has_kernel(backend):
        how = (
            "install a CUDA build of torch and the CUDA toolkit (or set KDFUSED_FORCE_CUDA=1), "
            "then rebuild with `pip install --no-build-isolation -e .`"
            if backend == "cuda"
            else "build it with `pip install --no-build-isolation -e .`"
        )
        detail = f" (import error: {LOAD_ERROR})" if LOAD_ERROR is not None else ""
        raise RuntimeError(f"kdfused: backend={backend!r} is not built{detail}: {how}")
    return "kernel"


def kernel_dtype_check(name: str, x: torch.Tensor) -> None:
    """The fused kernels' dtypes (the reference takes float64 too)."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; the fused kernels take float32, float16 or "
            "bfloat16 (use backend='reference' for float64)"
        )


# ---- fakes: one per op, each taking exactly its schema's arguments ----------


def _rows(x, n):
    return x.new_empty((n,), dtype=torch.float32)


def _entropy_rows(x, n, wanted):
    """The ops' trailing entropy rows: [N] when asked for, else [0]."""
    return _rows(x, n if wanted else 0)


def _distill_forward_fake(
    student,
    teacher,
    labels,
    grad_scale,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    scale_by_t2,
    compute_grad,
    label_smoothing=0.0,
    student_entropy=False,
):
    n, v = student.shape
    grad = student.new_empty((n, v) if compute_grad else (0,))
    return _rows(student, n), _rows(student, n), grad, _entropy_rows(student, n, student_entropy)


def _distill_forward_out_fake(
    student,
    teacher,
    labels,
    grad_scale,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    scale_by_t2,
    grad,
    label_smoothing=0.0,
    student_entropy=False,
):
    n = student.shape[0]
    return _rows(student, n), _rows(student, n), _entropy_rows(student, n, student_entropy)


def _distill_forward_inplace_fake(
    student,
    teacher,
    labels,
    grad_scale,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    scale_by_t2,
    label_smoothing=0.0,
    student_entropy=False,
):
    n = student.shape[0]
    return _rows(student, n), _rows(student, n), _entropy_rows(student, n, student_entropy)


def _sparse_distill_forward_fake(
    student,
    indices,
    logprobs,
    labels,
    grad_scale,
    temperature,
    store_temperature,
    tail,
    alpha,
    divergence,
    beta,
    ignore_index,
    scale_by_t2,
    compute_grad,
    label_smoothing=0.0,
    offsets=None,
):
    n, v = student.shape
    grad = student.new_empty((n, v) if compute_grad else (0,))
    return _rows(student, n), _rows(student, n), grad


def _sparse_distill_forward_out_fake(
    student,
    indices,
    logprobs,
    labels,
    grad_scale,
    temperature,
    store_temperature,
    tail,
    alpha,
    divergence,
    beta,
    ignore_index,
    scale_by_t2,
    grad,
    label_smoothing=0.0,
    offsets=None,
):
    n = student.shape[0]
    return _rows(student, n), _rows(student, n)


def _sparse_topk_fake(logits, k, temperature):
    n = logits.shape[0]
    return (
        logits.new_empty((n, k), dtype=torch.int64),
        logits.new_empty((n, k), dtype=torch.float32),
    )


def _distill_stats_fake(
    student,
    teacher,
    labels,
    grad_scale,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    scale_by_t2,
    label_smoothing,
    column_offset,
    vocab,
):
    return student.new_empty((student.shape[0], STATS), dtype=torch.float32)


def _distill_jsd_sums_fake(
    student,
    teacher,
    labels,
    grad_scale,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    scale_by_t2,
    label_smoothing,
    column_offset,
    vocab,
    consts,
):
    return student.new_empty((student.shape[0], 2), dtype=torch.float32)


def _distill_grad_fake(
    student,
    teacher,
    labels,
    grad_scale,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    scale_by_t2,
    label_smoothing,
    column_offset,
    vocab,
    consts,
):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _distill_merge_fake(
    shard_stats,
    labels,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    scale_by_t2,
    label_smoothing,
):
    n = shard_stats.shape[1]
    return shard_stats.new_empty((n, CONSTS)), _rows(shard_stats, n), _rows(shard_stats, n)


def _distill_jsd_finish_fake(
    consts, shard_sums, labels, temperature, beta, ignore_index, scale_by_t2
):
    return torch.empty_like(consts), _rows(consts, consts.shape[0])


def _sparse_shard_stats_fake(
    student,
    indices,
    logprobs,
    labels,
    grad_scale,
    temperature,
    store_temperature,
    tail,
    alpha,
    divergence,
    beta,
    ignore_index,
    scale_by_t2,
    label_smoothing,
    column_offset,
    vocab,
):
    n, k = student.shape[0], indices.shape[1]
    return student.new_empty((n, SPARSE_STATS + k), dtype=torch.float32)


def _sparse_shard_merge_fake(
    shard_stats,
    indices,
    logprobs,
    labels,
    temperature,
    store_temperature,
    tail,
    alpha,
    divergence,
    beta,
    ignore_index,
    scale_by_t2,
    label_smoothing,
):
    n, k = shard_stats.shape[1], shard_stats.shape[2] - SPARSE_STATS
    return (
        shard_stats.new_empty((n, SPARSE_CONSTS + k)),
        _rows(shard_stats, n),
        _rows(shard_stats, n),
    )


def _sparse_shard_grad_fake(
    student,
    indices,
    logprobs,
    labels,
    grad_scale,
    temperature,
    store_temperature,
    tail,
    alpha,
    divergence,
    beta,
    ignore_index,
    scale_by_t2,
    label_smoothing,
    column_offset,
    vocab,
    merged,
):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


# The op name -> its fake (kdfused::<name>).
FAKES = {
    "distill_forward": _distill_forward_fake,
    "distill_forward_out": _distill_forward_out_fake,
    "distill_forward_inplace": _distill_forward_inplace_fake,
    "sparse_distill_forward": _sparse_distill_forward_fake,
    "sparse_distill_forward_out": _sparse_distill_forward_out_fake,
    "sparse_topk": _sparse_topk_fake,
    "distill_stats": _distill_stats_fake,
    "distill_jsd_sums": _distill_jsd_sums_fake,
    "distill_grad": _distill_grad_fake,
    "distill_merge": _distill_merge_fake,
    "distill_jsd_finish": _distill_jsd_finish_fake,
    "sparse_shard_stats": _sparse_shard_stats_fake,
    "sparse_shard_merge": _sparse_shard_merge_fake,
    "sparse_shard_grad": _sparse_shard_grad_fake,
}

if LOAD_ERROR is None:
    for _name, _fake in FAKES.items():
        torch.library.register_fake(f"kdfused::{_name}", _fake)
