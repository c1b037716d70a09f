"""The log-prob part every loss shares: streams into one launch, reference handling, checks."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .. import _validate as V
from .._types import LogpOutput
from ..ops import (
    StreamInput,
    reference_stream,
    score_streams,  # noqa: F401  (the trainer calls losses._common.score_streams)
    score_streams_full,
)

# Keyword arguments forwarded to the core op (``**logp_kwargs`` of every loss).
SHARED_KWARGS = ("shift", "ignore_index", "logit_scale", "temperature", "logit_softcap", "backend")
STREAM_KWARGS = ("bias", "cu_seqlens")


def split_logp_kwargs(logp_kwargs: dict) -> tuple[dict, dict]:
    """``(stream kwargs, shared kwargs)``; unknown names raise a TypeError naming them."""
    unknown = set(logp_kwargs) - set(SHARED_KWARGS) - set(STREAM_KWARGS) - {"ref_bias"}
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {sorted(unknown)}; the log-prob options are "
            f"{', '.join(STREAM_KWARGS + ('ref_bias',) + SHARED_KWARGS)}"
        )
    stream = {k: v for k, v in logp_kwargs.items() if k in STREAM_KWARGS}  # ref_bias: score()
    shared = {k: v for k, v in logp_kwargs.items() if k in SHARED_KWARGS}
    return stream, shared


@dataclass
class Scored:
    """What a loss gets back from :func:`score`."""

    policy: LogpOutput  # differentiable
    ref_logps: torch.Tensor | None  # [rows] fp32, detached; None when reference-free
    extra: list[LogpOutput]  # the extra streams, in order
    # Asked for with score(prefix_tokens=..., log_sum_sq=True): policy (differentiable) and
    # streamed reference prefix sums, the policy's Σ_t log Σ_v p² (detached); [rows] fp32.
    prefix_logps: torch.Tensor | None = None
    ref_prefix_logps: torch.Tensor | None = None
    log_sum_sq: torch.Tensor | None = None


def score(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor | None,
    ref_weight: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    reference: str,
    extra: list[StreamInput] = (),
    extra_uses_ref_head: bool = False,
    logp_kwargs: dict,
    prefix_tokens=None,
    log_sum_sq: bool = False,
) -> Scored:
    """Score the policy rows, their reference (if streamed) and ``extra`` in one launch.

    ``reference`` is ``"required"`` (exactly one of ``ref_hidden``/``ref_logps``),
    ``"optional"`` (at most one) or ``"none"`` (neither accepted). ``ref_weight``/``ref_bias``
    need a streamed reference: ``ref_hidden``, or one in ``extra`` (``extra_uses_ref_head``).
    ``prefix_tokens`` / ``log_sum_sq``: per-sequence extras of the policy (and prefix sums of
    the streamed reference), see ``ops.StreamInput``.
    """
    logp_kwargs = dict(logp_kwargs)
    ref_bias = logp_kwargs.pop("ref_bias", None)  # the reference lm_head's bias, with ref_weight
    stream_kwargs, shared = split_logp_kwargs(logp_kwargs)
    given = [
        name for name, v in (("ref_hidden", ref_hidden), ("ref_logps", ref_logps)) if v is not None
    ]
    if reference == "required" and len(given) != 1:
        raise ValueError(
            "give exactly one reference: ref_hidden (streamed in the same launch) or "
            f"ref_logps (precomputed); got {' and '.join(given) if given else 'neither'}"
        )
    if reference != "required" and len(given) > 1:
        raise ValueError("give at most one of ref_hidden and ref_logps, not both")
    if reference == "none" and given:
        raise ValueError(f"{given[0]} is not used by this loss (it is reference-free)")
    for name, value in (("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if value is not None and ref_hidden is None and not extra_uses_ref_head:
            raise ValueError(f"{name} was given without ref_hidden")
    streams = [
        StreamInput(
            hidden,
            weight,
            labels,
            **stream_kwargs,
            prefix_tokens=prefix_tokens,
            log_sum_sq=log_sum_sq,
        )
    ]
    if ref_hidden is not None:
        streams.append(
            reference_stream(
                ref_hidden,
                ref_weight,
                ref_bias,
                weight=weight,
                bias=stream_kwargs.get("bias"),
                labels=labels,
                cu_seqlens=stream_kwargs.get("cu_seqlens"),
            )
        )
        streams[-1].prefix_tokens = prefix_tokens
    streams.extend(extra)
    full = score_streams_full(streams, **shared)
    outputs = [LogpOutput(out.logps, out.num_tokens) for out in full]
    policy = outputs[0]
    num_rows = policy.logps.shape[0]
    if ref_hidden is not None:
        ref = outputs[1].logps
    elif ref_logps is not None:
        ref = check_logps(ref_logps, "ref_logps", num_rows, policy.logps.device)
    else:
        ref = None
    return Scored(
        policy=policy,
        ref_logps=ref,
        extra=outputs[1 + (ref_hidden is not None) :],
        prefix_logps=full[0].prefix_logps,
        ref_prefix_logps=full[1].prefix_logps if ref_hidden is not None else None,
        log_sum_sq=full[0].log_sum_sq,
    )


def check_logps(value, name: str, rows: int, device: torch.device) -> torch.Tensor:
    """A precomputed per-sequence log-prob tensor: ``[rows]`` floats, detached, fp32."""
    V.check_tensor(value, name)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.shape != (rows,):
        raise ValueError(f"{name} must have shape [{rows}], got {tuple(value.shape)}")
    V.check_same_device(value, name, device)
    return value.detach().float()


def check_beta(beta) -> float:
    """β as a float; not a finite number > 0 raises naming ``beta``."""
    V.check_positive(beta, "beta")
    return float(beta)


def num_sequences(labels: torch.Tensor, cu_seqlens, cu_name: str) -> int:
    """Rows of padded ``labels [B, T]``, or ``B`` of packed ``cu_seqlens [B + 1]``."""
    if cu_seqlens is None:
        return labels.shape[0]
    V.check_tensor(cu_seqlens, cu_name)
    return max(cu_seqlens.numel() - 1, 0)


def check_paired_rows(labels: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    """Number of pairs B of the concatenated layout (rows [0, B) chosen, [B, 2B) rejected)."""
    V.check_tensor(labels, "labels")
    rows = num_sequences(labels, cu_seqlens, "cu_seqlens")
    if rows == 0 or rows % 2:
        raise ValueError(
            f"the paired layout needs an even, non-zero number of sequences (rows [0, B) chosen, "
            f"[B, 2B) rejected); got {rows}"
        )
    return rows // 2


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Mean of ``values[mask]`` as a float, None when the mask is empty."""
    if not bool(mask.any()):
        return None
    return float(values[mask].float().mean())


