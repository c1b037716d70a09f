"""DPO (Rafailov et al.) with its label-noise variants, on fused log-probs.

``sigmoid``: ``−logσ(βΔ)``; with ``label_smoothing=ε > 0`` it is cDPO,
``−(1−ε)logσ(βΔ) − ε·logσ(−βΔ)``. ``robust`` (Chowdhury et al. 2024):
``(−(1−ε)logσ(βΔ) + ε·logσ(−βΔ)) / (1−2ε)``. ``Δ = (s_w − s_w,ref) − (s_l − s_l,ref)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks
from ._common import PreferenceOutput, check_beta, paired_loss, paired_output
from .units import LogpOptions, UnitLoss, UnitStats

LOSS_TYPES = ("sigmoid", "robust")


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


def dpo_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    shift: bool = False,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    backend: str = "auto",
    grad_mode: str = "auto",
    store_budget_bytes: int | None = None,
) -> PreferenceOutput:
    """DPO loss from final hidden states and the lm_head, without full logits.

    Args:
        hidden: ``[2B, T, H]`` (or packed ``[N, H]`` with ``cu_seqlens`` of 2B sequences),
            rows ``[0, B)`` chosen and ``[B, 2B)`` rejected — TRL's concatenated layout.
        weight: lm_head ``[V, H]``. labels: ``[2B, T]`` with ``ignore_index`` on prompt/pad.
        ref_hidden / ref_weight / ref_bias: the reference model's hidden states (and lm_head,
            default ``weight``/``bias``), scored with no autograd state; or
        ref_logps: precomputed reference sums ``[2B]``. Exactly one unless ``reference_free``.
        beta: β > 0. loss_type: ``"sigmoid"`` or ``"robust"``.
        label_smoothing: ε in [0, 0.5) (cDPO for sigmoid, the robust loss's noise rate).
        bias, cu_seqlens, shift, ignore_index, logit_scale, temperature, logit_softcap,
            backend: as in ``sequence_logps``.
        grad_mode: ``"auto"`` (the store path when the lm_head is trainable and one pair's
            fp32 logits fit ``store_budget_bytes``; the frozen-head path for a frozen head;
            else recompute), ``"store"`` or ``"recompute"``; see ``fastalign.losses.units``.
        store_budget_bytes: the store path's group budget (default
            ``fastalign.tiles.STORE_GROUP_BUDGET_BYTES`` for the device).

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
    options = LogpOptions.pick(locals())  # before any other local name exists
    beta = check_beta(beta)
    checks.check_choice(loss_type, "loss_type", LOSS_TYPES)
    eps = float(
        checks.check_number(label_smoothing, "label_smoothing", low=0, high=0.5, high_open=True)
    )
    checks.check_bool(reference_free, "reference_free")
    result, ref = paired_loss(
        hidden,
        weight,
        labels,
        reference="none" if reference_free else "required",
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_logps=ref_logps,
        ref_bias=ref_bias,
        bias=bias,
        cu_seqlens=cu_seqlens,
        options=options,
        make_unit_loss=lambda ref: dpo_unit_loss(ref, beta, loss_type, eps),
        name="dpo_loss_fused",
    )
    policy = result.policy[0]
    logratios = policy.logps.detach() if ref is None else policy.logps.detach() - ref
    rewards = beta * logratios
    num_pairs = rewards.numel() // 2
    return paired_output(result.loss, policy, rewards[:num_pairs], rewards[num_pairs:], num_pairs)
