"""WPO (alone or with LD-DPO): pair losses that read per-token extras of the fold
(``Σ_t log Σ_v p²``, and a prefix sum), scored in one launch on the recompute path."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .._types import LogpOutput
from ..ops import score_streams
from ..options import LogpOptions
from ._common import PolicyAndReference
from .pair_config import PairLossConfig, pair_stats
from .pair_losses import PairStats, combined_pair_losses, ld_weighted


class ExtrasLoss(NamedTuple):
    """The loss, the policy sums it read (LD-weighted), and the pairs' stats (for rewards)."""

    loss: torch.Tensor  # scalar
    policy: LogpOutput  # [2B]
    stats: PairStats


def shared_length(num_tokens: torch.Tensor) -> torch.Tensor:
    """LD-DPO's public length ``min(n_w, n_l)`` for both rows of each pair: ``[2B] -> [2B]``."""
    pairs = num_tokens.shape[0] // 2
    shared = torch.minimum(num_tokens[:pairs], num_tokens[pairs:])
    return torch.cat([shared, shared])


def extras_pair_loss(
    streams: PolicyAndReference, *, config: PairLossConfig, options: LogpOptions
) -> ExtrasLoss:
    """A ``dpo_loss_fused`` selection with ``use_weighting`` (and optionally ``ld_alpha``) on
    ``streams`` (``policy_and_reference`` of the paired layout; with ``ld_alpha`` their
    ``prefix_tokens`` set): policy and reference (with their prefix sums) and the policy's
    ``log Σ p²`` from one launch."""
    if options.grad_mode == "store":
        warnings.warn(
            "grad_mode='store': use_weighting reads a per-token extra (log Σ p²) the store "
            "path does not form; using the recompute path",
            stacklevel=3,
        )
    policy, nograd, ref_logps = streams.policy, streams.nograd, streams.ref_logps
    policy.log_sum_sq = config.use_weighting
    scores = score_streams([policy, *nograd], options)
    logps, ref = scores[0].logps, ref_logps if not nograd else scores[1].logps
    if config.ld_alpha is not None:
        logps = ld_weighted(scores[0].logps, scores[0].prefix_logps, config.ld_alpha)
        if nograd:  # streamed; precomputed reference sums come LD-weighted
            ref = ld_weighted(ref, scores[1].prefix_logps, config.ld_alpha)
    num_tokens = scores[0].num_tokens
    stats = pair_stats(
        logps, ref, num_tokens, log_sum_sq=scores[0].log_sum_sq, raw_logps=scores[0].logps
    )
    losses = combined_pair_losses(stats, config.params, config.loss_types, config.loss_weights)
    return ExtrasLoss(losses.mean(), LogpOutput(logps, num_tokens), stats)
