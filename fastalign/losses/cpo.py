"""CPO (Xu et al. 2024, "Contrastive Preference Optimization"): reference-free DPO plus the
chosen rows' NLL; TRL's variants (hinge, IPO, SimPO-flavoured, AlphaPO reward shaping)."""

from __future__ import annotations

import torch

from .. import checks
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

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def _rewards(logps: torch.Tensor, alphapo_alpha: float) -> torch.Tensor:
    """AlphaPO (Gupta et al. 2025, eq. 5): ``(1 − p^{−α})/α`` with ``p = e^{logp}``; α = 0 is
    ``logp`` itself. ``[U] -> [U]``."""
    if alphapo_alpha == 0.0:
        return logps
    return -torch.expm1(-alphapo_alpha * logps) / alphapo_alpha


def cpo_pair(
    stats: PairStats,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    simpo_gamma: float,
    alphapo_alpha: float,
    average_log_prob: bool,
) -> PairResult:
    """CPO eq. 3 and TRL's variants, per pair, on ``u = r(s_w) − r(s_l)`` (``s`` sums, or
    per-token means when ``average_log_prob``; ``r`` the AlphaPO shaping):
    sigmoid ``ℓ_ε(βu)``; simpo ``ℓ_ε(βu − γ)``; hinge ``max(0, 1 − βu)``;
    ipo ``(u − 1/(2β))²``; ``ℓ_ε(x) = −(1−ε)logσ(x) − ε·logσ(−x)``. Rewards ``β·r(s)``."""
    if average_log_prob:
        chosen, rejected = average(stats)
    else:
        chosen, rejected = stats.chosen_logps, stats.rejected_logps
    chosen_reward, rejected_reward = (
        _rewards(chosen, alphapo_alpha),
        _rewards(rejected, alphapo_alpha),
    )
    margin = chosen_reward - rejected_reward
    if loss_type in ("sigmoid", "simpo"):
        x = beta * margin - (simpo_gamma if loss_type == "simpo" else 0.0)
        losses = smoothed_logistic(x, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    else:
        losses = (margin - 1 / (2 * beta)) ** 2
    return PairResult(losses, beta * chosen_reward, beta * rejected_reward, chosen, rejected, {})


def cpo_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alphapo_alpha: float = 0.0,
    average_log_prob: bool | None = None,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    options: LogpOptions | None = None,
) -> ReferenceFreeOutput:
    """CPO loss ``mean(ℓ(β(r(s_w) − r(s_l)))) + cpo_alpha·NLL(y_w)`` from hidden states.

    Args:
        hidden, weight, labels, bias, cu_seqlens, options: as in ``simpo_loss_fused``.
        beta: β > 0. loss_type: ``"sigmoid"`` (the paper's), ``"hinge"``, ``"ipo"``,
            ``"simpo"`` (margin ``simpo_gamma``; CPO-SimPO) or ``"alphapo"`` (TRL's alias:
            ``"simpo"`` with ``cpo_alpha=0``).
        label_smoothing: ε in [0, 0.5) for sigmoid/simpo (conservative CPO); hinge and ipo
            take none (TRL ignores it with a warning; here it is an error).
        cpo_alpha: weight of the chosen rows' per-token NLL (TRL's ``cpo_alpha``, Liger's
            ``alpha``), from the same launch.
        alphapo_alpha: AlphaPO's reward shape α (TRL's ``alpha``; 0 = log-prob rewards).
        average_log_prob: per-token means instead of sums; None = TRL's rule (means for
            ``ipo``/``simpo``, sums otherwise; Liger's CPO default is sums).

    Returns:
        ``ReferenceFreeOutput`` with rewards ``β·r(s)`` and ``.metrics()`` incl. ``nll_loss``.

    Example:
        >>> h = torch.randn(4, 6, 16, requires_grad=True); W = torch.randn(50, 16)
        >>> y = torch.randint(0, 50, (4, 6)); y[:, :2] = -100
        >>> cpo_loss_fused(h, W, y, loss_type="simpo", simpo_gamma=0.5).loss.backward()
    """
    options = LogpOptions.of(options)
    beta = check_beta(beta)
    checks.check_choice(loss_type, "loss_type", LOSS_TYPES)
    eps = check_number(label_smoothing, "label_smoothing", high=0.5)
    if eps and loss_type in ("hinge", "ipo"):
        raise ValueError(f"label_smoothing does not apply to loss_type {loss_type!r}; use 0")
    cpo_alpha = check_number(cpo_alpha, "cpo_alpha")
    gamma = check_number(simpo_gamma, "simpo_gamma")
    alphapo_alpha = check_number(alphapo_alpha, "alphapo_alpha", low=float("-inf"))
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    if average_log_prob is None:
        average_log_prob = loss_type in ("ipo", "simpo")
    elif not isinstance(average_log_prob, bool):
        raise TypeError(f"average_log_prob must be a bool or None, got {average_log_prob!r}")

    def pair_fn(stats: PairStats) -> PairResult:
        return cpo_pair(
            stats,
            beta=beta,
            loss_type=loss_type,
            label_smoothing=eps,
            simpo_gamma=gamma,
            alphapo_alpha=alphapo_alpha,
            average_log_prob=average_log_prob,
        )

    return reference_free_loss(
        hidden, weight, labels, pair_fn, cpo_alpha, bias=bias, cu_seqlens=cu_seqlens,
        options=options, name="cpo_loss_fused",
    )  # fmt: skip
