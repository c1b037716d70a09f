"""The log-prob part every loss shares: streams into one launch, reference handling, checks."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from .. import checks
from .._types import LogpOutput
from ..options import LogpOptions
from ..streams import StreamInput, reference_stream
from .units import FusedLoss, PolicyTerm, UnitLoss, fused_loss


class PolicyAndReference(NamedTuple):
    """The policy rows as a stream and their reference: streamed or precomputed."""

    policy: StreamInput
    nograd: list[StreamInput]  # [the reference stream] or []
    ref_logps: torch.Tensor | None  # [rows] fp32, precomputed (None: streamed or none)
    rows: int  # sequences of the policy stream

    @property
    def num_pairs(self) -> int:
        """B of the paired layout (rows ``[0, B)`` chosen, ``[B, 2B)`` rejected)."""
        return self.rows // 2


def policy_and_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    rows: int | None,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    ref_hidden: torch.Tensor | None,
    ref_weight: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    reference: str,
    ref_head_used: bool = False,
) -> PolicyAndReference:
    """Check the reference arguments and build the streams.

    ``reference`` is ``"required"`` (exactly one of ``ref_hidden``/``ref_logps``),
    ``"optional"`` (at most one) or ``"none"`` (neither accepted). ``ref_weight``/``ref_bias``
    need a streamed reference: ``ref_hidden``, or another stream (``ref_head_used``).
    ``rows``: the policy's sequence count (``ref_logps`` must be ``[rows]``), or None for
    the paired layout, checked here (``check_paired_rows``; then ``rows = 2B``)."""
    if rows is None:
        rows = 2 * check_paired_rows(labels, cu_seqlens)
    given = [
        name for name, v in (("ref_hidden", ref_hidden), ("ref_logps", ref_logps)) if v is not None
    ]
    if reference == "required" and len(given) != 1:
        raise ValueError(
            "give exactly one reference: ref_hidden (streamed in the same launch) or "
            f"ref_logps (precomputed); got {' and '.join(given) if given else 'neither'}"
        )
    if reference != "required" and len(given) > 1:
        raise ValueError("give at most one of ref_hidden and ref_logps, not both")
    if reference == "none" and given:
        raise ValueError(f"{given[0]} is not used by this loss (it is reference-free)")
    for name, value in (("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if value is not None and ref_hidden is None and not ref_head_used:
            raise ValueError(f"{name} was given without ref_hidden")
    if ref_logps is not None:
        ref_logps = check_logps(ref_logps, "ref_logps", rows, labels.device)
    policy = StreamInput(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens)
    if ref_hidden is None:
        return PolicyAndReference(policy, [], ref_logps, rows)
    ref = reference_stream(ref_hidden, ref_weight, ref_bias, policy=policy)
    return PolicyAndReference(policy, [ref], ref_logps, rows)


def warn_unscored_pairs(
    num_tokens: torch.Tensor, num_pairs: int, loss: str, stacklevel: int = 4
) -> None:
    """Warn (once per call site, Python's default filter) when a pair has a row with no
    scored token: its margin is then a constant, so it adds a fixed loss and no gradient."""
    empty = (num_tokens[:num_pairs] == 0) | (num_tokens[num_pairs:] == 0)
    if bool(empty.any()):
        warnings.warn(
            f"{loss}: {int(empty.sum())} of {num_pairs} pairs have a chosen or rejected row with "
            "no scored token (all labels == ignore_index, e.g. a completion truncated away); "
            "they add a constant to the loss and no gradient",
            stacklevel=stacklevel,
        )


def check_logps(value, name: str, rows: int, device: torch.device) -> torch.Tensor:
    """A precomputed per-sequence log-prob tensor: ``[rows]`` floats, detached, fp32."""
    checks.check_tensor(value, name)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.shape != (rows,):
        raise ValueError(f"{name} must have shape [{rows}], got {tuple(value.shape)}")
    checks.check_same_device(value, name, device)
    return value.detach().float()


def check_beta(beta) -> float:
    """β as a float; not a finite number > 0 raises naming ``beta``."""
    return float(checks.check_number(beta, "beta", low=0, low_open=True))


def num_sequences(labels: torch.Tensor, cu_seqlens, cu_name: str) -> int:
    """Rows of padded ``labels [B, T]``, or ``B`` of packed ``cu_seqlens [B + 1]``."""
    if cu_seqlens is None:
        if labels.dim() != 2:
            raise ValueError(
                f"labels must be [B, T] (padded; packed [N] labels need {cu_name}), got shape "
                f"{tuple(labels.shape)}"
            )
        return labels.shape[0]
    checks.check_tensor(cu_seqlens, cu_name)
    return max(cu_seqlens.numel() - 1, 0)


def check_paired_rows(labels: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    """Number of pairs B of the concatenated layout (rows [0, B) chosen, [B, 2B) rejected)."""
    checks.check_tensor(labels, "labels")
    rows = num_sequences(labels, cu_seqlens, "cu_seqlens")
    if rows == 0 or rows % 2:
        raise ValueError(
            f"the paired layout needs an even, non-zero number of sequences (rows [0, B) chosen, "
            f"[B, 2B) rejected); got {rows}"
        )
    return rows // 2


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Mean of ``values[mask]`` as a float, None when the mask is empty."""
    if not bool(mask.any()):
        return None
    return float(values[mask].float().mean())


@dataclass
class PreferenceOutput:
    """Result of a paired loss (DPO, IPO, TYPO): the loss and detached per-pair values.

    ``loss`` is a differentiable scalar; every other tensor is ``[B]`` and detached.
    ``metrics()`` gives TRL's names and values for the batch.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_num_tokens: torch.Tensor
    rejected_num_tokens: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """TRL's metric names: rewards/{chosen,rejected,accuracies,margins}, logps/*."""
        return {
            "rewards/chosen": float(self.chosen_rewards.mean()),
            "rewards/rejected": float(self.rejected_rewards.mean()),
            "rewards/accuracies": float(
                (self.chosen_rewards > self.rejected_rewards).float().mean()
            ),
            "rewards/margins": float((self.chosen_rewards - self.rejected_rewards).mean()),
            "logps/chosen": float(self.chosen_logps.mean()),
            "logps/rejected": float(self.rejected_logps.mean()),
        }

    def __iter__(self):  # allows ``loss, *rest = out`` like a tuple
        return iter(getattr(self, f.name) for f in fields(self))


def paired_output(
    loss: torch.Tensor,
    policy: LogpOutput,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    num_pairs: int,
) -> PreferenceOutput:
    """Split ``[2B]`` per-row values into the chosen ``[0, B)`` and rejected ``[B, 2B)`` halves."""
    logps = policy.logps.detach()  # [2B]
    return PreferenceOutput(
        loss=loss,
        chosen_logps=logps[:num_pairs],
        rejected_logps=logps[num_pairs:],
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        chosen_num_tokens=policy.num_tokens[:num_pairs],
        rejected_num_tokens=policy.num_tokens[num_pairs:],
    )


def paired_loss(
    streams: PolicyAndReference,
    *,
    options: LogpOptions,
    make_unit_loss: Callable[[torch.Tensor | None], UnitLoss],
    name: str,
    unit: str = "pair",
) -> tuple[FusedLoss, torch.Tensor | None]:
    """A pair-unit loss on the policy rows with an optional reference: ``(result, ref [2B])``.

    ``streams``: ``policy_and_reference`` of the paired layout. ``make_unit_loss(ref_logps
    [2B] or None)`` gives the loss's ``UnitLoss``; ``unit="batch"`` for a loss that couples
    the pairs (AOT's sorting).
    """
    ref = [streams.ref_logps]

    def build(scored: list[LogpOutput]) -> list[UnitLoss]:
        if scored:
            ref[0] = scored[0].logps
        return [make_unit_loss(ref[0])]

    result = fused_loss([PolicyTerm(streams.policy, unit)], streams.nograd, build, options)
    warn_unscored_pairs(result.policy[0].num_tokens, streams.num_pairs, name)
    return result, ref[0]