@dataclass
class PreferenceOutput:
    """Result of a paired loss (DPO, IPO, TYPO): the loss and detached per-pair values.

    ``loss`` is a differentiable scalar; every other tensor is ``[B]`` and detached.
    ``metrics()`` gives TRL's names and values for the batch.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_num_tokens: torch.Tensor
    rejected_num_tokens: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """TRL's metric names: rewards/{chosen,rejected,accuracies,margins}, logps/*."""
        return {
            "rewards/chosen": float(self.chosen_rewards.mean()),
            "rewards/rejected": float(self.rejected_rewards.mean()),
            "rewards/accuracies": float(
                (self.chosen_rewards > self.rejected_rewards).float().mean()
            ),
            "rewards/margins": float((self.chosen_rewards - self.rejected_rewards).mean()),
            "logps/chosen": float(self.chosen_logps.mean()),
            "logps/rejected": float(self.rejected_logps.mean()),
        }

    def __iter__(self):  # allows ``loss, *rest = out`` like a tuple
        return iter(getattr(self, f.name) for f in fields(self))


def paired_output(
    loss: torch.Tensor,
    policy: LogpOutput,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    num_pairs: int,
) -> PreferenceOutput:
    """Split ``[2B]`` per-row values into the chosen ``[0, B)`` and rejected ``[B, 2B)`` halves."""
    logps = policy.logps.detach()  # [2B]
    return PreferenceOutput(
        loss=loss,
        chosen_logps=logps[:num_pairs],
        rejected_logps=logps[num_pairs:],
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        chosen_num_tokens=policy.num_tokens[:num_pairs],
        rejected_num_tokens=policy.num_tokens[num_pairs:],
    )
