"""DPO loss-type options checked once (named errors) and per-sequence scores turned into
``PairStats``: the glue between ``dpo_loss_fused`` and the per-pair functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .. import checks
from ..options import LogpOptions
from .pair_losses import (
    F_DIVERGENCES,
    PAIR_LOSS_TYPES,
    PairParams,
    PairStats,
    combined_pair_losses,
    wpo_weights,
)
from .units import UnitLoss, UnitStats


@dataclass(frozen=True)
class PairLossConfig:
    """A checked DPO loss selection: types with weights, shared parameters, LD-DPO and WPO."""

    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]
    params: PairParams
    ld_alpha: float | None = None
    use_weighting: bool = False

    @property
    def unit(self) -> str:
        """``"pair"`` when every term is per pair, ``"batch"`` when one couples the batch
        (AOT's sorting, or WPO's mean weight scaling the ``sft`` term)."""
        kinds = [PAIR_LOSS_TYPES[t] for t in self.loss_types]
        batch = any(k.unit == "batch" for k in kinds)
        batch_weighted = self.use_weighting and any(k.wpo == "batch" for k in kinds)
        return "batch" if batch or batch_weighted else "pair"

    @property
    def needs_reference(self) -> bool:
        return any(PAIR_LOSS_TYPES[t].uses_reference for t in self.loss_types)


def _number(value, name: str, **bounds) -> float:
    """``checks.check_number`` as a float (the team's wording of range errors)."""
    return float(checks.check_number(value, name, **bounds))


def _types_and_weights(loss_type, loss_weights, rpo_alpha) -> tuple[tuple, tuple]:
    types = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(types, Sequence) or not types or not all(isinstance(t, str) for t in types):
        raise TypeError(
            f"loss_type must be a string or a non-empty list of strings, got {loss_type!r}"
        )
    for name in types:
        checks.check_choice(name, "loss_type", tuple(PAIR_LOSS_TYPES))
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
            raise TypeError(f"loss_weights must be a list of numbers, got {loss_weights!r}")
        weights = tuple(_number(w, "loss_weights") for w in loss_weights)
        if len(weights) != len(types):
            raise ValueError(
                f"loss_weights has {len(weights)} entries but loss_type has {len(types)}; "
                "give one weight per loss type"
            )
    if rpo_alpha is not None:
        alpha = _number(rpo_alpha, "rpo_alpha", low=0)
        types, weights = (*types, "sft"), (*weights, alpha)
    return tuple(types), tuple(weights)


def pair_loss_config(
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
) -> PairLossConfig:
    """Check every option against TRL 1.16's rules; errors name the argument."""
    checks.check_number(beta, "beta", low=0, low_open=True)
    types, weights = _types_and_weights(loss_type, loss_weights, rpo_alpha)
    eps = _number(label_smoothing, "label_smoothing", low=0, high=0.5, high_open=True)
    if "exo_pair" in types and eps == 0.0:
        raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (EXO suggests 1e-3)")
    checks.check_choice(f_divergence_type, "f_divergence_type", F_DIVERGENCES)
    _number(f_alpha_divergence_coef, "f_alpha_divergence_coef")
    if f_divergence_type != "reverse_kl":
        bad = [t for t in types if not PAIR_LOSS_TYPES[t].f_divergence]
        if bad:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} does not apply to loss_type {bad}: "
                "only losses built on the chosen-rejected score difference take it"
            )
    checks.check_number(discopop_tau, "discopop_tau", low=0, low_open=True)
    if ld_alpha is not None:
        _number(ld_alpha, "ld_alpha", low=0, high=1)
    if not isinstance(use_weighting, bool):
        raise TypeError(f"use_weighting must be a bool, got {type(use_weighting).__name__}")
    if use_weighting and any(PAIR_LOSS_TYPES[t].wpo == "none" for t in types):
        raise ValueError("use_weighting (WPO) does not apply to 'aot'/'aot_unpaired' (they sort)")
    params = PairParams(
        beta=float(beta),
        label_smoothing=eps,
        discopop_tau=float(discopop_tau),
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=float(f_alpha_divergence_coef),
    )
    ld = None if ld_alpha is None else float(ld_alpha)
    return PairLossConfig(types, weights, params, ld, use_weighting)


