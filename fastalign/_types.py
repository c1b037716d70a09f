"""Small value types shared by the host code and both backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class LogpOutput(NamedTuple):
    """Per-sequence log-prob sums.

    logps:      fp32 ``[B]``, ``Σ_t log p(y_t | ·)`` over the scored tokens of each sequence.
    num_tokens: int64 ``[B]``, how many tokens of each sequence were scored.
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor


@dataclass(frozen=True)
class LogitTransform:
    """``z = softcap(logit_scale · (h·Wᵀ + b) / temperature)``, applied in fp32."""

    logit_scale: float = 1.0
    temperature: float = 1.0
    softcap: float | None = None

    @property
    def multiplier(self) -> float:
        """The single factor applied to the raw logits before the softcap."""
        return self.logit_scale / self.temperature


@dataclass
class TokenBatch:
    """The scored tokens of one stream after compaction (ignored positions removed).

    ``hidden`` is the caller's tensor, untouched (any strides); the scored rows are addressed
    through ``index`` (torch indexing, one int64 ``[M]`` tensor per leading dim) or
    ``row_offsets`` (element offsets from ``hidden.data_ptr()``, for kernels).
    """

    hidden: torch.Tensor  # [B, T, H] or [N, H], any strides
    index: tuple[torch.Tensor, ...]  # int64 [M] per leading dim
    row_offsets: torch.Tensor  # int64 [M]
    targets: torch.Tensor  # int64 [M]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]

    @property
    def num_rows(self) -> int:
        return self.targets.numel()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Hidden rows ``[start, stop)`` of the compacted batch, gathered: ``[stop-start, H]``."""
        return self.hidden[tuple(i[start:stop] for i in self.index)]
