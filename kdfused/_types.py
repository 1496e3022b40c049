"""Types shared by the public API and the reference."""

from typing import NamedTuple

import torch


class DistillLossOutput(NamedTuple):
    """What ``return_components=True`` returns.

    ``loss`` carries the gradient; ``hard_loss`` (the cross-entropy term) and
    ``soft_loss`` (the divergence term, including the T^2 factor when
    ``scale_by_t2``) are reduced like ``loss`` and detached, for logging:
    ``loss = alpha * hard_loss + (1 - alpha) * soft_loss``.
    """

    loss: torch.Tensor
    hard_loss: torch.Tensor
    soft_loss: torch.Tensor


class SparseTeacher:
    """A teacher stored as its k kept token ids per position and their
    log-probabilities (DESIGN.md section 6), accepted where teacher logits are.

    Args:
        indices: int32 or int64 ``[..., k]``, distinct per row; ``-1`` pads a
            row that keeps fewer than k ids.
        logprobs: float32/float16/bfloat16 ``[..., k]``: the teacher's
            log-probabilities at ``store_temperature`` of the kept ids
            (``-inf`` at padded entries, which are not read).
        tail: ``"ghost"`` (the dropped mass 1 - sum exp(logprobs) is one more
            bucket, compared with the student's mass outside the kept ids; any
            divergence) or ``"renormalize"`` (the kept weights alone,
            renormalized; forward KL only: also a sampled teacher whose
            weights sum to 1).
        store_temperature: the temperature the log-probabilities were taken at;
            the loss re-tempers them to its own temperature.
    """

    __slots__ = ("indices", "logprobs", "tail", "store_temperature")

    def __init__(self, indices, logprobs, tail: str = "ghost", store_temperature: float = 1.0):
        from ._validation import validate_sparse_fields

        validate_sparse_fields(indices, logprobs, tail, store_temperature)
        self.indices = indices
        self.logprobs = logprobs
        self.tail = tail
        self.store_temperature = float(store_temperature)

    @property
    def k(self) -> int:
        """Entries kept per row."""
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The leading dims: the positions taught (the student logits' ``[...]``)."""
        return self.indices.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def _with(self, indices, logprobs) -> "SparseTeacher":
        return SparseTeacher(indices, logprobs, self.tail, self.store_temperature)

    def to(self, device) -> "SparseTeacher":
        """The same teacher on another device (the dtypes are kept)."""
        return self._with(self.indices.to(device), self.logprobs.to(device))

    def flatten(self) -> "SparseTeacher":
        """The teacher as ``[N, k]`` rows (the leading dims flattened)."""
        return self._with(self.indices.reshape(-1, self.k), self.logprobs.reshape(-1, self.k))

    def __getitem__(self, rows) -> "SparseTeacher":
        """Rows of the leading dims, as tensor indexing selects them (e.g. a
        slice of positions for a micro-batch)."""
        return self._with(self.indices[rows], self.logprobs[rows])

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __repr__(self) -> str:
        return (
            f"SparseTeacher(shape={tuple(self.shape)}, k={self.k}, tail={self.tail!r}, "
            f"store_temperature={self.store_temperature}, indices {self.indices.dtype}, "
            f"logprobs {self.logprobs.dtype}, device={self.device})"
        )
