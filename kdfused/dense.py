"""The dense capability: student logits against dense teacher logits, both
``[N, V]``, in one call of the fused kernel (docs/design.md, "The loss").

Called by the public functions with validated inputs; nothing here checks
user input again.
"""

from __future__ import annotations

import torch

from . import ops
from ._autograd import SavedGradientFunction, counted_rows, entropy_or_none, grad_scale_of
from ._validation import LossOptions


class _DenseDistillFunction(SavedGradientFunction):
    """Forward runs distill_forward, which writes the loss rows and the
    student gradient of the reduced loss together."""

    @staticmethod
    def forward(ctx, student, teacher, labels, opts: LossOptions, num_items, compute_grad):
        denom = counted_rows(labels, student.shape[0], opts.ignore_index, student.device, num_items)
        hard, soft, grad, *entropy = ops.distill_forward(
            student,
            teacher,
            labels,
            grad_scale_of(opts.reduction, denom),
            **opts.kernel(),
            compute_grad=compute_grad,
            student_entropy=opts.student_entropy,
        )
        return SavedGradientFunction.finish(
            ctx, hard, soft, grad, opts.alpha, opts.reduction, denom, *entropy
        )


def dense_loss(student, teacher, labels, opts: LossOptions, num_items_in_batch):
    """(loss, hard, soft, entropy) of ``[N, V]`` student and teacher logits
    and ``[N]`` labels (or None), reduced as opts says ("none": ``[N]``
    rows); entropy None unless opts.student_entropy."""
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    outputs = _DenseDistillFunction.apply(
        student, teacher.detach(), labels, opts, num_items_in_batch, compute_grad
    )
    return entropy_or_none(outputs, opts.student_entropy)
