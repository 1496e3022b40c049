"""The one place where user input is checked (docs/design.md, "Layers").

The public functions validate once, here, and hand the capability modules
validated values: the options as one :class:`LossOptions` (and
:class:`LinearOptions` for the fused-linear loss), the tensors by the checks
below. The reference uses the same checks, so that every backend rejects the
same inputs with the same messages. Value-dependent checks (the label range,
a sparse teacher's ids) are not made before a kernel runs: the kernels make
them inside the op, and the reference makes them itself, so that
torch.compile sees no data-dependent branch.

This module imports nothing of kdfused's: it is the bottom of the package.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TEACHER_VOCABS = ("exact", "truncate")
REDUCTIONS = ("batchmean", "sum", "none")
BACKENDS = ("auto", "cpu", "cuda", "reference")
TAILS = ("ghost", "renormalize")
INDEX_DTYPES = (torch.int32, torch.int64, torch.uint16)
# The temperatures a loss takes (and a sparse teacher's store temperature).
# Above 100 a float32 divergence is a difference of log-probabilities a
# million times its size, wrong in its third digit in PyTorch as in the
# kernels (a KL at T = 1e4 came out negative); below 1e-6, T^2 and the
# divergence's size run toward float32's limits. docs/usage.md says so.
TEMPERATURE_RANGE = (1e-6, 100.0)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _is_real(value) -> bool:
    """A real number, including the symbolic floats and ints of a graph that
    torch.compile traces with dynamic=True."""
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Real | torch.SymFloat | torch.SymInt)


def _check_real(name: str, value):
    """The value as it is (a Python or symbolic number); raises TypeError for
    anything else. Callers compare it with <, ==: never math.isfinite, which a
    symbolic float cannot take."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return value if isinstance(value, torch.SymFloat | torch.SymInt) else float(value)


def _finite(x) -> bool:
    """math.isfinite for Python and symbolic floats (NaN != NaN)."""
    return x == x and x != math.inf and x != -math.inf


