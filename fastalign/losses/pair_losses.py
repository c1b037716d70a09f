"""Every TRL 1.16 DPO loss type, written once as a per-pair function of per-sequence stats.

Each function maps a group of pairs' ``PairStats`` (tiny ``[U]`` tensors) to per-pair losses
``[U]``; ``combined_pair_losses`` sums the chosen types with their ``loss_weights``, applies
the WPO weights, and the batch loss is the mean over pairs (a gradient unit is one pair).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class PairParams:
    """Scalar settings shared by the pair losses (TRL ``DPOConfig`` names)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5


@dataclass(frozen=True)
class PairStats:
    """Per-sequence statistics of U pairs, everything a pair loss may read.

    ``*_logps`` are the differentiable policy sums (LD-DPO weighted when ``ld_alpha`` is set),
    ``*_ref_logps`` the detached reference sums (zeros when reference-free), ``*_num_tokens``
    the scored-token counts (float). ``chosen_sft_logps`` is the unweighted chosen sum the
    NLL term reads; ``sft_scale`` = (pairs in the batch) / (chosen tokens in the batch), a
    batch constant known before any forward, so that the mean over pairs of
    ``−sft_scale·s_w`` is TRL's per-token mean NLL. ``pair_weight`` (detached ``[U]``) is
    WPO's ``w_w·w_l`` and ``mean_pair_weight`` its batch mean (TRL scales the batch-level
    ``sft`` term by it), both None without WPO.
    """

    chosen_logps: torch.Tensor  # [U] fp32, differentiable
    rejected_logps: torch.Tensor  # [U]
    chosen_ref_logps: torch.Tensor  # [U] detached
    rejected_ref_logps: torch.Tensor  # [U] detached
    chosen_num_tokens: torch.Tensor  # [U] float
    rejected_num_tokens: torch.Tensor  # [U] float
    chosen_sft_logps: torch.Tensor  # [U] differentiable
    sft_scale: float
    pair_weight: torch.Tensor | None = None  # [U] detached
    mean_pair_weight: float | None = None

    def subset(self, index: torch.Tensor | slice) -> PairStats:
        """The stats of a group of these pairs (a gradient unit is one pair); the batch
        constants (``sft_scale``, ``mean_pair_weight``) are kept."""
        fields = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            fields[name] = value[index] if isinstance(value, torch.Tensor) else value
        return PairStats(**fields)

    @property
    def chosen_logratios(self) -> torch.Tensor:  # [U]
        return self.chosen_logps - self.chosen_ref_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:  # [U]
        return self.rejected_logps - self.rejected_ref_logps


def f_divergence_scores(logratios: torch.Tensor, params: PairParams) -> torch.Tensor:
    """f-DPO (Wang et al. 2024, "Beyond Reverse KL", Thm. 1): the score ``f'(π/π_ref)`` of
    each sequence replaces its log-ratio ``r``. reverse KL ``r``; forward KL ``1 − e^{−r}``;
    Jensen-Shannon ``log 2 + logσ(r)``; α-divergence ``(e^{(α−1)r} − 1)/(α−1)`` (exponent
    clamped at 80 as TRL does; ``α = 1`` is reverse KL). ``[U] -> [U]``."""
    kind = params.f_divergence_type
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    alpha = params.f_alpha_divergence_coef
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    exponent = ((alpha - 1.0) * logratios).clamp(max=80.0)
    return (torch.exp(exponent) - 1.0) / (alpha - 1.0)


def _scores(stats: PairStats, params: PairParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) f-divergence scores, ``[U]`` each."""
    return (
        f_divergence_scores(stats.chosen_logratios, params),
        f_divergence_scores(stats.rejected_logratios, params),
    )


def _margin(stats: PairStats, params: PairParams) -> torch.Tensor:
    """``βΔ`` with ``Δ`` the chosen-minus-rejected score, ``[U]``."""
    chosen, rejected = _scores(stats, params)
    return params.beta * (chosen - rejected)


def _per_token_delta(stats: PairStats, params: PairParams) -> torch.Tensor:
    """``score_w/n_w − score_l/n_l`` (completion lengths at least 1), ``[U]``."""
    chosen, rejected = _scores(stats, params)
    return chosen / stats.chosen_num_tokens.clamp_min(1) - rejected / (
        stats.rejected_num_tokens.clamp_min(1)
    )


def sigmoid(stats: PairStats, params: PairParams) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): ``−logσ(βΔ)``; with ``label_smoothing=ε > 0`` this is
    cDPO (Mitchell 2023): ``−(1−ε)logσ(βΔ) − ε·logσ(−βΔ)``. NOTE: TRL 1.16 and Liger 0.8.5
    ignore ``label_smoothing`` for ``sigmoid``; fastalign applies it (a migrated TRL config
    with ``label_smoothing > 0`` and ``sigmoid`` changes meaning: set it to 0 to match)."""
    return smoothed_logistic(_margin(stats, params), params.label_smoothing)


