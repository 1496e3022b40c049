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

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
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
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("backend", backend, BACKENDS)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(scale_by_t2, bool):
        raise TypeError(f"scale_by_t2 must be a bool, got {type(scale_by_t2).__name__}")


def validate_tensors(student_logits, teacher_logits, labels, *, alpha) -> None:
    """Checks types, dtypes, shapes and devices of the inputs."""
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0:
            raise ValueError(f"{name} must have shape [..., V], got a 0-d tensor")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[-1] == 0:
        raise ValueError(
            f"the vocabulary dim V must be > 0, got logits of shape {tuple(student_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            "student_logits and teacher_logits must be on the same device, got "
            f"{student_logits.device} and {teacher_logits.device}"
        )
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
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(student_logits.shape[:-1])} (the logits' leading "
            f"dims), got {tuple(labels.shape)}"
        )
    if labels.device != student_logits.device:
        raise ValueError(
            f"labels must be on the logits' device {student_logits.device}, got {labels.device}"
        )


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raises for a label outside [0, V) that is not ignore_index (eager only)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels{list(idx)} = {int(labels[idx])} is outside [0, V) with V = {vocab} "
            f"and is not ignore_index = {ignore_index}"
        )
