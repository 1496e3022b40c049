"""Thin typed wrappers over torch.ops.kdfused.*, and their fake implementations.

Importing this module loads the compiled library ``kdfused._C`` if it was built
(its static initialisers register the ``kdfused`` op namespace) and registers
the fake (meta) kernels torch.compile needs to trace the ops without running them.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.kdfused)

    LOAD_ERROR: ImportError | None = None
except ImportError as err:  # not built: functional falls back to the reference
    LOAD_ERROR = err

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The CUDA top-k kernel's largest k (kMaxTopk in csrc/cuda/sparse_kernel.cuh).
CUDA_TOPK_MAX_K = 2048

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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs the fused kernel on [N, V] logits and [N] labels.

    Returns ``(hard_rows, soft_rows, grad)``: float32 [N] per-row hard and soft
    terms (0 at ignored rows) and, if ``compute_grad``, the student gradient
    ``grad_scale * d loss_i / d s_i`` in the student's dtype (else a [0] tensor).
    Raises ValueError for a label outside [0, V) that is not ``ignore_index``.
    """
    scalars = _loss_scalars(temperature, alpha, divergence, beta, ignore_index, scale_by_t2)
    return torch.ops.kdfused.distill_forward.default(
        student, teacher, labels, grad_scale, *scalars, bool(compute_grad), float(label_smoothing)
    )


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """distill_forward with the gradient written into `grad` (a contiguous
    [N, V] tensor of the student's dtype, e.g. a buffer reused chunk after
    chunk); returns ``(hard_rows, soft_rows)``."""
    scalars = _loss_scalars(temperature, alpha, divergence, beta, ignore_index, scale_by_t2)
    return torch.ops.kdfused.distill_forward_out.default(
        student, teacher, labels, grad_scale, *scalars, grad, float(label_smoothing)
    )


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """distill_forward with the (contiguous) student logits overwritten by
    their gradient (devices in INPLACE_DEVICES); returns ``(hard_rows,
    soft_rows)``."""
    scalars = _loss_scalars(temperature, alpha, divergence, beta, ignore_index, scale_by_t2)
    return torch.ops.kdfused.distill_forward_inplace.default(
        student, teacher, labels, grad_scale, *scalars, float(label_smoothing)
    )


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
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse-teacher kernel on [N, V] student logits and an [N, k]
    teacher (options: temperature, store_temperature, tail, alpha, divergence,
    beta, ignore_index, scale_by_t2). Returns ``(hard_rows, soft_rows, grad)``
    as :func:`distill_forward`. Raises ValueError for a kept id outside
    [0, V) or repeated within its row (CPU; CUDA: a device-side assert)."""
    return torch.ops.kdfused.sparse_distill_forward.default(
        student,
        indices,
        logprobs,
        labels,
        grad_scale,
        *_sparse_scalars(**options),
        bool(compute_grad),
        float(label_smoothing),
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


if LOAD_ERROR is None:

    @torch.library.register_fake("kdfused::distill_forward")
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
    ):
        n, v = student.shape
        hard = student.new_empty((n,), dtype=torch.float32)
        soft = student.new_empty((n,), dtype=torch.float32)
        grad = student.new_empty((n, v) if compute_grad else (0,))
        return hard, soft, grad

    def _loss_rows_fake(student, *_):
        """distill_forward_out and distill_forward_inplace: the two [N] float32
        row tensors (the gradient goes into a tensor the caller has)."""
        n = student.shape[0]
        rows = student.new_empty((n,), dtype=torch.float32)
        return rows, torch.empty_like(rows)

    torch.library.register_fake("kdfused::distill_forward_out", _loss_rows_fake)
    torch.library.register_fake("kdfused::distill_forward_inplace", _loss_rows_fake)

    @torch.library.register_fake("kdfused::sparse_distill_forward")
    def _sparse_forward_fake(student, indices, logprobs, labels, grad_scale, *args):
        n, v = student.shape
        compute_grad = args[8]
        rows = student.new_empty((n,), dtype=torch.float32)
        grad = student.new_empty((n, v) if compute_grad else (0,))
        return rows, torch.empty_like(rows), grad

    torch.library.register_fake("kdfused::sparse_distill_forward_out", _loss_rows_fake)

    @torch.library.register_fake("kdfused::sparse_topk")
    def _sparse_topk_fake(logits, k, temperature):
        n = logits.shape[0]
        return (
            logits.new_empty((n, k), dtype=torch.int64),
            logits.new_empty((n, k), dtype=torch.float32),
        )

    @torch.library.register_fake("kdfused::distill_stats")
    def _stats_fake(student, *_):
        return student.new_empty((student.shape[0], 12), dtype=torch.float32)

    @torch.library.register_fake("kdfused::distill_jsd_sums")
    def _jsd_sums_fake(student, *_):
        return student.new_empty((student.shape[0], 2), dtype=torch.float32)

    @torch.library.register_fake("kdfused::distill_grad")
    def _grad_fake(student, *_):
        return torch.empty_like(student, memory_format=torch.contiguous_format)

    @torch.library.register_fake("kdfused::distill_merge")
    def _merge_fake(shard_stats, *_):
        n = shard_stats.shape[1]
        rows = shard_stats.new_empty((n,))
        return shard_stats.new_empty((n, 11)), rows, torch.empty_like(rows)

    @torch.library.register_fake("kdfused::distill_jsd_finish")
    def _jsd_finish_fake(consts, *_):
        return torch.empty_like(consts), consts.new_empty((consts.shape[0],))