def hinge(stats: PairStats, params: PairParams) -> torch.Tensor:
    """SLiC-HF (Zhao et al. 2023, eq. 2) on DPO's log-ratios: ``max(0, 1 − βΔ)``."""
    return torch.relu(1 - _margin(stats, params))


def ipo(stats: PairStats, params: PairParams) -> torch.Tensor:
    """IPO (Azar et al. 2024, eq. 17), TRL's per-token form: ``(Δ̄ − 1/(2β))²`` with
    ``Δ̄ = score_w/n_w − score_l/n_l`` (``n`` the completion lengths, at least 1)."""
    return (_per_token_delta(stats, params) - 1 / (2 * params.beta)) ** 2


def exo_pair(stats: PairStats, params: PairParams) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, eq. 16, K=2): ``KL(softmax(βΔ) ‖ [1−ε, ε])`` =
    ``σ(βΔ)(logσ(βΔ) − log(1−ε)) + σ(−βΔ)(logσ(−βΔ) − log ε)``, ε = ``label_smoothing`` > 0."""
    x = _margin(stats, params)
    eps = params.label_smoothing
    return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(eps)
    )


def nca_pair(stats: PairStats, params: PairParams) -> torch.Tensor:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment", eq. 12, K=2):
    ``−logσ(βr_w) − ½logσ(−βr_w) − ½logσ(−βr_l)``."""
    chosen, rejected = params.beta * stats.chosen_logratios, params.beta * stats.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def robust(stats: PairStats, params: PairParams) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 7), ε the flip rate in [0, 0.5):
    ``((1−ε)(−logσ(βΔ)) − ε(−logσ(−βΔ))) / (1−2ε)``."""
    x = _margin(stats, params)
    eps = params.label_smoothing
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


def bco_pair(stats: PairStats, params: PairParams) -> torch.Tensor:
    """BCO (Jung et al. 2024, eq. 6) on pairs, without the running-mean shift δ (as TRL):
    ``−logσ(βr_w) − logσ(−βr_l)``."""
    chosen, rejected = params.beta * stats.chosen_logratios, params.beta * stats.rejected_logratios
    return -F.logsigmoid(chosen) - F.logsigmoid(-rejected)


def sppo_hard(stats: PairStats, params: PairParams) -> torch.Tensor:
    """SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities 1/0:
    ``(r_w − 1/(2β))² + (r_l + 1/(2β))²``."""
    half = 0.5 / params.beta
    return (stats.chosen_logratios - half) ** 2 + (stats.rejected_logratios + half) ** 2


def smoothed_logistic(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``ℓ_ε(x) = −(1−ε)logσ(x) − ε·logσ(−x)``: the logistic loss with label smoothing ε."""
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def aot(stats: PairStats, params: PairParams) -> torch.Tensor:
    """AOT (Melnyk et al. 2024, "Distributional Preference Alignment via Optimal Transport",
    paired): ``ℓ_ε(β(sort(s_w − s_l) − sort(s_w,ref − s_l,ref)))``, ``ℓ_ε`` the
    ε-smoothed logistic loss. Sorting couples the batch: a whole-batch unit."""
    logratios, _ = torch.sort(stats.chosen_logps - stats.rejected_logps, dim=0)
    ref_logratios, _ = torch.sort(stats.chosen_ref_logps - stats.rejected_ref_logps, dim=0)
    return smoothed_logistic(params.beta * (logratios - ref_logratios), params.label_smoothing)


def aot_unpaired(stats: PairStats, params: PairParams) -> torch.Tensor:
    """AOT unpaired (Melnyk et al. 2024): ``ℓ_ε(β(sort(r_w) − sort(r_l)))``; a whole-batch
    unit like ``aot``."""
    chosen, _ = torch.sort(stats.chosen_logratios, dim=0)
    rejected, _ = torch.sort(stats.rejected_logratios, dim=0)
    return smoothed_logistic(params.beta * (chosen - rejected), params.label_smoothing)


def apo_zero(stats: PairStats, params: PairParams) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): ``1 − σ(βr_w) + σ(βr_l)``."""
    beta = params.beta
    return (
        1
        - torch.sigmoid(beta * stats.chosen_logratios)
        + torch.sigmoid(beta * stats.rejected_logratios)
    )


def apo_down(stats: PairStats, params: PairParams) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): ``σ(βr_w) + 1 − σ(β(r_w − r_l))``."""
    beta, chosen = params.beta, stats.chosen_logratios
    return (
        torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - stats.rejected_logratios))
    )


