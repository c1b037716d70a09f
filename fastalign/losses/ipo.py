"""IPO (Azar et al. 2024): squared regression of the log-ratio margin onto 1/(2β)."""

from __future__ import annotations

import torch

from ._common import PreferenceOutput, check_beta, check_paired_rows, paired_output, score


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
    **logp_kwargs,
) -> PreferenceOutput:
    """IPO loss ``mean((h − 1/(2β))²)`` with ``h = r_w − r_l``, ``r = s − s_ref``.

    ``length_normalize=True`` (TRL's convention) uses per-token means ``r/n`` with ``n`` the
    scored-token count of each sequence (at least 1); ``False`` gives the paper's sums (eq. 17
    of Azar et al.). Layout, reference options and ``**logp_kwargs`` as in ``dpo_loss_fused``;
    rewards are ``β·r`` (unnormalised, as TRL reports them).

    Example:
        >>> h = torch.randn(2, 5, 8, requires_grad=True); W = torch.randn(30, 8)
        >>> y = torch.randint(0, 30, (2, 5))
        >>> ipo_loss_fused(h, W, y, ref_logps=torch.zeros(2), beta=0.5).loss.backward()
    """
    beta = check_beta(beta)
    if not isinstance(length_normalize, bool):
        raise TypeError(f"length_normalize must be a bool, got {type(length_normalize).__name__}")
    num_pairs = check_paired_rows(labels, logp_kwargs.get("cu_seqlens"))
    scored = score(
        hidden,
        weight,
        labels,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_logps=ref_logps,
        reference="required",
        logp_kwargs=logp_kwargs,
    )
    logratios = scored.policy.logps - scored.ref_logps  # [2B] fp32
    scores = logratios
    if length_normalize:
        scores = logratios / scored.policy.num_tokens.clamp_min(1).to(logratios.dtype)
    margin = scores[:num_pairs] - scores[num_pairs:]  # [B], h of the paper
    loss = ((margin - 1.0 / (2.0 * beta)) ** 2).mean()
    rewards = beta * logratios.detach()
    return paired_output(loss, scored.policy, rewards[:num_pairs], rewards[num_pairs:], num_pairs)
