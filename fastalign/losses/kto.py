"""KTO (Ethayarajh et al. 2024) with its mismatched-pair reference point z0 in the same launch.

``r = s − s_ref``; ``z0 = max(0, mean_i(s_θ(y_j|x_i) − s_ref(y_j|x_i)))`` over mismatched
pairs ``j = (i+1) mod m`` of the microbatch (paper §4.1), detached and averaged over the data
parallel group; loss ``λ_D(1 − σ(β(r − z0)))`` for desirable rows,
``λ_U(1 − σ(β(z0 − r)))`` for undesirable ones, mean over the batch.
``loss_type="apo_zero_unpaired"`` (APO, TRL's KTO variant) needs no z0: ``unpaired_losses``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import checks
from .._types import LogpOutput
from ..options import LogpOptions
from ..streams import StreamInput, reference_stream
from ._common import check_beta, check_logps, masked_mean, num_sequences, policy_and_reference
from .units import PolicyTerm, UnitLoss, UnitStats, fused_loss
from .unpaired_losses import ROW_LOSS_TYPES, RowParams, row_unit_loss

KL_NAMES = {
    "hidden": "kl_hidden",
    "weight": "weight",
    "labels": "kl_labels",
    "bias": "bias",
    "cu_seqlens": "kl_cu_seqlens",
}
KL_REF_NAMES = {**KL_NAMES, "hidden": "kl_ref_hidden", "weight": "ref_weight"}
# Eq. (7) of the paper: λ_D·n_D / (λ_U·n_U) ∈ [1, 3/2].
RATIO_RANGE = (1.0, 1.5)


@dataclass
class KTOOutput:
    """Result of ``kto_loss_fused``: the loss and detached per-example values.

    ``logps``/``rewards``/``num_tokens`` are ``[B]``; ``kl`` is the z0 used (scalar tensor).
    """

    loss: torch.Tensor
    logps: torch.Tensor
    rewards: torch.Tensor
    desirable: torch.Tensor
    kl: torch.Tensor
    num_tokens: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """TRL's KTO names and values: ``kl``, ``rewards/{chosen,rejected,margins}``,
        ``logps/{chosen,rejected}``, class means only for classes present in the batch (as
        TRL logs them); plus ``count/{chosen,rejected}``, this batch's class sizes."""
        out = {"kl": float(self.kl)}
        undesirable = ~self.desirable
        for name, mask in (("chosen", self.desirable), ("rejected", undesirable)):
            out[f"count/{name}"] = float(mask.sum())
            reward = masked_mean(self.rewards, mask)
            if reward is not None:
                out[f"rewards/{name}"] = reward
                out[f"logps/{name}"] = masked_mean(self.logps, mask)
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def kto_class_weights(
    n_desirable: int, n_undesirable: int, target_ratio: float = 1.0
) -> tuple[float, float]:
    """``(λ_D, λ_U)`` with ``λ_D·n_D / (λ_U·n_U) = target_ratio`` (paper eq. 7: in [1, 3/2]).

    The smaller weight is 1 and the other class is up-weighted, as in the paper's example
    (1:10 desirable:undesirable → λ_U = 1, λ_D ∈ [10, 15]).

    Example:
        >>> kto_class_weights(100, 1000, target_ratio=1.0)
        (10.0, 1.0)
    """
    checks.check_number(n_desirable, "n_desirable", integer=True, low=1)
    checks.check_number(n_undesirable, "n_undesirable", integer=True, low=1)
    checks.check_number(target_ratio, "target_ratio", low=0, low_open=True)
    if not RATIO_RANGE[0] <= target_ratio <= RATIO_RANGE[1]:
        warnings.warn(
            f"target_ratio={target_ratio} is outside the KTO paper's recommended "
            f"[{RATIO_RANGE[0]}, {RATIO_RANGE[1]}]",
            stacklevel=2,
        )
    relative = target_ratio * n_undesirable / n_desirable  # λ_D / λ_U
    return (relative, 1.0) if relative >= 1.0 else (1.0, 1.0 / relative)