def discopop(stats: PairStats, params: PairParams) -> torch.Tensor:
    """DiscoPOP / LRML (Lu et al. 2024, eq. 5), x = βΔ, m = σ(x/τ):
    ``(1 − m)·(−logσ(x)) + m·e^{−x}``."""
    x = _margin(stats, params)
    modulation = torch.sigmoid(x / params.discopop_tau)
    return -F.logsigmoid(x) * (1 - modulation) + torch.exp(-x) * modulation


def sft(stats: PairStats, params: PairParams) -> torch.Tensor:
    """NLL of the chosen completions, per-token mean over the batch (RPO, Pang et al. 2024,
    eq. 3; TRL's ``sft``): per pair ``−s_w · B/N_w`` so that the batch mean is
    ``−Σ s_w / Σ n_w``. Under WPO, TRL scales this batch term by the mean pair weight."""
    scale = stats.sft_scale
    if stats.mean_pair_weight is not None:
        scale = scale * stats.mean_pair_weight
    return -scale * stats.chosen_sft_logps


def sigmoid_norm(stats: PairStats, params: PairParams) -> torch.Tensor:
    """Length-normalised DPO (TRL's ``sigmoid_norm``; SimPO's per-token averaging, Meng et al.
    2024, applied to DPO's scores): ``−logσ(β(score_w/n_w − score_l/n_l))``."""
    return -F.logsigmoid(params.beta * _per_token_delta(stats, params))


@dataclass(frozen=True)
class PairLossType:
    """One row of the loss-type table: how to compute it and what it needs."""

    name: str
    unit_loss: Callable[[PairStats, PairParams], torch.Tensor]  # [U] -> [U]
    unit: str  # "pair": per pair; "batch": couples the batch (sorting)
    uses_reference: bool
    f_divergence: bool  # accepts a non-default f_divergence_type (TRL's rule)
    # WPO: "pair" multiplies the per-pair loss by w_w·w_l; "batch" = the term applies the
    # batch's mean weight itself (TRL's expanded batch NLL); "none" = not allowed (sorting).
    wpo: str = "pair"


PAIR_LOSS_TYPES: dict[str, PairLossType] = {
    t.name: t
    for t in (
        PairLossType("sigmoid", sigmoid, "pair", True, True),
        PairLossType("hinge", hinge, "pair", True, True),
        PairLossType("ipo", ipo, "pair", True, True),
        PairLossType("exo_pair", exo_pair, "pair", True, True),
        PairLossType("nca_pair", nca_pair, "pair", True, False),
        PairLossType("robust", robust, "pair", True, True),
        PairLossType("bco_pair", bco_pair, "pair", True, False),
        PairLossType("sppo_hard", sppo_hard, "pair", True, False),
        PairLossType("aot", aot, "batch", True, False, wpo="none"),
        PairLossType("aot_unpaired", aot_unpaired, "batch", True, False, wpo="none"),
        PairLossType("apo_zero", apo_zero, "pair", True, False),
        PairLossType("apo_down", apo_down, "pair", True, False),
        PairLossType("discopop", discopop, "pair", True, True),
        PairLossType("sft", sft, "pair", False, True, wpo="batch"),
        PairLossType("sigmoid_norm", sigmoid_norm, "pair", True, True),
    )
}


def combined_pair_losses(
    stats: PairStats, params: PairParams, loss_types: Sequence[str], loss_weights: Sequence[float]
) -> torch.Tensor:
    """``Σ_k weight_k · loss_k`` per pair (MPO-style mixtures), WPO weights applied: ``[U]``."""
    total = None
    for name, weight in zip(loss_types, loss_weights, strict=True):
        kind = PAIR_LOSS_TYPES[name]
        losses = kind.unit_loss(stats, params)
        if stats.pair_weight is not None and kind.wpo == "pair":
            losses = losses * stats.pair_weight
        total = weight * losses if total is None else total + weight * losses
    return total


def wpo_weights(
    logps: torch.Tensor, log_sum_sq: torch.Tensor, num_tokens: torch.Tensor
) -> torch.Tensor:
    """WPO (Zhou et al. 2024, eq. 2), TRL's aligned form: per sequence
    ``w = exp(mean_t(log p_t − log Σ_v p_v²))``; per pair ``w_w·w_l``. ``[2U] -> [U]``, detached."""
    mean = (logps.detach() - log_sum_sq.detach()) / num_tokens.clamp_min(1).to(logps.dtype)
    weights = torch.exp(mean)
    half = weights.shape[0] // 2
    return weights[:half] * weights[half:]


def ld_weighted(full: torch.Tensor, prefix: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO (Liu et al. 2024, "Length Desensitization in DPO", eq. 9): the public part (the
    first ``min(n_w, n_l)`` tokens) counts fully, the verbose tail by α:
    ``prefix + α·(full − prefix)``. ``[R], [R] -> [R]``."""
    return prefix + ld_alpha * (full - prefix)
