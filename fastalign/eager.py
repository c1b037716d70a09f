"""The eager reference: full logits, ``log_softmax``, gather, and the eager losses.

What training code writes today (TRL's ``concatenated_forward`` and loss formulas), kept in
one place for the demo, the benchmarks and the memory check to measure against. It is not
the test oracle: the float64 references of the tests live in ``tests/``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class EagerLogps(NamedTuple):
    """Per-sequence sums of token log-probs ``[B]`` (fp32) and scored tokens ``[B]``."""

    logps: torch.Tensor  # [B]
    num_tokens: torch.Tensor  # [B] int64


def logits_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> EagerLogps:
    """Masked sums of ``log_softmax(logits.float())`` at the labels.

    Args:
        logits: ``[B, T, V]`` in any float dtype (upcast to fp32, as TRL does).
        labels: ``[B, T]`` int64 token ids; ``ignore_index`` marks unscored positions.

    Example:
        >>> out = logits_logps(torch.zeros(1, 2, 4), torch.tensor([[3, -100]]))
        >>> round(out.logps.item(), 4), out.num_tokens.item()
        (-1.3863, 1)
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V] fp32
    mask = labels != ignore_index
    token = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # [B, T]
    return EagerLogps((token * mask).sum(-1), mask.sum(-1))


def eager_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> EagerLogps:
    """Full logits ``hidden @ weight.T`` (``[B, T, V]`` in the hidden dtype), then
    :func:`logits_logps`.

    Args:
        hidden: ``[B, T, H]`` final hidden states.
        weight: ``[V, H]`` lm_head weight.
        labels: ``[B, T]`` target ids, ``ignore_index`` where not scored.

    Example:
        >>> out = eager_logps(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3).long())
        >>> out.logps.shape, out.num_tokens.tolist()
        (torch.Size([2]), [3, 3])
    """
    return logits_logps(hidden @ weight.T, labels, ignore_index)


def dpo_loss(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """``mean(−logsigmoid(β·(r_w − r_l)))``, ``r = policy − ref`` per sequence ``[2P]``
    (chosen rows first, TRL's concatenated layout). Rafailov et al., 2023."""
    r = policy - ref
    pairs = r.shape[0] // 2
    return -F.logsigmoid(beta * (r[:pairs] - r[pairs:])).mean()


def ipo_loss(
    policy: torch.Tensor, ref: torch.Tensor, num_tokens: torch.Tensor, beta: float
) -> torch.Tensor:
    """``mean((r_w − r_l − 1/(2β))²)`` on length-normalised log-ratios ``[2P]``.
    Azar et al., 2023."""
    r = (policy - ref) / num_tokens.clamp_min(1)
    pairs = r.shape[0] // 2
    return ((r[:pairs] - r[pairs:] - 1 / (2 * beta)) ** 2).mean()


def kto_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    kl_policy: torch.Tensor,
    kl_ref: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """KTO with unit class weights: the reference point ``z0 = max(mean(kl_policy − kl_ref),
    0)`` from the mismatched rows; ``1 − σ(β(r − z0))`` for desirable rows, ``1 − σ(β(z0 −
    r))`` otherwise (all ``[B]``; ``desirable`` bool). Ethayarajh et al., 2024."""
    z0 = (kl_policy - kl_ref).mean().clamp_min(0)
    r = policy - ref
    return torch.where(
        desirable, 1 - torch.sigmoid(beta * (r - z0)), 1 - torch.sigmoid(beta * (z0 - r))
    ).mean()


def typo_loss(
    policy: torch.Tensor, sample: torch.Tensor | None = None, lam: float = 0.0
) -> torch.Tensor:
    """TYPO: ``mean(softplus(s_l − s_w)) − lam · mean(s_sample)`` (policy ``[2P]``, chosen
    first; ``sample`` ``[S]`` the sampled rows' sums, omitted with ``lam=0``)."""
    pairs = policy.shape[0] // 2
    loss = F.softplus(policy[pairs:] - policy[:pairs]).mean()
    if sample is not None:
        loss = loss - lam * sample.mean()
    return loss
