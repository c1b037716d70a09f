"""SimPO (Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
Reward"): length-normalised, reference-free, with a target reward margin γ."""

from __future__ import annotations

import torch

from ..options import LogpOptions
from ._common import check_beta
from .pair_losses import PairStats, smoothed_logistic
from .reference_free import (
    PairResult,
    ReferenceFreeOutput,
    average,
    check_number,
    reference_free_loss,
)


def simpo_pair(
    stats: PairStats, *, beta: float, gamma: float, label_smoothing: float
) -> PairResult:
    """SimPO eq. 6, per pair: ``−(1−ε)logσ(x) − ε·logσ(−x)``, ``x = β(s_w/n_w − s_l/n_l) − γ``
    (ε = 0 is the paper's loss; ε > 0 Liger's/TRL's label smoothing). Rewards ``β·s/n``."""
    chosen, rejected = average(stats)
    losses = smoothed_logistic(beta * (chosen - rejected) - gamma, label_smoothing)
    return PairResult(losses, beta * chosen, beta * rejected, chosen, rejected, {})


def simpo_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    options: LogpOptions | None = None,
) -> ReferenceFreeOutput:
    """SimPO loss ``mean(−logσ(β(s_w/n_w − s_l/n_l) − γ))`` from hidden states, no logits.

    Args:
        hidden: ``[2B, T, H]`` (or packed with ``cu_seqlens``), rows ``[0, B)`` chosen,
            ``[B, 2B)`` rejected. weight: lm_head ``[V, H]``. labels: ``[2B, T]``.
        beta: β > 0 (Liger's and TRL's default 0.1; the paper tunes 2.0-2.5). gamma: the target
            reward margin γ >= 0 (Liger's name; TRL's CPO calls it ``simpo_gamma``).
        label_smoothing: ε in [0, 0.5). nll_weight: weight of the chosen rows' per-token NLL
            (Liger's ``alpha`` with ``compute_nll_loss``), from the same launch.
        bias, cu_seqlens, options (a ``LogpOptions``): as in ``dpo_loss_fused`` (reference-free;
            the gradient unit is a pair).

    Returns:
        ``ReferenceFreeOutput``: per-pair mean log-probs ``s/n`` and rewards ``β·s/n``,
        ``.metrics()`` with TRL's names plus ``nll_loss``.

    Example:
        >>> h = torch.randn(4, 6, 16, requires_grad=True); W = torch.randn(50, 16)
        >>> y = torch.randint(0, 50, (4, 6)); y[:, :2] = -100
        >>> out = simpo_loss_fused(h, W, y, beta=2.0, gamma=0.5)
        >>> out.loss.backward(); round(out.metrics()["rewards/accuracies"] * 2) in (0, 1, 2)
        True
    """
    options = LogpOptions.of(options)
    beta = check_beta(beta)
    gamma = check_number(gamma, "gamma")
    eps = check_number(label_smoothing, "label_smoothing", high=0.5)
    nll_weight = check_number(nll_weight, "nll_weight")

    def pair_fn(stats: PairStats) -> PairResult:
        return simpo_pair(stats, beta=beta, gamma=gamma, label_smoothing=eps)

    return reference_free_loss(
        hidden, weight, labels, pair_fn, nll_weight, bias=bias, cu_seqlens=cu_seqlens,
        options=options, name="simpo_loss_fused",
    )  # fmt: skip