def mismatched_pairs(
    prompt_ids: Sequence,
    completion_ids: Sequence,
    offset: int = 1,
    *,
    pad_token_id: int = 0,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """The KL batch of a KTO microbatch: prompt ``x_i`` with completion ``y_(i+offset) mod m``.

    ``offset=+1`` is the paper's (and HALOs') pairing; ``offset=-1`` is TRL's. Inputs are
    per-example token-id sequences (lists or 1-D tensors). Returns right-padded
    ``input_ids``/``attention_mask`` ``[m, L]`` and ``labels`` ``[m, L]`` with the prompt
    and padding set to ``ignore_index``, ready for the model and ``kl_labels`` (apply the
    usual ``LogpOptions(shift=True)``).

    Example:
        >>> batch = mismatched_pairs([[1, 2], [3]], [[7], [8, 9]])
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[1, 2, 8, 9], [3, 7, 0, 0]], [[-100, -100, 8, 9], [-100, 7, -100, -100]])
    """
    m = len(prompt_ids)
    if len(completion_ids) != m:
        raise ValueError(
            f"completion_ids has {len(completion_ids)} examples but prompt_ids has {m}"
        )
    if m < 2:
        raise ValueError(f"mismatched pairs need a microbatch of at least 2 examples, got {m}")
    checks.check_number(offset, "offset", integer=True)
    if offset % m == 0:
        raise ValueError(f"offset must be an int not divisible by m={m}, got {offset!r}")
    rows = []
    for i in range(m):
        prompt = torch.as_tensor(prompt_ids[i], dtype=torch.long).flatten()
        completion = torch.as_tensor(completion_ids[(i + offset) % m], dtype=torch.long).flatten()
        rows.append((prompt, completion))
    length = max(p.numel() + c.numel() for p, c in rows)
    input_ids = torch.full((m, length), pad_token_id, dtype=torch.long)
    labels = torch.full((m, length), ignore_index, dtype=torch.long)
    attention_mask = torch.zeros(m, length, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n_p, n = prompt.numel(), prompt.numel() + completion.numel()
        input_ids[i, :n] = torch.cat([prompt, completion])
        labels[i, n_p:n] = completion
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _reference_point(
    kl_policy: LogpOutput,
    kl_ref_logps: torch.Tensor,
    process_group,
) -> torch.Tensor:
    """z0 = max(0, mean over all ranks' mismatched pairs of s_θ − s_ref), detached."""
    diff = (kl_policy.logps.detach() - kl_ref_logps).double()  # [m]
    totals = torch.stack(
        [diff.sum(), torch.tensor(float(diff.numel()), dtype=torch.float64, device=diff.device)]
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=process_group)
    return (totals[0] / totals[1]).clamp_min(0.0).float()


def kto_unit_loss(
    ref_logps: torch.Tensor,  # [B]
    z0: torch.Tensor,  # scalar, detached
    desirable: torch.Tensor,  # bool [B]
    beta: float,
    weights: tuple[float, float],  # (λ_D, λ_U)
) -> UnitLoss:
    """Per-row KTO loss and its closed-form gradient (z0 is a constant here)."""
    w_d, w_u = weights

    def unit_loss(s: UnitStats) -> torch.Tensor:
        r = s.logps - ref_logps[s.rows]
        return torch.where(
            desirable[s.rows],
            w_d * (1 - torch.sigmoid(beta * (r - z0))),
            w_u * (1 - torch.sigmoid(beta * (z0 - r))),
        )

    def unit_grad(s: UnitStats) -> torch.Tensor:
        x = beta * (s.logps - ref_logps[s.rows] - z0)
        slope = beta * torch.sigmoid(x) * torch.sigmoid(-x)  # β·σ'(x), σ' even
        return torch.where(desirable[s.rows], -w_d * slope, w_u * slope)

    return UnitLoss(unit_loss, unit_grad)


@dataclass(frozen=True)
class _KLRows:
    """Where z0 comes from: given directly (``fixed``) or the mismatched-row streams."""

    streams: list[StreamInput]
    fixed: torch.Tensor | None  # scalar z0 when ``kl`` is given
    ref_logps: torch.Tensor | None  # [m] precomputed kl_ref_logps


def _kl_rows(
    kl,
    kl_hidden,
    kl_labels,
    kl_ref_hidden,
    kl_ref_logps,
    kl_cu_seqlens,
    *,
    weight,
    bias,
    ref_weight,
    ref_bias,
    device,
) -> _KLRows:
    """Check the reference-point arguments; the no-grad streams that estimate z0."""
    if kl is not None:
        if any(v is not None for v in (kl_hidden, kl_labels, kl_ref_hidden, kl_ref_logps)):
            raise ValueError("give either kl (z0 directly) or the kl_* mismatched rows, not both")
        z0 = torch.as_tensor(kl, dtype=torch.float32, device=device).detach()
        if z0.numel() != 1 or not bool(torch.isfinite(z0)):
            raise ValueError(f"kl must be a finite scalar, got {kl!r}")
        return _KLRows([], z0.reshape(()), None)
    if kl_hidden is None or kl_labels is None:
        raise ValueError(
            "z0 needs the mismatched-pair rows: kl_hidden and kl_labels (with kl_ref_hidden "
            "or kl_ref_logps), or kl= given directly"
        )
    if (kl_ref_hidden is None) == (kl_ref_logps is None):
        raise ValueError("give exactly one of kl_ref_hidden and kl_ref_logps")
    checks.check_tensor(kl_hidden, "kl_hidden")
    checks.check_tensor(kl_labels, "kl_labels")
    kl_rows = num_sequences(kl_labels, kl_cu_seqlens, "kl_cu_seqlens")
    if kl_rows < 2:
        raise ValueError(
            f"kl_hidden: the mismatched-pair estimate of z0 needs a microbatch of at least "
            f"2 rows, got {kl_rows}"
        )
    kl_policy = StreamInput(
        kl_hidden, weight, kl_labels, bias=bias, cu_seqlens=kl_cu_seqlens, names=KL_NAMES
    ).frozen()
    streams = [kl_policy]
    if kl_ref_hidden is not None:
        streams.append(
            reference_stream(
                kl_ref_hidden, ref_weight, ref_bias, policy=kl_policy, names=KL_REF_NAMES
            )
        )
        return _KLRows(streams, None, None)
    return _KLRows(streams, None, check_logps(kl_ref_logps, "kl_ref_logps", kl_rows, device))


def _check_rows(labels, desirable, cu_seqlens) -> int:
    """The batch's row count B (at least 1) and the ``desirable [B]`` flags' type and shape."""
    checks.check_tensor(desirable, "desirable")
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor, got {desirable.dtype}")
    checks.check_tensor(labels, "labels")
    rows = num_sequences(labels, cu_seqlens, "cu_seqlens")
    if rows == 0:
        raise ValueError("kto_loss_fused needs at least one row; labels holds an empty batch")
    if desirable.shape != (rows,):
        raise ValueError(
            f"desirable must have shape [{rows}] (one per row), got {tuple(desirable.shape)}"
        )
    return rows


def _warn_ratio(desirable: torch.Tensor, w_d: float, w_u: float) -> None:
    n_desirable, n_undesirable = int(desirable.sum()), int((~desirable).sum())
    if n_desirable and n_undesirable:
        ratio = w_d * n_desirable / (w_u * n_undesirable)
        if not RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]:
            warnings.warn(
                f"λ_D·n_D/(λ_U·n_U) = {ratio:.3g} is outside the KTO paper's recommended "
                f"[{RATIO_RANGE[0]}, {RATIO_RANGE[1]}]; see fastalign.kto_class_weights",
                stacklevel=3,
            )


def kto_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    desirable: torch.Tensor,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    kl_hidden: torch.Tensor | None = None,
    kl_labels: torch.Tensor | None = None,
    kl_ref_hidden: torch.Tensor | None = None,
    kl_ref_logps: torch.Tensor | None = None,
    kl_cu_seqlens: torch.Tensor | None = None,
    kl: float | torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    process_group=None,
    loss_type: str = "kto",
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    options: LogpOptions | None = None,
) -> KTOOutput:
    """KTO loss from final hidden states and the lm_head, z0 from mismatched pairs.

    Args:
        hidden, weight, labels: the batch's rows ``[B, T, H]``, ``[V, H]``, ``[B, T]`` (or
            packed with ``cu_seqlens``).
        desirable: bool ``[B]``, True for desirable (thumbs-up) completions.
        ref_hidden (+ ``ref_weight``, default ``weight``) or ref_logps ``[B]``: the reference.
            ``ref_weight`` and ``ref_bias`` also score
            ``kl_ref_hidden``, so they may come with ``ref_logps`` when ``kl_ref_hidden`` does.
        kl_hidden, kl_labels: the mismatched-pair rows (see ``mismatched_pairs``), scored by
            the policy in the same launch with no autograd state; with kl_ref_hidden (the
            reference model on the same rows) or kl_ref_logps ``[m]``. Or
        kl: z0 given directly (e.g. 0.0 to train without a reference point).
        beta: β > 0. desirable_weight, undesirable_weight: λ_D, λ_U (see
            ``kto_class_weights``; a warning is issued when this batch's
            ``λ_D·n_D / (λ_U·n_U)`` falls outside the paper's [1, 3/2]).
        process_group: group over which z0 is averaged when ``torch.distributed`` is
            initialised (default: the world): the mean over every rank's mismatched pairs,
            clamped at 0 after the all-reduce (TRL averages per-rank means; the two agree
            when ranks hold equally many pairs).
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"`` (APO-zero per example, TRL's KTO
            variant: ``λ_D(1 − σ(βr))`` / ``λ_U·σ(βr)``; no z0, so no ``kl``/``kl_*``).
        bias, cu_seqlens: as in ``sequence_logps``; options: a ``LogpOptions``, as in
            ``dpo_loss_fused`` (the gradient unit is a row: z0 is detached).

    Raises ValueError on an empty batch (no row to average over).

    Example:
        >>> h = torch.randn(4, 6, 16, requires_grad=True); W = torch.randn(50, 16)
        >>> y = torch.randint(0, 50, (4, 6)); d = torch.tensor([True, False, True, False])
        >>> out = kto_loss_fused(h, W, y, d, ref_logps=torch.zeros(4), kl_hidden=h.roll(1, 0),
        ...                      kl_labels=y, kl_ref_logps=torch.zeros(4))
        >>> out.loss.backward(); out.metrics()["kl"] >= 0
        True
    """
    options = LogpOptions.of(options)
    beta = check_beta(beta)
    checks.check_choice(loss_type, "loss_type", tuple(ROW_LOSS_TYPES))
    if not ROW_LOSS_TYPES[loss_type].needs_z0:
        given = [
            name
            for name, v in (("kl", kl), ("kl_hidden", kl_hidden), ("kl_ref_logps", kl_ref_logps))
            if v is not None
        ]
        if given:
            raise ValueError(f"{given[0]} is not used by loss_type {loss_type!r} (it has no z0)")
        kl = 0.0
    weights = tuple(
        float(checks.check_number(w, name, low=0, low_open=True))
        for w, name in (
            (desirable_weight, "desirable_weight"),
            (undesirable_weight, "undesirable_weight"),
        )
    )
    _check_rows(labels, desirable, cu_seqlens)
    kl_rows = _kl_rows(
        kl, kl_hidden, kl_labels, kl_ref_hidden, kl_ref_logps, kl_cu_seqlens,
        weight=weight, bias=bias, ref_weight=ref_weight, ref_bias=ref_bias, device=labels.device,
    )  # fmt: skip
    policy, ref_stream, ref_logps, _ = policy_and_reference(
        hidden, weight, labels, rows=desirable.numel(), bias=bias, cu_seqlens=cu_seqlens,
        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps,
        reference="required", ref_head_used=kl is None and kl_ref_hidden is not None,
    )  # fmt: skip
    _warn_ratio(desirable, *weights)
    desirable = desirable.to(labels.device)
    found = {}

    def build(scored: list[LogpOutput]) -> list[UnitLoss]:
        found["ref"] = scored[0].logps if ref_stream else ref_logps
        found["z0"] = kl_rows.fixed
        if found["z0"] is None:
            kl_policy, *kl_ref = scored[len(ref_stream) :]
            kl_ref = kl_ref[0].logps if kl_ref else kl_rows.ref_logps
            found["z0"] = _reference_point(kl_policy, kl_ref, process_group)
        if loss_type == "kto":
            return [kto_unit_loss(found["ref"], found["z0"], desirable, beta, weights)]
        return [row_unit_loss(loss_type, found["ref"], desirable, RowParams(beta, *weights))]

    result = fused_loss([PolicyTerm(policy, "row")], ref_stream + kl_rows.streams, build, options)
    logps = result.policy[0].logps.detach()
    return KTOOutput(
        loss=result.loss,
        logps=logps,
        rewards=beta * (logps - found["ref"]),
        desirable=desirable,
        kl=found["z0"],
        num_tokens=result.policy[0].num_tokens,
    )
