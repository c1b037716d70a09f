"""What the reference-free paired losses (SimPO, ORPO, CPO) share: one launch of the policy
rows, per-sequence stats, the chosen rows' NLL term, and an output with extra metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .. import _validate as V
from ._common import PreferenceOutput, check_paired_rows, score
from .pair_config import pair_stats
from .pair_losses import PairStats, sft


@dataclass
class ReferenceFreeOutput(PreferenceOutput):
    """``PreferenceOutput`` plus the loss family's own metrics (``nll_loss``, ORPO's
    ``log_odds_ratio`` / ``log_odds_chosen``), detached scalars."""

    extra_metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out.update({name: float(value) for name, value in self.extra_metrics.items()})
        return out


def check_number(value, name: str, *, low: float = 0.0, high: float | None = None) -> float:
    """A float in ``[low, high)`` (``high`` None: no upper bound); errors name it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value >= low and (high is None or value < high) and value != float("inf")):
        bound = f"[{low}, {high})" if high is not None else f">= {low} and finite"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return float(value)


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
    logp_kwargs: dict,
) -> ReferenceFreeOutput:
    """Score the ``[2B]`` rows in one launch, then ``mean(pair_fn + nll_weight·NLL_w)``.

    The NLL term is the chosen rows' per-token mean (TRL's and Liger's ``nll_loss``), from
    the same launch; ``pair_fn`` reads the sums and lengths in ``PairStats`` (reference 0).
    """
    V.check_tensor(hidden, "hidden")
    num_pairs = check_paired_rows(labels, logp_kwargs.get("cu_seqlens"))
    scored = score(
        hidden,
        weight,
        labels,
        ref_hidden=None,
        ref_weight=None,
        ref_logps=None,
        reference="none",
        logp_kwargs=logp_kwargs,
    )
    policy = scored.policy  # logps [2B] fp32
    stats = pair_stats(policy.logps, None, policy.num_tokens)
    result = pair_fn(stats)
    nll = sft(stats, None)  # [U]; its batch mean is the per-token NLL of the chosen rows
    losses = result.losses + nll_weight * nll if nll_weight else result.losses
    extra = {k: v.detach() for k, v in result.extra_metrics.items()}
    return ReferenceFreeOutput(
        loss=losses.mean(),
        chosen_logps=result.chosen_logps.detach(),
        rejected_logps=result.rejected_logps.detach(),
        chosen_rewards=result.chosen_rewards.detach(),
        rejected_rewards=result.rejected_rewards.detach(),
        chosen_num_tokens=policy.num_tokens[:num_pairs],
        rejected_num_tokens=policy.num_tokens[num_pairs:],
        extra_metrics={"nll_loss": nll.detach().mean(), **extra},
    )
