"""Streams of sequences to score: validation and compaction of their scored tokens.

A ``StreamInput`` names one set of sequences (hidden states, lm_head, labels); ``prepare``
checks it and compacts its scored tokens into a ``TokenBatch`` with per-token sequence ids,
the form every backend and both gradient paths (recompute, store) work on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from . import checks
from ._types import TokenBatch


@dataclass
class StreamInput:
    """One set of sequences to score: hidden states, lm_head and labels.

    ``differentiable=False`` streams (the reference model, KTO's mismatched pairs) are scored
    in the same launch but hold no autograd state. ``names`` maps the roles ``hidden``,
    ``weight``, ``labels``, ``bias``, ``cu_seqlens`` to the argument names errors should quote.
    """

    hidden: torch.Tensor  # [B, T, H] or [N, H]
    weight: torch.Tensor  # [V, H]
    labels: torch.Tensor  # [B, T] or [N]
    bias: torch.Tensor | None = None  # [V]
    cu_seqlens: torch.Tensor | None = None  # [B + 1]
    differentiable: bool = True
    names: dict[str, str] = field(default_factory=dict)
    # Per-sequence extras from the same launch (LD-DPO, WPO): sums over each sequence's
    # first prefix_tokens(num_tokens [B]) -> [B] scored tokens, and Σ_t log Σ_v p_tv².
    prefix_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None
    log_sum_sq: bool = False
    # LD-DPO on the fused-loss paths (``fastalign.losses.units``): tokens past the prefix
    # count tail_weight-fold in the stream's sums (needs prefix_tokens).
    tail_weight: float | None = None

    def __post_init__(self):
        """Tensors where tensors belong, named, before anything reads them (``frozen``)."""
        for role in ("hidden", "weight", "labels", "bias", "cu_seqlens"):
            value = getattr(self, role)
            if value is not None or role in ("hidden", "weight", "labels"):
                checks.check_tensor(value, self.name(role))

    def name(self, role: str) -> str:
        return self.names.get(role, role)

    def frozen(self) -> StreamInput:
        """This stream scored without autograd state: tensors detached, not differentiable."""
        return replace(
            self,
            hidden=self.hidden.detach(),
            weight=self.weight.detach(),
            bias=None if self.bias is None else self.bias.detach(),
            differentiable=False,
        )


@dataclass
class Prepared:
    """A validated, compacted stream."""

    tokens: TokenBatch
    seq_ids: torch.Tensor  # int64 [M], non-decreasing
    positions: torch.Tensor  # int64 [M], position of each token within its sequence
    num_seqs: int
    max_len: int
    num_tokens: torch.Tensor  # int64 [B]
    differentiable: bool
    prefix_mask: torch.Tensor | None = None  # bool [M]: token in its sequence's prefix
    log_sum_sq: bool = False
    tail_weight: float | None = None  # weight of tokens outside the prefix (LD-DPO's α)

    def token_weights(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Each token's weight in its sequence's sum, ``w_t ∈ {1, tail_weight}`` ``[R]`` in
        ``dtype``, for the compacted tokens ``index [R]`` (None: every token counts once)."""
        if self.tail_weight is None:
            return None
        one = torch.ones((), dtype=dtype, device=index.device)
        return torch.where(self.prefix_mask[index], one, one * self.tail_weight)


def _check_tensors(stream: StreamInput, ignore_index: int) -> torch.Tensor:
    """Dtypes, shapes, devices and label range of one stream; errors name its arguments.
    Returns the labels in int64, the form the compaction reads."""
    hidden, weight, labels, bias = stream.hidden, stream.weight, stream.labels, stream.bias
    n_hidden, n_weight, n_labels = map(stream.name, ("hidden", "weight", "labels"))
    checks.check_float(hidden, n_hidden)
    checks.check_float(weight, n_weight)
    checks.check_int(labels, n_labels)
    device = hidden.device
    if hidden.dim() not in (2, 3):
        raise ValueError(
            f"{n_hidden} must be [B, T, H] (padded) or [N, H] (packed), got shape "
            f"{tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{n_weight} must be [V, H] with H={hidden.shape[-1]} (the last dim of "
            f"{n_hidden}), got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{n_weight} dtype {weight.dtype} differs from {n_hidden} dtype {hidden.dtype}; "
            "cast one of them"
        )
    vocab_size = weight.shape[0]
    if vocab_size == 0:
        raise ValueError(f"{n_weight} has an empty vocabulary (V=0)")
    checks.check_same_device(weight, n_weight, device)
    if bias is not None:
        checks.check_float(bias, stream.name("bias"))
        checks.check_same_device(bias, stream.name("bias"), device)
        if bias.shape != (vocab_size,):
            raise ValueError(
                f"{stream.name('bias')} must be [V]=[{vocab_size}], got {tuple(bias.shape)}"
            )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{n_labels} shape {tuple(labels.shape)} must equal {n_hidden}.shape[:-1] = "
            f"{tuple(hidden.shape[:-1])}"
        )
    checks.check_same_device(labels, n_labels, device)
    labels = labels.long()  # compared in int64: in uint8, -100 would wrap to 156
    scored = labels != ignore_index
    if bool(scored.any()):
        values = labels[scored]
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{n_labels} holds {low if low < 0 else high}, outside [0, V={vocab_size}) "
                f"and not ignore_index={ignore_index}"
            )
    return labels


