"""kdfused in the Hugging Face Trainer (docs/usage.md, "Trainers").

- :func:`lm_head`: a causal LM's output head as the fused-linear loss needs it
  (weight, bias, softcap, logit scale), read from the model and its config as
  the model forms its logits.
- :class:`DistillationTrainer`: a ``transformers.Trainer`` for off-policy
  distillation on a dataset of token windows, from a live teacher model or a
  stored top-k teacher (:class:`kdfused.sparse.SparseStore`), through
  :class:`kdfused.FusedLinearDistillLoss`: the student's logits are never held
  whole.

Needs ``pip install 'kdfused[hf]'`` (transformers, accelerate, datasets).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from . import SparseTeacher, fused_linear_distill_loss
from .loss import FusedLinearDistillLoss
from .sparse_store import SparseStore

try:
    import transformers
except ImportError as err:  # an optional dependency: this module's alone
    raise ImportError(
        "kdfused.hf needs transformers: pip install 'kdfused[hf]' (transformers, accelerate, "
        "datasets)"
    ) from err


class LMHead(NamedTuple):
    """A causal LM's output head: ``logits = softcap(logit_scale * (h @
    weight.T + bias))``, ``softcap(x) = c tanh(x / c)`` (None: no cap)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    logit_scale: float


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_scale_of(config) -> float:
    """The multiplier a model applies to its logits before the softcap, from
    the config fields models use for it: ``logit_scale`` (Cohere),
    ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), or
    ``logits_scaling`` (Granite and MiniCPM3 divide by it; HyperCLOVA X
    multiplies). 1.0 when there is none."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        if getattr(config, "model_type", None) == "hyperclovax":
            return float(scaling)
        return 1.0 / float(scaling)
    return 1.0


def lm_head(model) -> LMHead:
    """The output head of a Hugging Face causal LM (its
    ``get_output_embeddings()`` and its config's ``final_logit_softcapping``
    and logit multiplier, :func:`logit_scale_of`)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (lm_head): kdfused.hf needs a "
            "causal LM"
        )
    config = _text_config(model)
    cap = getattr(config, "final_logit_softcapping", None)
    return LMHead(
        head.weight,
        getattr(head, "bias", None),
        None if cap is None else float(cap),
        logit_scale_of(config),
    )


def backbone(model):
    """The module of a causal LM that returns its last hidden states (its
    ``base_model``: the model without its lm_head)."""
    inner = getattr(model, "base_model", None)
    if inner is None or inner is model:
        raise ValueError(f"{type(model).__name__} has no base model below its lm_head")
    return inner


def last_hidden_state(model, input_ids, attention_mask=None) -> torch.Tensor:
    """[B, L, H]: the hidden states the lm_head takes, for every position."""
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def through_wrapper(wrapper, module, fn, *args):
    """fn(*args) run as the forward of `module`, called through `wrapper`
    (DistributedDataParallel, FSDP, DeepSpeed), so that the wrapper's hooks
    run (gradient synchronisation, gathering sharded parameters) although fn
    is not module's own forward."""
    if wrapper is module:
        return fn(*args)
    original = module.forward

    def forward(*_args, **_kwargs):
        module.forward = original
        return fn(*args)

    module.forward = forward
    try:
        return wrapper()
    finally:
        module.forward = original


