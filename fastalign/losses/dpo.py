"""DPO (Rafailov et al.) and every TRL 1.16 DPO loss type on fused log-probs.

``sigmoid``: ``−logσ(βΔ)``; with ``label_smoothing=ε > 0`` it is cDPO,
``−(1−ε)logσ(βΔ) − ε·logσ(−βΔ)`` (TRL and Liger ignore ε for ``sigmoid``). ``robust``
(Chowdhury et al. 2024): ``(−(1−ε)logσ(βΔ) + ε·logσ(−βΔ)) / (1−2ε)``. The other types,
their papers and formulas: ``pair_losses``. ``Δ = (s_w − s_w,ref) − (s_l − s_l,ref)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._types import LogpOutput
from ._common import PreferenceOutput, check_paired_rows, paired_output, score
from .pair_config import pair_loss_config, pair_stats
from .pair_losses import PAIR_LOSS_TYPES, combined_pair_losses, ld_weighted

LOSS_TYPES = tuple(PAIR_LOSS_TYPES)


def dpo_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    loss_weights: Sequence[float] | None = None,
    rpo_alpha: float | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    **logp_kwargs,
) -> PreferenceOutput:
    """DPO loss from final hidden states and the lm_head, without full logits.

    Args:
        hidden: ``[2B, T, H]`` (or packed ``[N, H]`` with ``cu_seqlens`` of 2B sequences),
            rows ``[0, B)`` chosen and ``[B, 2B)`` rejected — TRL's concatenated layout.
        weight: lm_head ``[V, H]``. labels: ``[2B, T]`` with ``ignore_index`` on prompt/pad.
        ref_hidden / ref_weight: the reference model's hidden states (and lm_head, default
            ``weight``), scored in the same launch with no autograd state; or
        ref_logps: precomputed reference sums ``[2B]`` (LD-DPO weighted when ``ld_alpha`` is
            set, as TRL precomputes them). Exactly one unless ``reference_free`` or only
            reference-free terms (``"sft"``) are chosen.
        beta: β > 0.
        loss_type: one of TRL 1.16's types (``LOSS_TYPES``: sigmoid, hinge, ipo, exo_pair,
            nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down,
            discopop, sft, sigmoid_norm), or a list of them combined with ``loss_weights``
            (default 1 each; MPO-style mixtures). Formulas and papers: ``pair_losses``.
        label_smoothing: ε in [0, 0.5): cDPO for ``sigmoid`` (fastalign's convention; TRL
            1.16 and Liger ignore it there, so a migrated TRL config with ε > 0 changes
            meaning: set 0 to match), the flip rate of ``robust``, EXO's ε (> 0), AOT's ε.
        rpo_alpha: weight of the chosen rows' per-token NLL (RPO; the same as appending
            ``"sft"`` with that weight), from the same launch.
        ld_alpha: LD-DPO's α in [0, 1]: tokens past ``min(n_w, n_l)`` count α-fold in the
            policy and streamed reference sums.
        use_weighting: WPO weights ``w_w·w_l``, ``w = exp(mean_t(log p_t − log Σ_v p_v²))``
            (detached), from the same launch (the fold's ``log Σ p²``; no extra GEMM).
        f_divergence_type, f_alpha_divergence_coef: f-DPO's divergence (``reverse_kl``,
            ``forward_kl``, ``js_divergence``, ``alpha_divergence``) and its α.
        discopop_tau: DiscoPOP's τ.
        **logp_kwargs: ``bias`` (and ``ref_bias`` for ``ref_weight``), ``cu_seqlens``, ``shift``,
            ``ignore_index``, ``logit_scale``,
            ``temperature``, ``logit_softcap``, ``backend`` (see ``sequence_logps``).

    Returns:
        ``PreferenceOutput`` with the mean loss, per-pair logps and rewards ``β·(s − s_ref)``,
        and ``.metrics()`` under TRL's names.

    Example:
        >>> h = torch.randn(4, 6, 16, requires_grad=True); W = torch.randn(50, 16)
        >>> y = torch.randint(0, 50, (4, 6)); y[:, :2] = -100
        >>> out = dpo_loss_fused(h, W, y, ref_hidden=torch.randn(4, 6, 16), beta=0.1)
        >>> out.loss.backward(); sorted(out.metrics())[0]
        'logps/chosen'
    """
    config = pair_loss_config(
        loss_type,
        loss_weights,
        beta=beta,
        label_smoothing=label_smoothing,
        rpo_alpha=rpo_alpha,
        ld_alpha=ld_alpha,
        use_weighting=use_weighting,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau,
    )
    num_pairs = check_paired_rows(labels, logp_kwargs.get("cu_seqlens"))
    if reference_free:
        reference = "none"
    else:
        reference = "required" if config.needs_reference else "optional"
    scored = score(
        hidden,
        weight,
        labels,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_logps=ref_logps,
        reference=reference,
        logp_kwargs=logp_kwargs,
        prefix_tokens=None if config.ld_alpha is None else _shared_length,
        log_sum_sq=config.use_weighting,
    )
    policy, ref = scored.policy, scored.ref_logps  # [2B] fp32 each (ref None: reference-free)
    logps = policy.logps
    if config.ld_alpha is not None:
        logps = ld_weighted(policy.logps, scored.prefix_logps, config.ld_alpha)
        if scored.ref_prefix_logps is not None:  # streamed; precomputed ones come weighted
            ref = ld_weighted(ref, scored.ref_prefix_logps, config.ld_alpha)
    stats = pair_stats(
        logps, ref, policy.num_tokens, log_sum_sq=scored.log_sum_sq, raw_logps=policy.logps
    )
    losses = combined_pair_losses(stats, config.params, config.loss_types, config.loss_weights)
    rewards = config.params.beta * torch.cat([stats.chosen_logratios, stats.rejected_logratios])
    rewards = rewards.detach()
    return paired_output(
        losses.mean(),
        LogpOutput(logps, policy.num_tokens),
        rewards[:num_pairs],
        rewards[num_pairs:],
        num_pairs,
    )


def _shared_length(num_tokens: torch.Tensor) -> torch.Tensor:
    """LD-DPO's public length ``min(n_w, n_l)`` for both rows of each pair: ``[2B] -> [2B]``."""
    pairs = num_tokens.shape[0] // 2
    shared = torch.minimum(num_tokens[:pairs], num_tokens[pairs:])
    return torch.cat([shared, shared])
