"""Types shared by the public API, the capabilities and the reference."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._validation import validate_sparse_fields


class _LossParts(NamedTuple):
    loss: torch.Tensor
    hard_loss: torch.Tensor
    soft_loss: torch.Tensor


class DistillLossOutput(_LossParts):
    """What ``return_components=True`` returns: ``(loss, hard_loss, soft_loss)``.

    ``loss`` carries the gradient; ``hard_loss`` (the cross-entropy term) and
    ``soft_loss`` (the divergence term, including the T^2 factor when
    ``scale_by_t2``) are reduced like ``loss`` and detached, for logging:
    ``loss = alpha * hard_loss + (1 - alpha) * soft_loss``.

    ``student_entropy`` (an attribute, not a tuple field): with
    ``student_entropy=True``, the student's entropy H(softmax(s / T)) of each
    counted row, reduced like the loss and detached, from the same kernel
    pass; None otherwise.
    """

    student_entropy: torch.Tensor | None = None


class SparseTeacher:
    """A teacher stored as the token ids it keeps per position and their
    log-probabilities (docs/design.md, "The sparse teacher"), accepted where
    teacher logits are. Two layouts:

    - padded: ``indices`` and ``logprobs`` ``[..., k]``, a row that keeps
      fewer than k ids padded with id ``-1`` (log-prob ``-inf``);
    - ragged (``offsets`` given): ``indices`` and ``logprobs`` ``[total]``
      and ``offsets`` int64 ``[N + 1]`` (``offsets[0] = 0``, non-decreasing,
      ``offsets[N] = total``): row i keeps ``indices[offsets[i]:offsets[i + 1]]``
      (no padding; what ``kdfused.sparse.topk(..., top_p=p)`` returns and a
      store holds).

    Args:
        indices: int32 or int64 ids, distinct per row; or uint16 (ids below
            65536, ragged rows only: there is no -1 to pad with).
        logprobs: float32/float16/bfloat16: the teacher's log-probabilities at
            ``store_temperature`` of the kept ids.
        tail: ``"ghost"`` (the dropped mass 1 - sum exp(logprobs) is one more
            bucket, compared with the student's mass outside the kept ids; any
            divergence) or ``"renormalize"`` (the kept weights alone,
            renormalized; forward KL only: also a sampled teacher whose
            weights sum to 1).
        store_temperature: the temperature the log-probabilities were taken at;
            the loss re-tempers them to its own temperature.
        offsets: the ragged layout's row boundaries, or None (padded).
    """

    __slots__ = ("indices", "logprobs", "tail", "store_temperature", "offsets", "_longest")

    def __init__(
        self,
        indices,
        logprobs,
        tail: str = "ghost",
        store_temperature: float = 1.0,
        *,
        offsets=None,
    ):
        self.store_temperature = validate_sparse_fields(
            indices, logprobs, tail, store_temperature, offsets
        )
        self.indices = indices
        self.logprobs = logprobs
        self.tail = tail
        self.offsets = offsets
        self._longest = None

    @property
    def ragged(self) -> bool:
        """Whether the rows are in the ragged layout (offsets given)."""
        return self.offsets is not None

    @property
    def k(self) -> int:
        """Entries kept per row: k of the padded layout; for ragged rows the
        longest row's (read once from the offsets)."""
        if not self.ragged:
            return self.indices.shape[-1]
        if self._longest is None:
            lengths = self.lengths()
            self._longest = int(lengths.max()) if lengths.numel() else 0
        return self._longest

    @property
    def shape(self) -> torch.Size:
        """The leading dims: the positions taught (the student logits' ``[...]``);
        ``(N,)`` for ragged rows."""
        if self.ragged:
            return torch.Size([self.offsets.shape[0] - 1])
        return self.indices.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def lengths(self) -> torch.Tensor:
        """int64 [N]: how many ids each row keeps (padded: those that are not -1)."""
        if self.ragged:
            return self.offsets[1:] - self.offsets[:-1]
        return (self.indices.reshape(-1, self.k) != -1).sum(-1)

    def _with(self, indices, logprobs, offsets=None) -> SparseTeacher:
        return SparseTeacher(indices, logprobs, self.tail, self.store_temperature, offsets=offsets)

    def to(self, device) -> SparseTeacher:
        """The same teacher on another device (the dtypes are kept)."""
        offsets = None if self.offsets is None else self.offsets.to(device)
        return self._with(self.indices.to(device), self.logprobs.to(device), offsets)

    def flatten(self) -> SparseTeacher:
        """The teacher as N rows: ``[N, k]`` (the leading dims flattened), or
        the ragged rows as they are."""
        if self.ragged:
            return self
        return self._with(self.indices.reshape(-1, self.k), self.logprobs.reshape(-1, self.k))

    def __getitem__(self, rows) -> SparseTeacher:
        """Rows of the leading dims, as tensor indexing selects them (e.g. a
        slice of positions for a micro-batch); ragged rows take a contiguous
        slice ``[a:b]``."""
        if not self.ragged:
            return self._with(self.indices[rows], self.logprobs[rows])
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("ragged rows are taken as a contiguous slice, teacher[a:b]")
        start, stop, _ = rows.indices(len(self))
        stop = max(start, stop)
        bounds = self.offsets[start : stop + 1]
        first, last = (int(x) for x in (bounds[0], bounds[-1])) if stop > start else (0, 0)
        return self._with(self.indices[first:last], self.logprobs[first:last], bounds - bounds[0])

    def __len__(self) -> int:
        return self.shape[0] if len(self.shape) else 1

    def padded(self, k: int | None = None) -> SparseTeacher:
        """The same rows in the padded layout ``[N, k]`` (k: at least the
        longest row; by default it, and at least 1), int64 ids (-1 / -inf
        pads)."""
        if not self.ragged:
            return self.flatten()
        k = max(self.k, 1) if k is None else k
        n = len(self)
        lengths = self.lengths()
        if k < (int(lengths.max()) if n else 0):
            raise ValueError(f"k = {k} is shorter than the longest row, {self.k}")
        indices = torch.full((n, k), -1, dtype=torch.int64, device=self.device)
        logprobs = torch.full((n, k), -float("inf"), dtype=self.logprobs.dtype, device=self.device)
        keep = torch.arange(k, device=self.device)[None, :] < lengths[:, None]
        indices[keep] = self.indices.to(torch.int64)
        logprobs[keep] = self.logprobs
        return self._with(indices, logprobs)

    def compact(self) -> SparseTeacher:
        """The same rows in the ragged layout (a padded teacher's -1 entries
        dropped); ragged rows as they are."""
        if self.ragged:
            return self
        flat = self.flatten()
        keep = flat.indices != -1
        offsets = torch.zeros(len(flat) + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(keep.sum(-1), 0, out=offsets[1:])
        return self._with(flat.indices[keep], flat.logprobs[keep], offsets)

    def __repr__(self) -> str:
        layout = "ragged" if self.ragged else f"k={self.k}"
        return (
            f"SparseTeacher(shape={tuple(self.shape)}, {layout}, tail={self.tail!r}, "
            f"store_temperature={self.store_temperature}, indices {self.indices.dtype}, "
            f"logprobs {self.logprobs.dtype}, device={self.device})"
        )