@dataclasses.dataclass
class DistillationCollator:
    """Pads a list of examples (``input_ids``, optional ``attention_mask``,
    ``labels``, ``store_start``) to the longest, on the right: attention mask
    0 and labels -100 there. Labels default to the input ids."""

    pad_token_id: int = 0

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("an empty batch")
        ids = [torch.as_tensor(e["input_ids"], dtype=torch.int64) for e in examples]
        for i, x in enumerate(ids):
            if x.dim() != 1 or x.numel() < 2:
                raise ValueError(
                    f"example {i}: input_ids must be a 1-d sequence of at least 2 tokens (a "
                    f"position and the token it predicts), got shape {tuple(x.shape)}"
                )
        longest = max(x.numel() for x in ids)
        batch = {
            "input_ids": torch.full((len(ids), longest), self.pad_token_id, dtype=torch.int64),
            "attention_mask": torch.zeros(len(ids), longest, dtype=torch.int64),
            "labels": torch.full((len(ids), longest), -100, dtype=torch.int64),
        }
        for i, (e, x) in enumerate(zip(examples, ids, strict=True)):
            n = x.numel()
            batch["input_ids"][i, :n] = x
            mask = e.get("attention_mask")
            batch["attention_mask"][i, :n] = 1 if mask is None else torch.as_tensor(mask)
            labels = e.get("labels")
            batch["labels"][i, :n] = x if labels is None else torch.as_tensor(labels)
        batch["labels"][batch["attention_mask"] == 0] = -100
        if any("store_start" in e for e in examples):
            if not all("store_start" in e for e in examples):
                raise ValueError("some examples have store_start and others not")
            batch["store_start"] = torch.tensor([int(e["store_start"]) for e in examples])
        return batch


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that distils ``teacher`` into ``model`` on a
    dataset of token windows, off-policy, through the fused-linear loss.

    Args:
        model: the student, a causal LM (its lm_head gets the loss's gradient
            through the fused kernel; its logits are never formed whole).
        teacher: a causal LM (online: run in eval mode under no_grad on the
            same inputs), or a :class:`kdfused.sparse.SparseStore` (offline:
            each example then has ``store_start``, the store row of its first
            predicted position, and its positions 0 .. L-2 read the rows that
            follow in order).
        loss: a :class:`kdfused.FusedLinearDistillLoss` (its options: the
            temperature, alpha, divergence...; default: its defaults). The
            models' own softcaps and logit scales are read from them.
        args, train_dataset, data_collator, **trainer_kwargs: as the Trainer's.
            Examples hold ``input_ids`` and optionally ``attention_mask``,
            ``labels`` (default: the input ids; ``-100`` is ignored) and
            ``store_start``; labels are shifted by one inside. The default
            collator pads on the right.

    The step's loss is the sum over the accumulated batch's counted tokens
    divided by their number (the Trainer's ``num_items_in_batch``), so that
    gradient accumulation over k micro-batches equals one batch k times larger.
    """

    def __init__(
        self,
        model,
        teacher,
        loss: FusedLinearDistillLoss | None = None,
        args=None,
        train_dataset=None,
        data_collator=None,
        **trainer_kwargs,
    ):
        self.loss_fn = FusedLinearDistillLoss() if loss is None else loss
        if not isinstance(self.loss_fn, FusedLinearDistillLoss):
            raise TypeError(
                f"loss must be a kdfused.FusedLinearDistillLoss, got {type(loss).__name__}"
            )
        if self.loss_fn.reduction != "batchmean" or self.loss_fn.ignore_index != -100:
            raise ValueError(
                "the trainer divides by the accumulated batch's token count, which the Trainer "
                "counts as labels != -100: the loss must have reduction='batchmean' and "
                f"ignore_index=-100, got {self.loss_fn.reduction!r} and {self.loss_fn.ignore_index}"
            )
        head = lm_head(model)
        self._check_head_options("student", head)
        if isinstance(teacher, SparseStore):
            if teacher.vocab_size != head.weight.shape[0]:
                raise ValueError(
                    f"the store was written for a vocabulary of {teacher.vocab_size}, the "
                    f"student's lm_head has {head.weight.shape[0]} rows"
                )
        elif isinstance(teacher, torch.nn.Module):
            self._check_head_options("teacher", lm_head(teacher))
            for p in teacher.parameters():
                p.requires_grad_(False)
        else:
            raise TypeError(
                "teacher must be a causal LM (online) or a kdfused.sparse.SparseStore (offline), "
                f"got {type(teacher).__name__}"
            )
        self.teacher = teacher
        if data_collator is None:
            pad = getattr(model.config, "pad_token_id", None)
            data_collator = DistillationCollator(0 if pad is None else int(pad))
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=data_collator,
            **trainer_kwargs,
        )
        if isinstance(teacher, torch.nn.Module):
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _check_head_options(self, role: str, head: LMHead) -> None:
        """The models' softcaps and logit scales come from their configs; a
        loss set to others would silently train another objective."""
        for name, value, default in (
            ("softcap", head.softcap, None),
            ("logit_scale", head.logit_scale, 1.0),
        ):
            mine = getattr(self.loss_fn, f"{role}_{name}")
            if mine != default and mine != value:
                raise ValueError(
                    f"the loss has {role}_{name}={mine!r} but the {role} model forms its logits "
                    f"with {value!r} (read from its config): leave it unset on the loss"
                )

    def _set_signature_columns_if_needed(self):
        # The columns the loss reads (the model's forward would drop store_start).
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "attention_mask", "labels", "store_start"]

    def _teacher_of(self, inputs, n_positions, device):
        """The teacher for positions 0 .. L-2 of every example: a
        SparseTeacher [B, L-1, k] read from the store (padded positions keep
        nothing), or the live teacher's (hidden [B, L-1, Ht], its head)."""
        if isinstance(self.teacher, SparseStore):
            return {"teacher": self._stored_rows(inputs, n_positions, device)}
        unwrapped = self.accelerator.unwrap_model(self.teacher)
        unwrapped.eval()
        with torch.no_grad():
            hidden = through_wrapper(
                self.teacher,
                unwrapped,
                last_hidden_state,
                unwrapped,
                inputs["input_ids"],
                inputs["attention_mask"],
            )
        head = lm_head(unwrapped)
        return {
            "teacher_hidden": hidden[:, :-1],
            "teacher_weight": head.weight,
            "teacher_bias": head.bias,
            "teacher_softcap": head.softcap,
            "teacher_logit_scale": head.logit_scale,
        }

    def _stored_rows(self, inputs, n_positions, device) -> SparseTeacher:
        """The store's rows of every example's positions 0 .. L-2, in the
        batch's [B, L-1] order, as one ragged teacher: each example's rows
        from its store_start, and empty rows for its padded positions."""
        if "store_start" not in inputs:
            raise ValueError("a SparseStore teacher needs store_start in every example")
        store = self.teacher
        starts = inputs["store_start"].tolist()
        lengths = inputs["attention_mask"].sum(-1).tolist()
        parts = []
        for b, (start, length) in enumerate(zip(starts, lengths, strict=True)):
            rows = max(0, int(length) - 1)
            if start < 0 or start + rows > len(store):
                raise ValueError(
                    f"example {b}: store rows [{start}, {start + rows}) are outside the "
                    f"store's {len(store)} rows"
                )
            part = store[start : start + rows].compact()
            parts.append((part, n_positions - rows))
        counts = torch.cat(
            [torch.cat([p.lengths(), p.lengths().new_zeros(pad)]) for p, pad in parts]
        )
        offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        return SparseTeacher(
            torch.cat([p.indices for p, _ in parts]).to(device),
            torch.cat([p.logprobs for p, _ in parts]).to(device),
            store.tail,
            store.store_temperature,
            offsets=offsets.to(device),
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        hidden = through_wrapper(
            model,
            unwrapped,
            last_hidden_state,
            unwrapped,
            inputs["input_ids"],
            inputs.get("attention_mask"),
        )[:, :-1]
        labels = inputs["labels"][:, 1:]
        head = lm_head(unwrapped)
        teacher = self._teacher_of(inputs, labels.shape[1], hidden.device)
        options = self.loss_fn.options()
        count = num_items_in_batch
        if count is None:  # not accumulated (e.g. evaluation): this batch's tokens
            count = (labels != options["ignore_index"]).sum()
        loss = fused_linear_distill_loss(
            hidden,
            head.weight,
            labels,
            student_bias=head.bias,
            student_softcap=head.softcap,
            student_logit_scale=head.logit_scale,
            chunk_size=self.loss_fn.chunk_size,
            num_items_in_batch=count,
            **teacher,
            **options,
        )
        # Divided by the token count of the whole accumulated batch (over every
        # process when the Trainer gathers it): already scaled for gradient
        # accumulation; data-parallel gradient averaging is undone as the
        # Trainer's own loss does.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
