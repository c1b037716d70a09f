"""What the reference-free paired losses (SimPO, ORPO, CPO) share: one launch of the policy
rows, per-sequence stats, the chosen rows' NLL term, and an output with extra metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .. import checks
from .._types import LogpOutput
from ..options import LogpOptions
from ..streams import StreamInput
from ._common import PreferenceOutput, check_paired_rows, warn_unscored_pairs
from .pair_config import chosen_token_count, pair_stats
from .pair_losses import PairStats, sft
from .units import PolicyTerm, UnitLoss, UnitStats, fused_loss


@dataclass
class ReferenceFreeOutput(PreferenceOutput):
    """``PreferenceOutput`` plus the loss family's own metrics (``nll_loss``, ORPO's
    ``log_odds_ratio`` / ``log_odds_chosen``), detached scalars."""

    extra_metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out.update({name: float(value) for name, value in self.extra_metrics.items()})
        return out


def check_number(value, name: str, *, low: float | None = 0.0, high: float | None = None) -> float:
    """A finite float in ``[low, high)`` (None: unbounded); errors name it."""
    return float(checks.check_number(value, name, low=low, high=high, high_open=True))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − e^x)`` for ``x < 0``, stable on both sides of ``−log 2`` (Mächler 2012); each
    branch sees only inputs where it is finite, so gradients carry no NaN."""
    near_zero = x > -0.6931471805599453
    small = torch.where(near_zero, x, torch.full_like(x, -1.0))
    large = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(small)), torch.log1p(-torch.exp(large)))


def average(stats: PairStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean log-probs ``(s_w/n_w, s_l/n_l)``, ``[U]`` each (lengths at least 1)."""
    return (
        stats.chosen_logps / stats.chosen_num_tokens.clamp_min(1),
        stats.rejected_logps / stats.rejected_num_tokens.clamp_min(1),
    )


class PairResult(NamedTuple):
    """What a reference-free pair function returns; every tensor ``[U]``."""

    losses: torch.Tensor  # differentiable
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor  # the values the loss reads (per-token means where averaged)
    rejected_logps: torch.Tensor
    extra_metrics: dict  # name -> scalar tensor


def reference_free_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    pair_fn: Callable[[PairStats], PairResult],
    nll_weight: float,
    *,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    options: LogpOptions,
    name: str,
) -> ReferenceFreeOutput:
    """``mean(pair_fn + nll_weight·NLL_w)`` over pairs, a pair per gradient unit (store path
    where it fits). The NLL term is the chosen rows' per-token mean (TRL's and Liger's
    ``nll_loss``) from the same launch; ``pair_fn`` reads sums and lengths (reference 0)."""
    checks.check_tensor(hidden, "hidden")
    num_pairs = check_paired_rows(labels, cu_seqlens)
    chosen = [0]

    def unit_loss(s: UnitStats) -> torch.Tensor:  # [k]
        stats = _group_stats(s, num_pairs / max(chosen[0], 1))
        losses = pair_fn(stats).losses
        return losses + nll_weight * sft(stats, None) if nll_weight else losses

    def build(scored: list[LogpOutput]) -> list[UnitLoss]:
        chosen[0] = chosen_token_count(labels, cu_seqlens, options)
        return [UnitLoss(unit_loss)]

    stream = StreamInput(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens)
    result = fused_loss([PolicyTerm(stream, "pair")], [], build, options)
    policy = result.policy[0]
    warn_unscored_pairs(policy.num_tokens, num_pairs, name, stacklevel=4)
    stats = pair_stats(policy.logps.detach(), None, policy.num_tokens)
    report = pair_fn(stats)
    nll = sft(stats, None).mean()  # the per-token NLL of the chosen rows
    extra = {k: v.detach() for k, v in report.extra_metrics.items()}
    return ReferenceFreeOutput(
        loss=result.loss,
        chosen_logps=report.chosen_logps.detach(),
        rejected_logps=report.rejected_logps.detach(),
        chosen_rewards=report.chosen_rewards.detach(),
        rejected_rewards=report.rejected_rewards.detach(),
        chosen_num_tokens=policy.num_tokens[:num_pairs],
        rejected_num_tokens=policy.num_tokens[num_pairs:],
        extra_metrics={"nll_loss": nll, **extra},
    )


def _group_stats(s: UnitStats, sft_scale: float) -> PairStats:
    """``PairStats`` of a group of pairs (k chosen rows, then their k rejected rows)."""
    k = s.logps.shape[0] // 2
    counts = s.num_tokens.to(s.logps.dtype)
    zeros = torch.zeros_like(s.logps[:k])
    return PairStats(
        chosen_logps=s.logps[:k],
        rejected_logps=s.logps[k:],
        chosen_ref_logps=zeros,
        rejected_ref_logps=zeros,
        chosen_num_tokens=counts[:k],
        rejected_num_tokens=counts[k:],
        chosen_sft_logps=s.logps[:k],
        sft_scale=sft_scale,
    )
