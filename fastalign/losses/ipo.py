"""IPO (Azar et al. 2024): squared regression of the log-ratio margin onto 1/(2β)."""

from __future__ import annotations

import torch

from .. import checks
from ..options import LogpOptions
from ._common import (
    PreferenceOutput,
    check_beta,
    paired_loss,
    paired_output,
    policy_and_reference,
)
from .units import UnitLoss, UnitStats


def ipo_unit_loss(ref_logps: torch.Tensor, beta: float, length_normalize: bool) -> UnitLoss:
    """Per-pair IPO loss ``(h − 1/(2β))²`` and its closed-form gradient."""

    def scale(s: UnitStats) -> torch.Tensor:  # [n], ∂score/∂logps
        if not length_normalize:
            return torch.ones_like(s.logps)
        return 1.0 / s.num_tokens.clamp_min(1).to(s.logps.dtype)

    def centred_margin(s: UnitStats) -> torch.Tensor:  # [k], h − 1/(2β)
        scores = (s.logps - ref_logps[s.rows]) * scale(s)
        k = scores.numel() // 2
        return scores[:k] - scores[k:] - 1.0 / (2.0 * beta)

    def unit_grad(s: UnitStats) -> torch.Tensor:
        d = 2.0 * centred_margin(s)
        return torch.cat([d, -d]) * scale(s)

    return UnitLoss(lambda s: centred_margin(s) ** 2, unit_grad)


def ipo_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    length_normalize: bool = True,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    options: LogpOptions | None = None,
) -> PreferenceOutput:
    """IPO loss ``mean((h − 1/(2β))²)`` with ``h = r_w − r_l``, ``r = s − s_ref``.

    ``length_normalize=True`` (TRL's convention) uses per-token means ``r/n`` with ``n`` the
    scored-token count of each sequence (at least 1); ``False`` gives the paper's sums (eq. 17
    of Azar et al.). Layout, reference options and ``options`` (a ``LogpOptions``) as in
    ``dpo_loss_fused``; rewards are ``β·r`` (unnormalised, as
    TRL reports them).

    Example:
        >>> h = torch.randn(2, 5, 8, requires_grad=True); W = torch.randn(30, 8)
        >>> y = torch.randint(0, 30, (2, 5))
        >>> ipo_loss_fused(h, W, y, ref_logps=torch.zeros(2), beta=0.5).loss.backward()
    """
    options = LogpOptions.of(options)
    beta = check_beta(beta)
    checks.check_bool(length_normalize, "length_normalize")
    streams = policy_and_reference(
        hidden, weight, labels, rows=None, bias=bias, cu_seqlens=cu_seqlens,
        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps,
        reference="required",
    )  # fmt: skip
    result, ref = paired_loss(
        streams,
        options=options,
        make_unit_loss=lambda ref: ipo_unit_loss(ref, beta, length_normalize),
        name="ipo_loss_fused",
    )
    policy = result.policy[0]
    rewards = beta * (policy.logps.detach() - ref)
    num_pairs = rewards.numel() // 2
    return paired_output(result.loss, policy, rewards[:num_pairs], rewards[num_pairs:], num_pairs)