def _check_positive(name: str, value, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    x = _check_real(name, value)
    if not (_finite(x) and x > 0):
        none = "None or " if allow_none else ""
        raise ValueError(f"{name} must be {none}finite and > 0, got {value!r}")
    return x


def _check_temperature(name: str, value):
    """A temperature: a real number in TEMPERATURE_RANGE."""
    x = _check_real(name, value)
    low, high = TEMPERATURE_RANGE
    if not (_finite(x) and low <= x <= high):
        raise ValueError(
            f"{name} must lie in [{low:g}, {high:g}], got {value!r}: outside that range float32 "
            "cannot hold the divergence to PyTorch's own accuracy (see docs/usage.md)"
        )
    return x


def _check_int(name: str, value, what: str = "an int") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral | torch.SymInt):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value if isinstance(value, torch.SymInt) else int(value)


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The loss options of every entry point, checked and normalised (floats
    as floats, ints as ints). Made only by :func:`validate_options`."""

    temperature: float
    alpha: float
    divergence: str
    beta: float
    reduction: str
    ignore_index: int
    scale_by_t2: bool
    label_smoothing: float
    backend: str
    teacher_vocab: str
    student_entropy: bool = False  # also return each row's student entropy

    def kernel(self) -> dict:
        """The options the fused kernels take (ops' keyword arguments)."""
        return dict(
            temperature=self.temperature,
            alpha=self.alpha,
            divergence=self.divergence,
            beta=self.beta,
            ignore_index=self.ignore_index,
            scale_by_t2=self.scale_by_t2,
            label_smoothing=self.label_smoothing,
        )

    def loss(self) -> dict:
        """The options the reference's loss functions take (no backend)."""
        return dict(self.kernel(), reduction=self.reduction)


def validate_options(
    *,
    temperature,
    alpha,
    divergence,
    beta,
    reduction,
    ignore_index,
    scale_by_t2,
    backend="auto",
    teacher_vocab="exact",
    label_smoothing=0.0,
    student_entropy=False,
) -> LossOptions:
    """Checks the option values alone (no tensors): raises ValueError or
    TypeError naming the option; returns them as a :class:`LossOptions`."""
    t = _check_temperature("temperature", temperature)
    a = _check_real("alpha", alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    b = _check_real("beta", beta)
    if not 0.0 < b < 1.0:
        raise ValueError(f"beta must lie strictly in (0, 1), got {beta!r}")
    ls = _check_real("label_smoothing", label_smoothing)
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("backend", backend, BACKENDS)
    _check_choice("teacher_vocab", teacher_vocab, TEACHER_VOCABS)
    ii = _check_int("ignore_index", ignore_index)
    for name, flag in (("scale_by_t2", scale_by_t2), ("student_entropy", student_entropy)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    return LossOptions(
        t, a, divergence, b, reduction, ii, scale_by_t2, ls, backend, teacher_vocab, student_entropy
    )


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    """The fused-linear loss's own options, checked (validate_linear_options).

    The logits are ``softcap(logit_scale * (hidden @ weight.T + bias))``."""

    chunk_size: int | None = None
    student_softcap: float | None = None
    teacher_softcap: float | None = None
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0


def validate_linear_options(
    *,
    chunk_size=None,
    student_softcap=None,
    teacher_softcap=None,
    student_logit_scale=1.0,
    teacher_logit_scale=1.0,
) -> LinearOptions:
    """The fused-linear loss's own options (the others: validate_options)."""
    if chunk_size is not None:
        chunk_size = _check_int("chunk_size", chunk_size, "an int or None")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    caps = [
        _check_positive(name, cap, allow_none=True)
        for name, cap in (
            ("student_softcap", student_softcap),
            ("teacher_softcap", teacher_softcap),
        )
    ]
    scales = [
        _check_positive(name, scale)
        for name, scale in (
            ("student_logit_scale", student_logit_scale),
            ("teacher_logit_scale", teacher_logit_scale),
        )
    ]
    return LinearOptions(chunk_size, *caps, *scales)


def _check_floating(name: str, x, *, min_dim: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dims, got a {x.dim()}-d tensor of shape "
            f"{tuple(x.shape)}"
        )


def check_labels(labels, lead: torch.Size, device: torch.device, *, alpha, lead_of: str) -> None:
    """labels: None (then alpha must be 0) or an int64 tensor of shape `lead`."""
    if labels is None:
        if alpha != 0:
            raise ValueError(
                f"labels=None leaves the hard cross-entropy undefined: alpha must be 0, got {alpha}"
            )
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must have dtype torch.int64, got {labels.dtype}")
    if labels.shape != lead:
        raise ValueError(
            f"labels must have shape {tuple(lead)} (the {lead_of}' leading dims), "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels must be on the {lead_of}' device {device}, got {labels.device}")


def _check_teacher_vocab(
    student_vocab: int, teacher_vocab_size: int, teacher_vocab: str, what: str
) -> None:
    """A teacher wider than the student is a padded vocabulary: an error unless
    teacher_vocab="truncate". A narrower one is always an error."""
    if teacher_vocab_size == student_vocab:
        return
    if teacher_vocab_size > student_vocab and teacher_vocab == "truncate":
        return
    hint = (
        f": pass teacher_vocab='truncate' to use the teacher's first {student_vocab} "
        "(e.g. a vocabulary padded for speed)"
        if teacher_vocab_size > student_vocab
        else " (a narrower teacher cannot be truncated)"
    )
    raise ValueError(
        f"student and teacher vocabularies differ: {what}, V = {student_vocab} for the student "
        f"and {teacher_vocab_size} for the teacher{hint}"
    )


def teacher_columns(x: torch.Tensor, vocab: int, dim: int = -1) -> torch.Tensor:
    """The teacher's first `vocab` entries along dim (a view, no copy): its
    logits' columns, or its weight's and bias's rows. Call after the checks."""
    return x if x.shape[dim] == vocab else x.narrow(dim, 0, vocab)


def validate_num_items(num_items_in_batch, reduction: str) -> None:
    """num_items_in_batch: None, an int >= 0 or a 0-d tensor (its value is not
    read: that would cost a CUDA tensor a host sync), with "batchmean" only."""
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.dim() != 0 or num_items_in_batch.is_complex():
            raise ValueError(
                "num_items_in_batch must be an int or a 0-d real tensor, got a tensor of shape "
                f"{tuple(num_items_in_batch.shape)} and dtype {num_items_in_batch.dtype}"
            )
    elif isinstance(num_items_in_batch, bool) or not isinstance(
        num_items_in_batch, numbers.Integral | torch.SymInt
    ):
        raise TypeError(
            "num_items_in_batch must be an int or a 0-d tensor, got "
            f"{type(num_items_in_batch).__name__}"
        )
    elif num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}")
    if reduction != "batchmean":
        raise ValueError(
            "num_items_in_batch replaces the batchmean divisor, so it needs "
            f"reduction='batchmean', got reduction={reduction!r}"
        )


def validate_student_logits(student_logits, *, sharded: bool = False) -> None:
    """Student logits ``[..., V]``, floating point, V > 0 (a shard of a
    vocabulary split over ranks may be empty here: the ranks check that
    together)."""
    _check_floating("student_logits", student_logits)
    if student_logits.shape[-1] == 0 and not sharded:
        raise ValueError(
            f"the vocabulary dim V must be > 0, got logits of shape {tuple(student_logits.shape)}"
        )


def validate_tensors(
    student_logits, teacher_logits, labels, *, alpha, teacher_vocab="exact", sharded=False
) -> None:
    """Checks types, dtypes, shapes and devices of the dense loss's inputs."""
    validate_student_logits(student_logits, sharded=sharded)
    _check_floating("teacher_logits", teacher_logits)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1] or student_logits.dim() != (
        teacher_logits.dim()
    ):
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    _check_teacher_vocab(
        student_logits.shape[-1],
        teacher_logits.shape[-1],
        teacher_vocab,
        f"student_logits {tuple(student_logits.shape)} and teacher_logits "
        f"{tuple(teacher_logits.shape)}",
    )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            "student_logits and teacher_logits must be on the same device, got "
            f"{student_logits.device} and {teacher_logits.device}"
        )
    check_labels(
        labels, student_logits.shape[:-1], student_logits.device, alpha=alpha, lead_of="logits"
    )


def _check_linear(role: str, hidden, weight, bias, *, sharded: bool = False) -> int:
    """One model's hidden states [..., H], weight [V, H] and bias [V] (or None):
    returns V."""
    _check_floating(f"{role}_hidden", hidden)
    _check_floating(f"{role}_weight", weight, min_dim=2)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{role}_weight must have shape [V, {hidden.shape[-1]}] to match {role}_hidden of "
            f"shape {tuple(hidden.shape)}, got {tuple(weight.shape)}"
        )
    if hidden.shape[-1] == 0:
        raise ValueError(
            f"the hidden size must be > 0, got {role}_hidden of shape {tuple(hidden.shape)}"
        )
    if weight.shape[0] == 0 and not sharded:
        raise ValueError(
            f"the vocabulary dim V must be > 0, got {role}_weight {tuple(weight.shape)}"
        )
    tensors = [(f"{role}_hidden", hidden), (f"{role}_weight", weight)]
    if bias is not None:
        _check_floating(f"{role}_bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"{role}_bias must have shape ({weight.shape[0]},) to match {role}_weight of "
                f"shape {tuple(weight.shape)}, got {tuple(bias.shape)}"
            )
        tensors.append((f"{role}_bias", bias))
    # torch's matmul takes one dtype: the unfused model would have failed too.
    if len({x.dtype for _, x in tensors}) > 1:
        got = ", ".join(f"{name} {x.dtype}" for name, x in tensors)
        raise TypeError(
            f"the {role}'s hidden states, weight and bias must share a dtype, got {got}"
        )
    return weight.shape[0]


