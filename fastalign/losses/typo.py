"""TYPO (Hu, He, Wipf, "New Desiderata for DPO", eq. 14–17): reference-free pairwise term
plus a KL(π_ref‖π_θ) regulariser estimated on responses pre-sampled from the reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _validate as V
from ..ops import StreamInput
from ._common import PreferenceOutput, check_paired_rows, paired_output, score, split_logp_kwargs

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


def typo_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    sample_hidden: torch.Tensor | None = None,
    sample_labels: torch.Tensor | None = None,
    sample_cu_seqlens: torch.Tensor | None = None,
    lam: float = 0.05,
    **logp_kwargs,
) -> TYPOOutput:
    """TYPO loss ``mean(softplus(s_l − s_w)) + lam · mean(−s_sample)``.

    ``softplus(s_l − s_w) = log(1 + π(y_l)/π(y_w))`` (eq. 16) needs no reference model;
    ``−s_sample`` (eq. 17) is the policy's NLL of responses sampled from the reference,
    ``sample_hidden``/``sample_labels`` (``[S, T', H]``/``[S, T']``, or packed with
    ``sample_cu_seqlens``), scored by the policy in the same launch as the pairs and
    differentiable. With ``lam=0`` the samples may be omitted. Layout and ``**logp_kwargs``
    as in ``dpo_loss_fused``; rewards are the policy sums ``s`` (the loss is reference-free).

    Example:
        >>> h = torch.randn(2, 5, 8, requires_grad=True); W = torch.randn(30, 8)
        >>> y = torch.randint(0, 30, (2, 5))
        >>> out = typo_loss_fused(h, W, y, sample_hidden=torch.randn(3, 4, 8),
        ...                       sample_labels=torch.randint(0, 30, (3, 4)), lam=0.1)
        >>> out.loss.backward()
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a number, got {type(lam).__name__}")
    if not (lam >= 0 and lam != float("inf")):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if (sample_hidden is None) != (sample_labels is None):
        missing = "sample_labels" if sample_labels is None else "sample_hidden"
        raise ValueError(f"{missing} is required when the other sample argument is given")
    if sample_hidden is None and lam > 0:
        raise ValueError(
            "sample_hidden and sample_labels (responses sampled from the reference policy) "
            "are required when lam > 0; pass lam=0 to train on the pairwise term alone"
        )
    num_pairs = check_paired_rows(labels, logp_kwargs.get("cu_seqlens"))
    extra = []
    if sample_hidden is not None:
        V.check_tensor(sample_hidden, "sample_hidden")
        stream_kwargs, _ = split_logp_kwargs(logp_kwargs)
        extra.append(
            StreamInput(
                sample_hidden,
                weight,
                sample_labels,
                bias=stream_kwargs.get("bias"),
                cu_seqlens=sample_cu_seqlens,
                names=SAMPLE_NAMES,
            )
        )
    scored = score(
        hidden,
        weight,
        labels,
        ref_hidden=None,
        ref_weight=None,
        ref_logps=None,
        reference="none",
        extra=extra,
        logp_kwargs=logp_kwargs,
    )
    logps = scored.policy.logps  # [2B] fp32
    loss = F.softplus(logps[num_pairs:] - logps[:num_pairs]).mean()
    sample_logps = None
    if extra:
        sample_logps = scored.extra[0].logps  # [S] fp32, differentiable
        if sample_logps.numel() == 0:
            raise ValueError("sample_labels holds no sequence")
        loss = loss + lam * (-sample_logps).mean()
    rewards = logps.detach()
    base = paired_output(loss, scored.policy, rewards[:num_pairs], rewards[num_pairs:], num_pairs)
    return TYPOOutput(
        **{f: getattr(base, f) for f in base.__dataclass_fields__},
        sample_logps=None if sample_logps is None else sample_logps.detach(),
    )
