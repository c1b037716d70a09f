"""DPO (Rafailov et al.) and every TRL 1.16 DPO loss type on fused log-probs.

``sigmoid``: ``−logσ(βΔ)``; with ``label_smoothing=ε > 0`` it is cDPO,
``−(1−ε)logσ(βΔ) − ε·logσ(−βΔ)`` (TRL and Liger ignore ε for ``sigmoid``). ``robust``
(Chowdhury et al. 2024): ``(−(1−ε)logσ(βΔ) + ε·logσ(−βΔ)) / (1−2ε)``. The other types,
their papers and formulas: ``pair_losses``. ``Δ = (s_w − s_w,ref) − (s_l − s_l,ref)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import checks
from ..options import LogpOptions
from ._common import (
    PreferenceOutput,
    num_sequences,
    paired_loss,
    paired_output,
    policy_and_reference,
)
from .pair_config import chosen_token_count, pair_loss_config, pair_unit_loss
from .pair_losses import PAIR_LOSS_TYPES
from .units import UnitLoss, UnitStats

LOSS_TYPES = tuple(PAIR_LOSS_TYPES)


def shared_length(num_tokens: torch.Tensor) -> torch.Tensor:
    """LD-DPO's public length ``min(n_w, n_l)`` for both rows of each pair: ``[2B] -> [2B]``."""
    pairs = num_tokens.shape[0] // 2
    shared = torch.minimum(num_tokens[:pairs], num_tokens[pairs:])
    return torch.cat([shared, shared])


def dpo_unit_loss(
    ref_logps: torch.Tensor | None, beta: float, loss_type: str, eps: float
) -> UnitLoss:
    """Per-pair DPO loss and its closed-form gradient over a group of pairs."""

    def margin(s: UnitStats) -> torch.Tensor:  # [k], Δ of each pair
        r = s.logps if ref_logps is None else s.logps - ref_logps[s.rows]
        k = r.numel() // 2
        return r[:k] - r[k:]

    def unit_loss(s: UnitStats) -> torch.Tensor:
        delta = margin(s)
        clean, flipped = -F.logsigmoid(beta * delta), -F.logsigmoid(-beta * delta)
        if loss_type == "sigmoid":
            return (1 - eps) * clean + eps * flipped
        return ((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)

    def unit_grad(s: UnitStats) -> torch.Tensor:
        delta = margin(s)
        # d(−logσ(βΔ))/dΔ = −β·σ(−βΔ); d(−logσ(−βΔ))/dΔ = β·σ(βΔ)
        clean, flipped = -beta * torch.sigmoid(-beta * delta), beta * torch.sigmoid(beta * delta)
        if loss_type == "sigmoid":
            d = (1 - eps) * clean + eps * flipped
        else:
            d = ((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)
        return torch.cat([d, -d])  # Δ = r_w − r_l

    return UnitLoss(unit_loss, unit_grad)


def _unit_loss_for(config, labels, cu_seqlens, options: LogpOptions):
    """``ref -> UnitLoss``: the closed-form DPO/robust unit for a plain single type, else the
    per-pair table (autograd on the group's small stats)."""
    plain = config.loss_types in (("sigmoid",), ("robust",)) and config.loss_weights == (1.0,)
    plain = plain and not config.use_weighting
    if plain and config.params.f_divergence_type == "reverse_kl":
        params = config.params
        return lambda ref: dpo_unit_loss(
            ref, params.beta, config.loss_types[0], params.label_smoothing
        )

    def make(ref):
        pairs = num_sequences(labels, cu_seqlens, "cu_seqlens") // 2
        chosen = 0
        if "sft" in config.loss_types:
            chosen = chosen_token_count(labels, cu_seqlens, options)
        return pair_unit_loss(config, ref, pairs, chosen)

    return make


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
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    options: LogpOptions | None = None,
) -> PreferenceOutput:
    """DPO loss from final hidden states and the lm_head, without full logits.

    Args:
        hidden: ``[2B, T, H]`` (or packed ``[N, H]`` with ``cu_seqlens`` of 2B sequences),
            rows ``[0, B)`` chosen and ``[B, 2B)`` rejected — TRL's concatenated layout.
        weight: lm_head ``[V, H]``. labels: ``[2B, T]`` with ``ignore_index`` on prompt/pad.
        ref_hidden / ref_weight / ref_bias: the reference model's hidden states (and lm_head,
            default ``weight``/``bias``), scored with no autograd state; or
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
            policy and streamed reference sums (a per-token weight; both gradient paths).
            ``logps/*`` and rewards read the weighted sums, the ``sft`` term the plain ones.
        use_weighting: WPO weights ``w_w·w_l``, ``w = exp(mean_t(log p_t − log Σ_v p_v²))``
            (detached), ``log Σ p²`` from the same fold (no extra GEMM; both gradient
            paths; with ``sft`` the pairs form one batch unit, as WPO scales it by the
            batch's mean weight).
        f_divergence_type, f_alpha_divergence_coef: f-DPO's divergence (``reverse_kl``,
            ``forward_kl``, ``js_divergence``, ``alpha_divergence``) and its α.
        discopop_tau: DiscoPOP's τ.
        bias, cu_seqlens: as in ``sequence_logps``.
        options: a ``fastalign.LogpOptions`` (None: the defaults): ``shift``,
            ``ignore_index``, the logit transform, ``backend``, and the gradient path:
            ``grad_mode="auto"`` takes the store path when the lm_head is trainable and one
            pair's fp32 logits fit ``store_budget_bytes``, the frozen-head path for a frozen
            head, else recompute; see ``fastalign.losses.units``.

    Returns:
        ``PreferenceOutput`` with the mean loss, per-pair logps and rewards ``β·(s − s_ref)``,
        and ``.metrics()`` under TRL's names. A pair with a chosen or rejected row without
        any scored token adds ``log 2``-like constants and no gradient; a UserWarning says so.

    Example:
        >>> h = torch.randn(4, 6, 16, requires_grad=True); W = torch.randn(50, 16)
        >>> y = torch.randint(0, 50, (4, 6)); y[:, :2] = -100
        >>> out = dpo_loss_fused(h, W, y, ref_hidden=torch.randn(4, 6, 16), beta=0.1)
        >>> out.loss.backward(); sorted(out.metrics())[0]
        'logps/chosen'
    """
    options = LogpOptions.of(options)
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
    checks.check_bool(reference_free, "reference_free")
    reference = "none" if reference_free else "optional"
    if not reference_free and config.needs_reference:
        reference = "required"
    streams = policy_and_reference(
        hidden, weight, labels, rows=None, bias=bias, cu_seqlens=cu_seqlens,
        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps,
        reference=reference,
    )  # fmt: skip
    if config.ld_alpha is not None:  # LD-DPO: policy and streamed reference weight tokens
        for stream in (streams.policy, *streams.nograd):
            stream.prefix_tokens, stream.tail_weight = shared_length, config.ld_alpha
    streams.policy.log_sum_sq = config.use_weighting  # WPO: log Σ p² from the same fold
    make_unit_loss = _unit_loss_for(config, labels, cu_seqlens, options)
    result, ref = paired_loss(
        streams, options=options, make_unit_loss=make_unit_loss, name="dpo_loss_fused",
        unit=config.unit,
    )  # fmt: skip
    loss, policy = result.loss, result.policy[0]
    logratios = policy.logps.detach() if ref is None else policy.logps.detach() - ref
    rewards = config.params.beta * logratios
    num_pairs = rewards.numel() // 2
    return paired_output(loss, policy, rewards[:num_pairs], rewards[num_pairs:], num_pairs)