class _Compacted(NamedTuple):
    """The scored tokens of a stream, found by the padded or packed compaction."""

    targets: torch.Tensor  # int64 [M]
    seq_ids: torch.Tensor  # int64 [M], non-decreasing
    positions: torch.Tensor  # int64 [M]
    index: tuple[torch.Tensor, ...]  # int64 [M] per leading dim of hidden
    num_seqs: int
    max_len: int


def _compact_padded(stream: StreamInput, labels, shift: bool, ignore_index: int) -> _Compacted:
    if stream.cu_seqlens is not None:
        raise ValueError(
            f"{stream.name('cu_seqlens')} is only for packed [N, H] {stream.name('hidden')}; "
            "got [B, T, H]"
        )
    num_seqs, seq_len = labels.shape
    targets_grid = labels[:, 1:] if shift else labels  # hidden[:, t] scores labels[:, t+1]
    seq_ids, positions = (targets_grid != ignore_index).nonzero(as_tuple=True)
    return _Compacted(
        targets=targets_grid[seq_ids, positions],
        seq_ids=seq_ids,
        positions=positions,
        index=(seq_ids, positions),
        num_seqs=num_seqs,
        max_len=seq_len,
    )


def _compact_packed(stream: StreamInput, labels, shift: bool, ignore_index: int) -> _Compacted:
    n_cu, n_hidden = stream.name("cu_seqlens"), stream.name("hidden")
    if stream.cu_seqlens is None:
        raise ValueError(f"{n_cu} [B+1] is required when {n_hidden} is packed [N, H]")
    checks.check_int(stream.cu_seqlens, n_cu)
    checks.check_same_device(stream.cu_seqlens, n_cu, labels.device)
    cu = stream.cu_seqlens.long()
    num_total = labels.shape[0]
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{n_cu} must be 1-D [B+1] with B >= 1, got {tuple(cu.shape)}")
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != num_total or bool((lengths < 0).any()):
        raise ValueError(
            f"{n_cu} must start at 0, be non-decreasing and end at N={num_total}; "
            f"got {cu.tolist() if cu.numel() <= 16 else '...'}"
        )
    if shift:
        # Score hidden[i] against labels[i+1] inside each sequence; a sequence's last
        # token has nothing to predict.
        shifted = torch.full_like(labels, ignore_index)
        shifted[:-1] = labels[1:]
        shifted[cu[1:][lengths > 0] - 1] = ignore_index
        labels = shifted
    (rows,) = (labels != ignore_index).nonzero(as_tuple=True)
    seq_ids = torch.searchsorted(cu[1:], rows, right=True)
    return _Compacted(
        targets=labels[rows],
        seq_ids=seq_ids,
        positions=rows - cu[seq_ids],
        index=(rows,),
        num_seqs=cu.numel() - 1,
        max_len=int(lengths.max()),
    )


