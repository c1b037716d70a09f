"""DPO (Rafailov et al.) with its label-noise variants, on fused log-probs.

``sigmoid``: ``−logσ(βΔ)``; with ``label_smoothing=ε > 0`` it is cDPO,
``−(1−ε)logσ(βΔ) − ε·logσ(−βΔ)``. ``robust`` (Chowdhury et al. 2024):
``(−(1−ε)logσ(βΔ) + ε·logσ(−βΔ)) / (1−2ε)``. ``Δ = (s_w − s_w,ref) − (s_l − s_l,ref)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validate as V
from ._common import PreferenceOutput, check_beta, check_paired_rows, paired_output, score

LOSS_TYPES = ("sigmoid", "robust")


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
    **logp_kwargs,
) -> PreferenceOutput:
    """DPO loss from final hidden states and the lm_head, without full logits.

    Args:
        hidden: ``[2B, T, H]`` (or packed ``[N, H]`` with ``cu_seqlens`` of 2B sequences),
            rows ``[0, B)`` chosen and ``[B, 2B)`` rejected — TRL's concatenated layout.
        weight: lm_head ``[V, H]``. labels: ``[2B, T]`` with ``ignore_index`` on prompt/pad.
        ref_hidden / ref_weight: the reference model's hidden states (and lm_head, default
            ``weight``), scored in the same launch with no autograd state; or
        ref_logps: precomputed reference sums ``[2B]``. Exactly one unless ``reference_free``.
        beta: β > 0. loss_type: ``"sigmoid"`` or ``"robust"``.
        label_smoothing: ε in [0, 0.5) (cDPO for sigmoid, the robust loss's noise rate).
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
    beta = check_beta(beta)
    V.check_choice(loss_type, "loss_type", LOSS_TYPES)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a number, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    num_pairs = check_paired_rows(labels, logp_kwargs.get("cu_seqlens"))
    scored = score(
        hidden,
        weight,
        labels,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_logps=ref_logps,
        reference="none" if reference_free else "required",
        logp_kwargs=logp_kwargs,
    )
    logratios = scored.policy.logps  # [2B] fp32, r = s − s_ref (or s when reference-free)
    if scored.ref_logps is not None:
        logratios = logratios - scored.ref_logps
    delta = logratios[:num_pairs] - logratios[num_pairs:]  # [B]
    eps = float(label_smoothing)
    clean = -F.logsigmoid(beta * delta)
    flipped = -F.logsigmoid(-beta * delta)
    if loss_type == "sigmoid":
        losses = (1 - eps) * clean + eps * flipped
    else:
        losses = ((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)
    rewards = beta * logratios.detach()
    return paired_output(
        losses.mean(), scored.policy, rewards[:num_pairs], rewards[num_pairs:], num_pairs
    )
