"""ORPO (Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
Model"): the chosen rows' NLL plus an odds-ratio term on per-token mean log-probs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..options import LogpOptions
from ._common import check_beta
from .pair_losses import PairStats
from .reference_free import (
    PairResult,
    ReferenceFreeOutput,
    average,
    log1mexp,
    reference_free_loss,
)


def orpo_pair(stats: PairStats, *, beta: float) -> PairResult:
    """ORPO eq. 6-7, per pair: ``−β·logσ(log odds(y_w) − log odds(y_l))`` with
    ``log odds(y) = m − log(1 − e^m)``, ``m = s/n`` the per-token mean log-prob (β is the
    paper's λ). Rewards ``β·m``; metrics ``log_odds_ratio`` (mean logσ) and
    ``log_odds_chosen`` (mean log-odds difference), as TRL logs them; the latter over the
    pairs whose rows both have scored tokens (an empty row's log odds are infinite; NaN if
    no pair has both)."""
    chosen, rejected = average(stats)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    scored = (stats.chosen_num_tokens > 0) & (stats.rejected_num_tokens > 0)  # [U]
    extra = {
        "log_odds_ratio": ratio.detach().mean(),
        "log_odds_chosen": log_odds.detach()[scored].mean(),
    }
    return PairResult(-beta * ratio, beta * chosen, beta * rejected, chosen, rejected, extra)


def orpo_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.1,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    options: LogpOptions | None = None,
) -> ReferenceFreeOutput:
    """ORPO loss ``NLL(y_w) − β·mean(logσ(log odds ratio))`` from hidden states, no logits.

    The NLL is the chosen rows' per-token mean and comes from the same launch as the odds
    ratio. Layout, ``options`` (a ``LogpOptions``) and outputs as in ``simpo_loss_fused``;
    ``.metrics()`` adds ``nll_loss``, ``log_odds_ratio`` and ``log_odds_chosen`` (TRL's names).

    Example:
        >>> h = torch.randn(4, 6, 16, requires_grad=True); W = torch.randn(50, 16)
        >>> y = torch.randint(0, 50, (4, 6)); y[:, :2] = -100
        >>> out = orpo_loss_fused(h, W, y, beta=0.1)
        >>> out.loss.backward(); out.metrics()["nll_loss"] > 0
        True
    """
    options = LogpOptions.of(options)
    beta = check_beta(beta)

    def pair_fn(stats: PairStats) -> PairResult:
        return orpo_pair(stats, beta=beta)

    return reference_free_loss(
        hidden, weight, labels, pair_fn, 1.0, bias=bias, cu_seqlens=cu_seqlens,
        options=options, name="orpo_loss_fused",
    )  # fmt: skip
