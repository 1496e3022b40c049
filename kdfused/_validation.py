"""The one place where user input is checked (DESIGN.md section 2).

Used by the functional API and by the reference, so that every backend rejects
the same inputs with the same messages. Value-dependent checks (the label
range) are not here: the kernels do them inside the op, and the reference
checks them itself, so that torch.compile sees no data-dependent branch.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._types import SparseTeacher

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TEACHER_VOCABS = ("exact", "truncate")
REDUCTIONS = ("batchmean", "sum", "none")
BACKENDS = ("auto", "cpu", "cuda", "reference")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def validate_options(
    *,
    temperature,
    alpha,
    divergence,
    beta,
    reduction,
    ignore_index,
    scale_by_t2,
    backend,
    teacher_vocab="exact",
    label_smoothing=0.0,
) -> None:
    """Checks the option values alone (no tensors): raises ValueError/TypeError."""
    t = _check_real("temperature", temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
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
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(scale_by_t2, bool):
        raise TypeError(f"scale_by_t2 must be a bool, got {type(scale_by_t2).__name__}")


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


def _check_labels(labels, lead: torch.Size, device: torch.device, *, alpha, lead_of: str) -> None:
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
        num_items_in_batch, numbers.Integral
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


def validate_tensors(
    student_logits, teacher_logits, labels, *, alpha, teacher_vocab="exact", sharded=False
) -> None:
    """Checks types, dtypes, shapes and devices of the inputs."""
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        _check_floating(name, x)
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
    if student_logits.shape[-1] == 0 and not sharded:  # a shard: checked with the others'
        raise ValueError(
            f"the vocabulary dim V must be > 0, got logits of shape {tuple(student_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            "student_logits and teacher_logits must be on the same device, got "
            f"{student_logits.device} and {teacher_logits.device}"
        )
    _check_labels(
        labels, student_logits.shape[:-1], student_logits.device, alpha=alpha, lead_of="logits"
    )


def _check_linear(role: str, hidden, weight, bias) -> int:
    """One model's hidden states [..., H], weight [V, H] and bias [V] (or None):
    returns V."""
    _check_floating(f"{role}_hidden", hidden)
    _check_floating(f"{role}_weight", weight, min_dim=2)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{role}_weight must have shape [V, {hidden.shape[-1]}] to match {role}_hidden of "
            f"shape {tuple(hidden.shape)}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
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
    alpha,
    teacher_vocab="exact",
) -> None:
    """Checks the fused-linear loss's inputs (DESIGN.md section 5): shapes,
    dtypes, devices, and that the teacher comes from exactly one source."""
    vocab = _check_linear("student", student_hidden, student_weight, student_bias)
    lead = student_hidden.shape[:-1]
    hidden_given = teacher_hidden is not None or teacher_weight is not None
    if hidden_given and teacher_logits is not None:
        raise ValueError(
            "the teacher comes from one source: teacher_hidden + teacher_weight, or "
            "teacher_logits, not both"
        )
    if not hidden_given and teacher_logits is None:
        raise ValueError(
            "no teacher given: pass teacher_hidden + teacher_weight (+ teacher_bias), "
            "or teacher_logits"
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
        t_vocab = _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
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
    elif isinstance(teacher_logits, SparseTeacher):
        pass  # validate_sparse_teacher checks it against the student
    else:
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
    _check_labels(labels, lead, device, alpha=alpha, lead_of="hidden states")


def validate_linear_options(*, chunk_size, student_softcap, teacher_softcap) -> None:
    """The fused-linear loss's own options (the others: validate_options)."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
    ):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for name, cap in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if cap is None:
            continue
        c = _check_real(name, cap)
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"{name} must be None or finite and > 0, got {cap!r}")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raises for a label outside [0, V) that is not ignore_index (eager only)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels{list(idx)} = {int(labels[idx])} is outside [0, V) with V = {vocab} "
            f"and is not ignore_index = {ignore_index}"
        )


TAILS = ("ghost", "renormalize")
INDEX_DTYPES = (torch.int32, torch.int64)


def validate_sparse_fields(indices, logprobs, tail, store_temperature) -> None:
    """A sparse teacher's own fields (DESIGN.md section 6): ``indices`` and
    ``logprobs`` of one shape ``[..., k]`` on one device, the tail rule and the
    store temperature."""
    if not isinstance(indices, torch.Tensor) or indices.dtype not in INDEX_DTYPES:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"indices must be an int32 or int64 tensor, got {got}")
    _check_floating("logprobs", logprobs)
    if indices.shape != logprobs.shape:
        raise ValueError(
            "indices and logprobs must have the same shape [..., k], got "
            f"{tuple(indices.shape)} and {tuple(logprobs.shape)}"
        )
    if indices.dim() < 1:
        raise ValueError("indices and logprobs must have a last dim k, got 0-d tensors")
    if indices.device != logprobs.device:
        raise ValueError(
            "indices and logprobs must be on one device, got "
            f"{indices.device} and {logprobs.device}"
        )
    _check_choice("tail", tail, TAILS)
    ts = _check_real("store_temperature", store_temperature)
    if not (math.isfinite(ts) and ts > 0):
        raise ValueError(f"store_temperature must be finite and > 0, got {store_temperature!r}")


def validate_sparse_teacher(lead: torch.Size, device, teacher, *, divergence, teacher_vocab, what):
    """A sparse teacher against the student it teaches: its rows are the
    student's ``lead`` dims, on its device; renormalize takes forward_kl only."""
    if teacher.indices.shape[:-1] != lead:
        raise ValueError(
            f"the sparse teacher's indices {tuple(teacher.indices.shape)} must have the "
            f"leading dims {tuple(lead)} of {what}"
        )
    if teacher.indices.device != device:
        raise ValueError(
            f"the sparse teacher must be on the student's device {device}, got "
            f"{teacher.indices.device}"
        )
    if teacher.tail == "renormalize" and divergence != "forward_kl":
        raise ValueError(
            "tail='renormalize' keeps only the stored ids' weights, so it is defined for "
            f"divergence='forward_kl' only (DESIGN.md section 6), got {divergence!r}; "
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
