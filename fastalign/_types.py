"""Small value types shared by the host code and both backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

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

    def select(self, index: torch.Tensor) -> TokenBatch:
        """The tokens at positions ``index`` (int64 ``[R]``) of this compacted batch."""
        return TokenBatch(
            hidden=self.hidden,
            index=tuple(i[index] for i in self.index),
            row_offsets=self.row_offsets[index],
            targets=self.targets[index],
            weight=self.weight,
            bias=self.bias,
        )

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Hidden rows ``[start, stop)`` of the compacted batch, gathered: ``[stop-start, H]``."""
        return self.hidden[tuple(i[start:stop] for i in self.index)]


class ForwardRequest(NamedTuple):
    """One stream's tokens for a backend's forward, and what else is asked of them."""

    tokens: TokenBatch
    expectation: bool = False  # E_t = softmax(z_t)·s·W (frozen lm_head: no recompute later)
    log_sum_sq: bool = False  # log Σ_v p_tv² (WPO), from the same logits


class BackendResult(NamedTuple):
    """A backend's forward for one stream; fp32 (fp64 for fp64 inputs)."""

    logp: torch.Tensor  # [M] log-prob of each scored token
    lse: torch.Tensor  # [M] logsumexp of each token's transformed logits
    expected: torch.Tensor | None  # [M, H] E_t = softmax(z_t)·s·W (frozen head only)
    log_sum_sq: torch.Tensor | None = None  # [M] log Σ_v p_tv² (WPO), when asked for


class BackendGrads(NamedTuple):
    """Gradients of ``Σ_t g_t · logp_t``; ``None`` where not asked for."""

    rows: torch.Tensor | None  # [M, H] fp32, the scored hidden rows
    weight: torch.Tensor | None  # [V, H]
    bias: torch.Tensor | None  # [V] fp32


class GroupLogits(NamedTuple):
    """One store-path group: what its forward kept until its gradient is formed."""

    logits: torch.Tensor  # [R, V] what the backend keeps of the logits (see part_max)
    logp: torch.Tensor  # [R] fp32
    lse: torch.Tensor  # [R] fp32
    # The fused-GEMM kernels' store path: base-2 max of each part_width-column part of the
    # vocabulary [P, R] fp32, and ``logits`` holds exp2(z₂ − part max)·s in the weight's dtype.
    part_max: torch.Tensor | None = None
    part_width: int = 0
    log_sum_sq: torch.Tensor | None = None  # [R] fp32 log Σ_v p_v² (WPO), when asked


class Backend(Protocol):
    """What ``ops`` and the store path need from a backend (``torch_backend``, Triton's
    ``kernels.logprob``). Every result is deterministic: fixed order, no atomics."""

    def forward(
        self,
        requests: list[ForwardRequest],
        transform: LogitTransform,
        chunk_elements: int | None = None,
    ) -> list[BackendResult]:
        """Per request, its tokens' log-probs and logsumexps (and what it asks for);
        ``chunk_elements``: a size hint for the logits tiles (None: the backend's own)."""

    def backward(
        self,
        tokens: TokenBatch,
        transform: LogitTransform,
        lse: torch.Tensor,
        grad_logp: torch.Tensor,
        need_hidden: bool,
        need_weight: bool,
        need_bias: bool,
    ) -> BackendGrads:
        """Recompute path: gradients of ``Σ_t grad_logp[t]·logp[t]``, logits recomputed."""

    def group_logits(
        self,
        rows: torch.Tensor,
        tokens: TokenBatch,
        transform: LogitTransform,
        log_sum_sq: bool = False,
    ) -> GroupLogits:
        """Store path, step 1: one GEMM for the group's ``[R, H]`` rows, then the fold (and
        each row's ``log Σ_v p_v²`` when ``log_sum_sq``, WPO)."""

    def group_grads(
        self,
        group: GroupLogits,
        rows: torch.Tensor,
        tokens: TokenBatch,
        transform: LogitTransform,
        grad_logp: torch.Tensor,
        grads: BackendGrads,
    ) -> torch.Tensor | None:
        """Store path, step 2: ``dz`` in place of ``group.logits`` from ``grad_logp [R]``;
        adds into ``grads.weight``/``grads.bias`` (fp32 accumulators); returns the rows'
        gradient ``[R, H]`` fp32 when ``grads.rows`` is not None (any tensor: a flag)."""
