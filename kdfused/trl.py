"""kdfused in TRL (docs/usage.md, "Trainers"): :class:`DistillationTrainer`,
TRL's on-policy ``DistillationTrainer`` with its divergence computed by
kdfused's fused-linear kernel.

Everything else is TRL's: the config (``trl.DistillationConfig``), the
student's generations, the micro-batches and their ``num_items_in_batch``,
the metrics. TRL's objective maps onto kdfused's options as: ``beta`` 0 ->
``divergence="forward_kl"``, 1 -> ``"reverse_kl"``, else ``"jsd"`` with that
beta; TRL's ``temperature``, no T^2 (``scale_by_t2=False``), no hard term
(``alpha=0``); the lm_heads' biases, logit scales and softcaps as the models'
configs give them (:func:`kdfused.hf.lm_head`); the sum over the completion
tokens divided by TRL's ``num_items_in_batch`` (or, in evaluation, by the
micro-batch's token count). The student entropy TRL logs comes out of the
same kernel pass. It also takes what TRL refuses: a teacher whose vocabulary
is padded wider than the student's (``teacher_vocab="truncate"``).

Needs ``pip install 'kdfused[trl]'`` (trl >= 1.16).
"""

from __future__ import annotations

import contextlib

import torch

from . import fused_linear_distill_loss
from .hf import lm_head

try:
    import trl
except ImportError as err:  # an optional dependency: this module's alone
    raise ImportError("kdfused.trl needs trl: pip install 'kdfused[trl]' (trl >= 1.16)") from err


def divergence_of(beta: float) -> dict:
    """kdfused's divergence options for TRL's generalized-JSD beta."""
    if beta == 0.0:
        return dict(divergence="forward_kl")
    if beta == 1.0:
        return dict(divergence="reverse_kl")
    return dict(divergence="jsd", beta=float(beta))


@contextlib.contextmanager
def _vocab_size_as(model, vocab_size: int):
    """The model's (text) config reports vocab_size while inside: lets TRL's
    equal-vocabulary check pass a teacher padded wider, whose extra columns
    the loss then drops (teacher_vocab="truncate")."""
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    saved = config.vocab_size
    config.vocab_size = vocab_size
    try:
        yield
    finally:
        config.vocab_size = saved


class DistillationTrainer(trl.DistillationTrainer):
    """``trl.DistillationTrainer`` with the divergence of its ``_compute_loss``
    run through kdfused's fused-linear kernel: the same arguments and config,
    plus ``teacher_vocab`` (``"exact"``, TRL's rule, or ``"truncate"``: a
    teacher whose lm_head has more rows than the student's, a vocabulary
    padded for speed, gives the loss its first V rows) and ``chunk_size``
    (kdfused's rows per chunk; None: its memory budget)."""

    def __init__(
        self, *args, teacher_vocab: str = "exact", chunk_size: int | None = None, **kwargs
    ):
        if teacher_vocab not in ("exact", "truncate"):
            raise ValueError(f"teacher_vocab must be 'exact' or 'truncate', got {teacher_vocab!r}")
        self.teacher_vocab = teacher_vocab
        self.chunk_size = chunk_size
        model = kwargs.get("model", args[0] if args else None)
        teacher = kwargs.get("teacher_model", args[1] if len(args) > 1 else None)
        padded = (
            teacher_vocab == "truncate"
            and isinstance(model, torch.nn.Module)
            and isinstance(teacher, torch.nn.Module)
        )
        if padded:
            student_vocab = lm_head(model).weight.shape[0]
            teacher_rows = lm_head(teacher).weight.shape[0]
            if teacher_rows < student_vocab:
                raise ValueError(
                    f"teacher_vocab='truncate' takes a teacher wider than the student; the "
                    f"teacher's lm_head has {teacher_rows} rows, the student's {student_vocab}"
                )
            with _vocab_size_as(teacher, model.config.get_text_config().vocab_size):
                super().__init__(*args, **kwargs)
        else:
            super().__init__(*args, **kwargs)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """(loss, the completion tokens' summed student entropy, their count),
        what TRL's own _compute_loss returns, through kdfused."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        student_hidden = self._get_last_hidden_state(
            unwrapped_student, input_ids, attention_mask, keep
        )
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                self._get_last_hidden_state,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                keep,
            )
        s_head, t_head = lm_head(unwrapped_student), lm_head(unwrapped_teacher)
        device = s_head.weight.device
        # Only the completion tokens that count: the others' logits are never formed.
        valid = mask.reshape(-1).to(device) != 0
        h_s = student_hidden.reshape(-1, student_hidden.shape[-1]).to(device)[valid]
        h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(device)[valid]
        n_valid = valid.sum()
        out = fused_linear_distill_loss(
            h_s,
            s_head.weight,
            None,
            student_bias=s_head.bias,
            teacher_hidden=h_t,
            teacher_weight=t_head.weight,
            teacher_bias=t_head.bias,
            student_softcap=s_head.softcap,
            teacher_softcap=t_head.softcap,
            student_logit_scale=s_head.logit_scale,
            teacher_logit_scale=t_head.logit_scale,
            temperature=self.temperature,
            alpha=0.0,
            scale_by_t2=False,
            reduction="sum",
            teacher_vocab=self.teacher_vocab,
            chunk_size=self.chunk_size,
            return_components=True,
            student_entropy=True,
            **divergence_of(self.beta),
        )
        if num_items_in_batch is None:
            loss = out.loss / n_valid.clamp(min=1)
        else:
            loss = out.loss / torch.as_tensor(num_items_in_batch, device=device)
        return loss, out.student_entropy.detach(), n_valid