def validate_linear_tensors(
    student_hidden,
    student_weight,
    labels,
    *,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    teacher_logits,
    sparse_teacher,
    alpha,
    teacher_vocab="exact",
    sharded=False,
) -> None:
    """Checks the fused-linear loss's inputs (docs/design.md, "The fused-linear loss"):
    shapes, dtypes, devices, and that the teacher comes from exactly one
    source: hidden states + weight, dense logits, or a sparse teacher (whose
    own checks are validate_sparse_teacher's)."""
    vocab = _check_linear("student", student_hidden, student_weight, student_bias, sharded=sharded)
    lead = student_hidden.shape[:-1]
    hidden_given = teacher_hidden is not None or teacher_weight is not None
    sources = [
        name
        for name, given in (
            ("teacher_hidden + teacher_weight", hidden_given),
            ("teacher_logits", teacher_logits is not None),
            ("a SparseTeacher", sparse_teacher is not None),
        )
        if given
    ]
    if len(sources) > 1:
        raise ValueError(
            "the teacher comes from one source: teacher_hidden + teacher_weight, "
            f"teacher_logits, or a SparseTeacher; got {' and '.join(sources)}"
        )
    if not sources:
        raise ValueError(
            "no teacher given: pass teacher_hidden + teacher_weight (+ teacher_bias), "
            "teacher_logits, or a SparseTeacher"
        )
    if hidden_given and (teacher_hidden is None or teacher_weight is None):
        missing = "teacher_weight" if teacher_weight is None else "teacher_hidden"
        raise ValueError(f"teacher_hidden and teacher_weight go together: {missing} is missing")
    if teacher_bias is not None and not hidden_given:
        raise ValueError(
            "teacher_bias goes with teacher_hidden + teacher_weight, not teacher_logits"
        )
    tensors = [("student_hidden", student_hidden), ("student_weight", student_weight)]
    if student_bias is not None:
        tensors.append(("student_bias", student_bias))
    if hidden_given:
        t_vocab = _check_linear(
            "teacher", teacher_hidden, teacher_weight, teacher_bias, sharded=sharded
        )
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(
                f"teacher_hidden must have the leading dims {tuple(lead)} of student_hidden "
                f"{tuple(student_hidden.shape)}, got {tuple(teacher_hidden.shape)}"
            )
        _check_teacher_vocab(
            vocab,
            t_vocab,
            teacher_vocab,
            f"student_weight {tuple(student_weight.shape)} and teacher_weight "
            f"{tuple(teacher_weight.shape)}",
        )
        tensors += [("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)]
        if teacher_bias is not None:
            tensors.append(("teacher_bias", teacher_bias))
    elif teacher_logits is not None:
        _check_floating("teacher_logits", teacher_logits)
        if teacher_logits.shape[:-1] != lead:
            raise ValueError(
                f"teacher_logits must have shape {(*lead, vocab)} (student_hidden's leading dims, "
                f"V = {vocab} from student_weight), got {tuple(teacher_logits.shape)}"
            )
        _check_teacher_vocab(
            vocab,
            teacher_logits.shape[-1],
            teacher_vocab,
            f"student_weight {tuple(student_weight.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)}",
        )
        tensors.append(("teacher_logits", teacher_logits))
    device = student_hidden.device
    for name, x in tensors:
        if x.device != device:
            raise ValueError(
                f"every input must be on one device: student_hidden is on {device}, "
                f"{name} on {x.device}"
            )
    check_labels(labels, lead, device, alpha=alpha, lead_of="hidden states")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raises for a label outside [0, V) that is not ignore_index (eager only;
    meta tensors hold no values to check)."""
    if labels.device.type == "meta":
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels{list(idx)} = {int(labels[idx])} is outside [0, V) with V = {vocab} "
            f"and is not ignore_index = {ignore_index}"
        )


def validate_sparse_fields(indices, logprobs, tail, store_temperature, offsets=None) -> float:
    """A sparse teacher's own fields (docs/design.md, "The sparse teacher"):
    padded ``indices`` and ``logprobs`` of one shape ``[..., k]`` with
    k >= 1, or ragged ``[total]`` with ``offsets [N + 1]``; on one device; the
    tail rule and the store temperature (returned as a float). The offsets'
    values are checked in eager mode (a graph that torch.compile traces
    leaves that to the kernels)."""
    ragged = offsets is not None
    if not isinstance(indices, torch.Tensor) or indices.dtype not in INDEX_DTYPES:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"indices must be an int32, int64 or uint16 tensor, got {got}")
    if indices.dtype == torch.uint16 and not ragged:
        raise TypeError(
            "uint16 ids have no -1 to pad a row with: they take the ragged layout (offsets=)"
        )
    _check_floating("logprobs", logprobs)
    if indices.shape != logprobs.shape:
        what = "[total]" if ragged else "[..., k]"
        raise ValueError(
            f"indices and logprobs must have the same shape {what}, got "
            f"{tuple(indices.shape)} and {tuple(logprobs.shape)}"
        )
    if indices.device != logprobs.device:
        raise ValueError(
            "indices and logprobs must be on one device, got "
            f"{indices.device} and {logprobs.device}"
        )
    if ragged:
        _check_offsets(offsets, indices)
    else:
        if indices.dim() < 1:
            raise ValueError("indices and logprobs must have a last dim k, got 0-d tensors")
        if indices.shape[-1] == 0:
            raise ValueError(
                "a sparse teacher keeps k >= 1 entries per row (pad a row that keeps fewer with "
                f"id -1), got indices of shape {tuple(indices.shape)}"
            )
    _check_choice("tail", tail, TAILS)
    return float(_check_temperature("store_temperature", store_temperature))


def _check_offsets(offsets, indices) -> None:
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64:
        got = offsets.dtype if isinstance(offsets, torch.Tensor) else type(offsets).__name__
        raise TypeError(f"offsets must be an int64 tensor, got {got}")
    if indices.dim() != 1 or offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(
            "ragged rows take 1-d indices and logprobs [total] and offsets [N + 1], got "
            f"indices {tuple(indices.shape)} and offsets {tuple(offsets.shape)}"
        )
    if offsets.device != indices.device:
        raise ValueError(
            f"offsets must be on the ids' device {indices.device}, got {offsets.device}"
        )
    if torch.compiler.is_compiling():
        return
    steps = offsets[1:] - offsets[:-1]
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != indices.shape[0] or bool((steps < 0).any()):
        raise ValueError(
            "offsets must start at 0, never decrease, and end at the number of entries "
            f"{indices.shape[0]}; got offsets[0] = {first}, offsets[-1] = {last}"
            + (", and a decrease" if bool((steps < 0).any()) else "")
        )


def validate_sparse_teacher(lead: torch.Size, device, teacher, *, divergence, teacher_vocab, what):
    """A sparse teacher against the student it teaches: its rows are the
    student's ``lead`` dims (ragged rows: as many as the flattened dims), on
    its device; renormalize takes forward_kl only."""
    if teacher.ragged and len(teacher) != lead.numel():
        raise ValueError(
            f"the sparse teacher's {len(teacher)} ragged rows must be the {lead.numel()} "
            f"positions (leading dims {tuple(lead)}) of {what}"
        )
    if not teacher.ragged and teacher.shape != lead:
        raise ValueError(
            f"the sparse teacher's indices {tuple(teacher.indices.shape)} must have the "
            f"leading dims {tuple(lead)} of {what}"
        )
    if teacher.device != device:
        raise ValueError(
            f"the sparse teacher must be on the student's device {device}, got {teacher.device}"
        )
    if teacher.tail == "renormalize" and divergence != "forward_kl":
        raise ValueError(
            "tail='renormalize' keeps only the stored ids' weights, so it is defined for "
            f"divergence='forward_kl' only (docs/design.md), got {divergence!r}; "
            "use tail='ghost' for the other divergences"
        )
    if teacher_vocab != "exact":
        raise ValueError(
            "teacher_vocab applies to dense teacher logits; a sparse teacher's ids must lie in "
            "the student's vocabulary [0, V)"
        )


def check_sparse_indices(indices: torch.Tensor, vocab: int) -> None:
    """Raises for a kept id outside [0, V) (-1 pads) or repeated within its row
    (eager only; the kernels check inside the op)."""
    idx = indices.reshape(-1, indices.shape[-1]).to(torch.int64)
    bad = (idx != -1) & ((idx < 0) | (idx >= vocab))
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"sparse teacher indices[{i}, {j}] = {int(idx[i, j])} is outside [0, V) with "
            f"V = {vocab} (-1 pads a row)"
        )
    ordered, _ = idx.sort(dim=-1)
    repeat = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != -1)
    if bool(repeat.any()):
        i, j = (int(x) for x in repeat.nonzero()[0])
        raise ValueError(
            f"sparse teacher row {i} keeps id {int(ordered[i, j + 1])} twice: a row's kept ids "
            "must be distinct"
        )
