"""What every capability's autograd.Function shares: the batchmean divisor,
combining and reducing the per-row terms, the backward that scales a
gradient formed in forward, and the result handed back to the user.

Above ops and _types, below the capability modules (docs/design.md, "Layers").
"""

from __future__ import annotations

import torch

from ._types import DistillLossOutput


def counted_rows(labels, n: int, ignore_index: int, device, num_items=None) -> torch.Tensor:
    """The batchmean divisor, as a float32 tensor (no host sync): the rows that
    count, or num_items_in_batch when given (an int or a 0-d tensor: the
    Hugging Face Trainer's count over a whole accumulated batch); at least 1."""
    if num_items is not None:
        count = torch.as_tensor(num_items, device=device).to(torch.float32)
    elif labels is None:
        count = torch.full((), n, dtype=torch.float32, device=device)
    else:
        count = (labels != ignore_index).sum().to(torch.float32)
    return count.clamp(min=1)


def grad_scale_of(reduction: str, denom: torch.Tensor) -> torch.Tensor | None:
    """The row weight the kernels fold into the gradient: 1 / denom for
    batchmean, none (1) for sum and none."""
    return denom.reciprocal() if reduction == "batchmean" else None


def reduce_rows(x, reduction: str, denom):
    """Per-row values reduced as the loss is ("none": as they are)."""
    if reduction == "none":
        return x
    return x.sum() if reduction == "sum" else x.sum() / denom


def combine_and_reduce(hard, soft, alpha: float, reduction: str, denom):
    """(loss, hard, soft) from the per-row terms: loss_i = alpha hard_i +
    (1 - alpha) soft_i, each reduced ("none": as they are)."""
    # A term whose weight is 0 contributes 0, even where it is inf. (Clones:
    # loss must not be the same tensor as a non-differentiable component.)
    if alpha == 0:
        rows = soft.clone()
    elif alpha == 1:
        rows = hard.clone()
    else:
        rows = alpha * hard + (1 - alpha) * soft

    return tuple(reduce_rows(x, reduction, denom) for x in (rows, hard, soft))


def upstream_is_one(grad_loss: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether backward may hand back the gradient saved by forward as it is.

    The usual loss.backward() passes 1: the saved gradient is the answer and
    no pass over it is spent. (Autograd may then keep that very buffer as a
    leaf's .grad; a later backward through a retained graph after .grad was
    changed in place is refused by autograd's version check, never silently
    wrong.) On CUDA the test costs one host sync, as Liger-Kernel's does. No
    data-dependent branch inside a compiled graph or a CUDA graph capture
    (reading grad_loss there is not allowed): there the answer is False.
    """
    if torch.compiler.is_compiling() or (grad.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    return bool(grad_loss == 1)


def refuse_double_backward() -> None:
    """Backward with create_graph=True (grad mode on inside backward) would
    build a graph of the gradient formed in forward, a constant: a second
    derivative through it would silently lack its terms. Refused instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "kdfused: the loss cannot be differentiated twice (backward with "
            "create_graph=True): its gradient is formed in the forward pass as a constant. "
            "For higher-order gradients use the pure-PyTorch kdfused.reference losses."
        )


def scaled(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad times the upstream gradient (a scalar, or one value per row of
    grad), formed in float32 and rounded to grad's dtype once: the scale is
    shaped [N, 1] or [1, 1] (a 0-d float32 scale would be rounded to a
    16-bit grad's dtype first)."""
    scale = grad_loss.reshape(-1, *([1] * (grad.dim() - 1)))
    if torch.compiler.is_compiling():
        return (grad * scale).to(grad.dtype)
    return torch.mul(grad, scale, out=torch.empty_like(grad))


def none_after(ctx, grads: tuple) -> tuple:
    """The backward's result: the given gradients of the first inputs, then
    None for every other input of forward."""
    return tuple(grads) + (None,) * (len(ctx.needs_input_grad) - len(grads))


def scaled_saved(ctx, grad_loss, grads: tuple) -> tuple:
    """Backward of a loss whose gradients (reduced, for grad_output 1) were
    formed in forward: them as they are for grad_output 1, else scaled."""
    present = [g for g in grads if g is not None]
    if present and not upstream_is_one(grad_loss, present[0]):
        grads = tuple(None if g is None else scaled(g, grad_loss) for g in grads)
    return none_after(ctx, grads)


def finish_outputs(ctx, hard, soft, entropy, alpha, reduction, denom):
    """The autograd functions' outputs: (loss, hard, soft, entropy) reduced,
    the last three not differentiable; entropy ([N] rows, or None when not
    asked for) comes back as an empty tensor when absent (an output must be a
    tensor)."""
    loss, hard, soft = combine_and_reduce(hard, soft, alpha, reduction, denom)
    entropy = hard.new_empty(0) if entropy is None else reduce_rows(entropy, reduction, denom)
    ctx.mark_non_differentiable(hard, soft, entropy)
    return loss, hard, soft, entropy


def entropy_or_none(outputs: tuple, wanted: bool) -> tuple:
    """(loss, hard, soft, entropy), entropy None when it was not asked for."""
    loss, hard, soft, entropy = outputs
    return loss, hard, soft, (entropy if wanted else None)


class SavedGradientFunction(torch.autograd.Function):
    """What the logits losses' autograd functions share: forward runs a fused
    kernel that also writes the student gradient of the reduced loss, and
    hands it to finish(); backward only scales that saved gradient by
    grad_output (and returns None for every other input)."""

    @staticmethod
    def finish(ctx, hard, soft, grad, alpha, reduction, denom, entropy=None):
        """(loss, hard, soft, entropy) reduced, with grad saved for backward."""
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        return finish_outputs(ctx, hard, soft, entropy, alpha, reduction, denom)

    @staticmethod
    def backward(ctx, grad_loss, _grad_hard, _grad_soft, _grad_entropy):
        refuse_double_backward()
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":  # one upstream value per row: always scaled
            return none_after(ctx, (scaled(grad, grad_loss),))
        return scaled_saved(ctx, grad_loss, (grad,))


def package(loss, hard, soft, entropy, lead: torch.Size, reduction: str, return_components: bool):
    """The public functions' result: per-row terms in the input's leading
    shape for reduction="none"; the loss, or all three as a
    DistillLossOutput (with its student_entropy when there is one)."""
    if reduction == "none":
        loss, hard, soft = loss.reshape(lead), hard.reshape(lead), soft.reshape(lead)
        entropy = None if entropy is None else entropy.reshape(lead)
    if not return_components and entropy is None:
        return loss
    out = DistillLossOutput(loss, hard, soft)
    out.student_entropy = entropy
    return out
