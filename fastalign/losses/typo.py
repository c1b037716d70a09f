"""TYPO (Hu, He, Wipf, "New Desiderata for DPO", eq. 14–17): reference-free pairwise term
plus a KL(π_ref‖π_θ) regulariser estimated on responses pre-sampled from the reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import checks
from .._types import LogpOutput
from ..options import LogpOptions
from ..streams import StreamInput
from ._common import (
    PreferenceOutput,
    check_paired_rows,
    num_sequences,
    paired_output,
    warn_unscored_pairs,
)
from .units import PolicyTerm, UnitLoss, UnitStats, fused_loss

SAMPLE_NAMES = {
    "hidden": "sample_hidden",
    "labels": "sample_labels",
    "cu_seqlens": "sample_cu_seqlens",
    "weight": "weight",
    "bias": "bias",
}


@dataclass
class TYPOOutput(PreferenceOutput):
    """``PreferenceOutput`` plus the sample stream's sums ``sample_logps [S]`` (detached)."""

    sample_logps: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        if self.sample_logps is not None and self.sample_logps.numel():
            out["logps/sample"] = float(self.sample_logps.mean())
        return out


def typo_unit_losses(lam: float) -> tuple[UnitLoss, UnitLoss]:
    """The pair term ``softplus(s_l − s_w)`` and the sample term ``−lam·s`` (per sample),
    each with its closed-form gradient."""

    def pair_margin(s: UnitStats) -> torch.Tensor:  # [k], s_l − s_w
        k = s.logps.numel() // 2
        return s.logps[k:] - s.logps[:k]

    def pair_grad(s: UnitStats) -> torch.Tensor:
        d = torch.sigmoid(pair_margin(s))  # softplus' = σ
        return torch.cat([-d, d])

    pairs = UnitLoss(lambda s: F.softplus(pair_margin(s)), pair_grad)
    samples = UnitLoss(lambda s: -lam * s.logps, lambda s: torch.full_like(s.logps, -lam))
    return pairs, samples


def typo_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    sample_hidden: torch.Tensor | None = None,
    sample_labels: torch.Tensor | None = None,
    sample_cu_seqlens: torch.Tensor | None = None,
    lam: float = 0.05,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    options: LogpOptions | None = None,
) -> TYPOOutput:
    """TYPO loss ``mean(softplus(s_l − s_w)) + lam · mean(−s_sample)``.

    ``softplus(s_l − s_w) = log(1 + π(y_l)/π(y_w))`` (eq. 16) needs no reference model;
    ``−s_sample`` (eq. 17) is the policy's NLL of responses sampled from the reference,
    ``sample_hidden``/``sample_labels`` (``[S, T', H]``/``[S, T']``, or packed with
    ``sample_cu_seqlens``), scored by the policy in the same launch as the pairs and
    differentiable. With ``lam=0`` the samples may be omitted. Layout and ``options`` (a
    ``LogpOptions``) as in ``dpo_loss_fused`` (gradient units: a pair, and a sample); rewards
    are the policy sums ``s`` (the loss is reference-free).

    Example:
        >>> h = torch.randn(2, 5, 8, requires_grad=True); W = torch.randn(30, 8)
        >>> y = torch.randint(0, 30, (2, 5))
        >>> out = typo_loss_fused(h, W, y, sample_hidden=torch.randn(3, 4, 8),
        ...                       sample_labels=torch.randint(0, 30, (3, 4)), lam=0.1)
        >>> out.loss.backward()
    """
    options = LogpOptions.of(options)
    lam = float(checks.check_number(lam, "lam", low=0))
    if (sample_hidden is None) != (sample_labels is None):
        missing = "sample_labels" if sample_labels is None else "sample_hidden"
        raise ValueError(f"{missing} is required when the other sample argument is given")
    if sample_hidden is None and lam > 0:
        raise ValueError(
            "sample_hidden and sample_labels (responses sampled from the reference policy) "
            "are required when lam > 0; pass lam=0 to train on the pairwise term alone"
        )
    num_pairs = check_paired_rows(labels, cu_seqlens)
    terms = [
        PolicyTerm(StreamInput(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens), "pair")
    ]
    if sample_hidden is not None:
        checks.check_tensor(sample_hidden, "sample_hidden")
        checks.check_tensor(sample_labels, "sample_labels")
        if num_sequences(sample_labels, sample_cu_seqlens, "sample_cu_seqlens") == 0:
            raise ValueError("sample_labels holds no sequence")
        sample = StreamInput(
            sample_hidden, weight, sample_labels, bias=bias, cu_seqlens=sample_cu_seqlens,
            names=SAMPLE_NAMES,
        )  # fmt: skip
        terms.append(PolicyTerm(sample, "row"))
    unit_losses = typo_unit_losses(lam)[: len(terms)]

    def build(scored: list[LogpOutput]) -> list[UnitLoss]:
        return list(unit_losses)

    result = fused_loss(terms, [], build, options)
    policy = result.policy[0]
    warn_unscored_pairs(policy.num_tokens, num_pairs, "typo_loss_fused", stacklevel=3)
    rewards = policy.logps.detach()
    base = paired_output(result.loss, policy, rewards[:num_pairs], rewards[num_pairs:], num_pairs)
    sample_logps = result.policy[1].logps.detach() if len(terms) > 1 else None
    return TYPOOutput(
        **{f: getattr(base, f) for f in base.__dataclass_fields__}, sample_logps=sample_logps
    )