def pair_stats(
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    num_tokens: torch.Tensor,
    *,
    log_sum_sq: torch.Tensor | None = None,
    raw_logps: torch.Tensor | None = None,
) -> PairStats:
    """``PairStats`` of B pairs from concatenated ``[2B]`` per-sequence values.

    ``logps`` (differentiable) and ``ref_logps`` (None: reference-free) are the sums the
    preference terms read (LD-DPO weighted when set); ``raw_logps`` the plain sums the NLL
    term and WPO read (default ``logps``); ``log_sum_sq`` the ``Σ_t log Σ_v p²`` sums (WPO).
    """
    pairs = logps.shape[0] // 2
    ref = torch.zeros_like(logps) if ref_logps is None else ref_logps.detach().to(logps.dtype)
    counts = num_tokens.to(logps.dtype)
    raw = logps if raw_logps is None else raw_logps
    weight = mean_weight = None
    if log_sum_sq is not None:
        weight = wpo_weights(raw, log_sum_sq, num_tokens)
        mean_weight = float(weight.mean())
    chosen_tokens = float(counts[:pairs].sum().clamp_min(1))
    return PairStats(
        chosen_logps=logps[:pairs],
        rejected_logps=logps[pairs:],
        chosen_ref_logps=ref[:pairs],
        rejected_ref_logps=ref[pairs:],
        chosen_num_tokens=counts[:pairs],
        rejected_num_tokens=counts[pairs:],
        chosen_sft_logps=raw[:pairs],
        sft_scale=pairs / chosen_tokens,
        pair_weight=weight,
        mean_pair_weight=mean_weight,
    )


def chosen_token_count(
    labels: torch.Tensor, cu_seqlens: torch.Tensor | None, options: LogpOptions
) -> int:
    """Scored tokens of the chosen rows ``[0, B)`` under ``options.shift``/``ignore_index``,
    read from the labels alone (so the store path knows the NLL term's batch constant before
    any row is scored)."""
    scored = labels.long() != options.ignore_index  # int64: a uint8 -100 would be 156
    shift = options.shift
    if cu_seqlens is None:
        pairs = labels.shape[0] // 2
        return int((scored[:pairs, 1:] if shift else scored[:pairs]).sum())
    cu = cu_seqlens.long()
    pairs = (cu.numel() - 1) // 2
    total = int(scored[int(cu[0]) : int(cu[pairs])].sum())
    if shift:  # a sequence's first label is the target of no position
        starts = cu[:pairs][cu[1 : pairs + 1] > cu[:pairs]]
        total -= int(scored[starts].sum())
    return total


def pair_unit_loss(
    config: PairLossConfig, ref_logps: torch.Tensor | None, pairs: int, chosen_tokens: int
) -> UnitLoss:
    """The gradient-unit form (``fastalign.losses.units``) of a checked loss selection: a
    group's rows are its k chosen then its k rejected sequences; ``ref_logps [2B]`` (None:
    reference-free) is picked by row; the NLL term's ``B/N_w`` is a batch constant. With
    LD-DPO the preference terms read the weighted sums and the NLL term the plain ones
    (``UnitStats.raw_logps``); WPO's pair weights come from the group's plain sums and
    ``UnitStats.log_sum_sq`` (its batch mean, read by ``sft``, needs the one batch unit that
    ``PairLossConfig.unit`` gives then)."""
    sft_scale = pairs / max(chosen_tokens, 1)

    def unit_loss(s: UnitStats) -> torch.Tensor:  # [k]
        ref = None if ref_logps is None else ref_logps[s.rows]
        sq = s.log_sum_sq if config.use_weighting else None
        stats = pair_stats(s.logps, ref, s.num_tokens, log_sum_sq=sq, raw_logps=s.raw_logps)
        stats = replace(stats, sft_scale=sft_scale)  # the batch's, not the group's
        losses = combined_pair_losses(stats, config.params, config.loss_types, config.loss_weights)
        return losses.mean()[None] if config.unit == "batch" else losses  # one batch unit

    return UnitLoss(unit_loss)