def prepare(stream: StreamInput, *, shift: bool, ignore_index: int) -> Prepared:
    """Validate one stream and compact its scored tokens (no copy of ``hidden``)."""
    labels = _check_tensors(stream, ignore_index)  # int64
    hidden = stream.hidden
    compact = _compact_padded if hidden.dim() == 3 else _compact_packed
    c = compact(stream, labels, shift, ignore_index)
    row_offsets = sum(i * hidden.stride(d) for d, i in enumerate(c.index))
    tokens = TokenBatch(
        hidden=hidden,
        index=c.index,
        row_offsets=row_offsets,
        targets=c.targets,
        weight=stream.weight,
        # a strided view (one column of a [V, k] tensor) contiguous: the kernels read it so;
        # autograd routes the bias gradient back through the copy
        bias=None if stream.bias is None else stream.bias.contiguous(),
    )
    num_tokens = torch.bincount(c.seq_ids, minlength=c.num_seqs)
    return Prepared(
        tokens=tokens,
        seq_ids=c.seq_ids,
        positions=c.positions,
        num_seqs=c.num_seqs,
        max_len=max(c.max_len, 1),
        num_tokens=num_tokens,
        differentiable=stream.differentiable,
        prefix_mask=_prefix_mask(stream.prefix_tokens, c.seq_ids, num_tokens),
        log_sum_sq=stream.log_sum_sq,
        tail_weight=stream.tail_weight,
    )


def _prefix_mask(prefix_tokens, seq_ids: torch.Tensor, num_tokens: torch.Tensor):
    """bool ``[M]``: the token is among the first ``prefix_tokens(num_tokens)[b]`` scored
    tokens of its sequence (tokens are in sequence order after compaction)."""
    if prefix_tokens is None:
        return None
    starts = torch.cumsum(num_tokens, 0) - num_tokens  # [B] first token of each sequence
    rank = torch.arange(seq_ids.numel(), device=seq_ids.device) - starts[seq_ids]
    return rank < prefix_tokens(num_tokens).to(rank.device)[seq_ids]


REF_NAMES = {
    "hidden": "ref_hidden",
    "weight": "ref_weight",
    "bias": "ref_bias",
    "labels": "labels",
    "cu_seqlens": "cu_seqlens",
}


def reference_stream(
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    *,
    policy: StreamInput,
    names: dict[str, str] | None = None,
) -> StreamInput:
    """The frozen reference stream of ``policy``'s sequences (its labels and cu_seqlens):
    its weight (and bias) default to the policy's."""
    names = names or REF_NAMES
    checks.check_tensor(ref_hidden, names["hidden"])
    if ref_weight is not None:
        checks.check_tensor(ref_weight, names["weight"])
    if ref_bias is not None:
        checks.check_tensor(ref_bias, names["bias"])
    if ref_weight is None:
        ref_weight, ref_bias = policy.weight, policy.bias if ref_bias is None else ref_bias
    return StreamInput(
        ref_hidden,
        ref_weight,
        policy.labels,
        bias=ref_bias,
        cu_seqlens=policy.cu_seqlens,
        names=names,
    ).frozen()


def sequence_sums(
    token_logp: torch.Tensor,  # [R] fp32/fp64
    seq_ids: torch.Tensor,  # int64 [R], values in [0, num_seqs)
    positions: torch.Tensor,  # int64 [R], unique per sequence
    num_seqs: int,
    max_len: int,
) -> torch.Tensor:
    """Per-sequence sums of token log-probs ``[num_seqs]``, deterministic, NaN-contained.

    Tokens are scattered into a ``[num_seqs, max_len]`` grid (unique positions, so no
    atomics) and summed along rows in fp64: a non-finite token poisons only its own
    sequence, which a global cumsum would not guarantee.
    """
    acc = torch.float64
    grid = torch.zeros(num_seqs, max_len, dtype=acc, device=token_logp.device)
    grid[seq_ids, positions] = token_logp.to(acc)
    out_dtype = torch.float64 if token_logp.dtype == torch.float64 else torch.float32
    return grid.sum(dim=1).to(out_dtype)
