"""The store path: a fused loss whose exact gradients are formed in its forward, unit by unit.

When a loss's upstream gradient ``g_b = ∂loss/∂S_b`` of a sequence's log-prob sum depends
only on a small *gradient unit* (a pair for DPO, a row for KTO), the forward walks the
differentiable rows in groups of whole units whose ``[R, V]`` fp32 logits fit a budget: one
GEMM gives the logits, the fold gives each token's logsumexp and target logit, the group's
sums give ``g`` (the loss's closed form, or autograd on its small unit-loss function),
``dz = g·(onehot − softmax)·s·mult`` is formed in place of the logits, and the rows'
gradient and the lm_head's fp32 accumulators are filled. (With the Triton backend's
opt-in fused-GEMM kernels a group keeps ``exp2(z₂ − part max)·s`` in the weight's dtype
instead of fp32 logits: ``kernels/fused_logprob.py``.) Backward only scales the stored
gradients by ``grad_output`` (in place) and hands them to autograd: 6·N·H·V per policy token
instead of the recompute path's 8. The gradients are returned from ``backward`` (DDP/FSDP
hooks fire as usual); a second backward through the same loss raises. A stream with token
weights (LD-DPO) sums ``w_t·logp_t`` and hands ``g·w_t`` to each token; one asking for
``log Σ p²`` (WPO) gets it from the group's fold (``UnitStats``).

Held from forward to backward: ``grad_hidden`` in fp32 (each differentiable stream's hidden
shape), one fp32 ``[V, H]`` lm_head accumulator (shared by streams on the same lm_head) and
an fp32 ``[V]`` bias one; transient: one group's logits (≤ the budget) plus one token chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._types import Backend, BackendGrads, GroupLogits, LogitTransform
from .ops import InputSlots
from .streams import Prepared, sequence_sums


class UnitStats(NamedTuple):
    """Per-sequence statistics of one group of whole units (``fastalign.losses.units``)."""

    logps: torch.Tensor  # [n] fp32 (fp64 for fp64 inputs) Σ_t logp_t
    num_tokens: torch.Tensor  # [n] int64 scored tokens
    rows: torch.Tensor  # [n] int64 index of each sequence in its stream
    # [n] the plain sums Σ_t logp_t when the stream weights its tokens (LD-DPO's
    # ``StreamInput.tail_weight``: then ``logps`` are Σ_t w_t·logp_t), else None
    raw_logps: torch.Tensor | None = None
    # [n] detached Σ_t log Σ_v p_tv² when the stream asks for it (WPO), else None
    log_sum_sq: torch.Tensor | None = None


# A group's UnitStats -> its UnitGradients
UnitGrads = Callable[[UnitStats], "UnitGradients"]


class UnitGradients(NamedTuple):
    """A group's unit losses and the term loss's gradients with respect to its sums."""

    losses: torch.Tensor  # [U_group] detached
    grad_sums: torch.Tensor  # [n] ∂(term loss)/∂(weighted) sums
    grad_raw: torch.Tensor | None = None  # [n] ∂(term loss)/∂(unweighted) sums, or None


@dataclass
class StoreTerm:
    """One differentiable stream of a store-path loss, cut into groups of whole units."""

    prepared: Prepared
    groups: list[torch.Tensor]  # per group: int64 [n] sequence ids, unit layout
    num_units: int
    unit_grads: UnitGrads


@dataclass
class StorePlan:
    terms: list[StoreTerm]
    transform: LogitTransform
    backend: Backend


class StoreResult(torch.autograd.Function):
    """``(loss, *sums)``: the scalar loss (differentiable) and each term's ``[B]`` sums.

    Inputs after ``plan``: ``InputSlots.tensors`` of the terms' streams.
    """

    @staticmethod
    def forward(ctx, plan: StorePlan, *tensors: torch.Tensor | None):
        slots = InputSlots.of([t.prepared for t in plan.terms])
        accumulators: dict[int, BackendGrads] = {}
        loss, all_sums, grads = 0.0, [], []
        for i, term in enumerate(plan.terms):
            need = slots.needs(ctx, i)
            owner = term.prepared.tokens.weight.data_ptr() not in accumulators
            acc = _accumulators(term.prepared, need, accumulators)
            term_loss, sums, grad_hidden = _run_term(plan, term, acc, need[0])
            loss, all_sums = loss + term_loss, all_sums + [sums]
            # The first stream on an lm_head returns its gradients; the others return None.
            grads.append((grad_hidden, acc if owner else BackendGrads(None, None, None)))
        ctx.stored = _returned_grads(plan, grads)
        ctx.mark_non_differentiable(*all_sums)
        return (loss.float() if loss.dtype != torch.float64 else loss, *all_sums)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *grad_sums):
        if torch.is_grad_enabled():  # backward(create_graph=True); grad_loss does not tell
            raise RuntimeError(
                "fastalign's fused losses have no double backward (create_graph=True): their "
                "gradients are formed by kernels, not by differentiable ops"
            )
        stored = ctx.stored
        if stored is None:
            raise RuntimeError(
                "fastalign's store path hands its gradients to autograd once: a second "
                "backward through the same loss is not supported. Recompute the loss, or "
                "pass grad_mode='recompute' to backward through it more than once."
            )
        ctx.stored = None  # freed as they are handed out; scaled in place
        out = []
        for grad, dtype in stored:
            if grad is not None:
                grad = grad.mul_(grad_loss.to(grad.dtype)).to(dtype)
            out.append(grad)
        return (None, *out)


def _accumulators(prepared: Prepared, need, shared: dict[int, BackendGrads]) -> BackendGrads:
    """fp32 lm_head/bias accumulators, one per lm_head (TYPO's two streams share one; a
    later stream must ask for the same gradients as the first, true of one loss's terms)."""
    tokens = prepared.tokens
    weight, bias = tokens.weight, tokens.bias
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    key = weight.data_ptr()
    if key not in shared:
        shared[key] = BackendGrads(
            rows=None,
            weight=torch.zeros(weight.shape, dtype=acc, device=weight.device) if need[1] else None,
            bias=(
                torch.zeros(bias.shape, dtype=acc, device=bias.device)
                if need[2] and bias is not None
                else None
            ),
        )
    return shared[key]


def _returned_grads(plan: StorePlan, grads) -> list:
    """``[(grad, dtype)]`` in ``InputSlots`` order: what backward scales and returns."""
    out = []
    for term, (grad_hidden, acc) in zip(plan.terms, grads):
        tokens = term.prepared.tokens
        out.append((grad_hidden, tokens.hidden.dtype))
        out.append((acc.weight, tokens.weight.dtype))
        out.append((acc.bias, None if tokens.bias is None else tokens.bias.dtype))
    return out


def _token_index(prepared: Prepared, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The compacted tokens of sequences ``seqs`` (in that order): ``(index [R], local [R])``
    with ``local`` each token's position in ``seqs``."""
    counts = prepared.num_tokens[seqs]  # [n]
    starts = torch.cumsum(prepared.num_tokens, 0) - prepared.num_tokens
    local = torch.repeat_interleave(torch.arange(seqs.numel(), device=seqs.device), counts)
    first = torch.repeat_interleave(starts[seqs], counts)
    offset = torch.arange(local.numel(), device=seqs.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    return first + offset, local


def _group_upstream(term: StoreTerm, seqs, index, local, group: GroupLogits):
    """One group's ``(UnitGradients, sums [n], ∂loss/∂logp_t [R])`` from its fold. With token
    weights ``w_t`` (LD-DPO) the sums are ``Σ_t w_t·logp_t`` and the upstream gradient of a
    token is ``g_seq·w_t`` (plus ``g_raw`` of the unweighted sums)."""
    prepared, logp = term.prepared, group.logp  # logp [R]
    positions = prepared.positions[index]  # [R]

    def seq_sums(values: torch.Tensor) -> torch.Tensor:  # [R] -> [n]
        return sequence_sums(values, local, positions, seqs.numel(), prepared.max_len)

    weights = prepared.token_weights(index, logp.dtype)  # [R] or None
    raw = seq_sums(logp)
    sums = raw if weights is None else seq_sums(logp * weights)
    sq = None if group.log_sum_sq is None else seq_sums(group.log_sum_sq)
    stats = UnitStats(sums, prepared.num_tokens[seqs], seqs, None if weights is None else raw, sq)
    unit = term.unit_grads(stats)
    grad_logp = unit.grad_sums.detach().to(logp.dtype)[local]  # [R]
    if weights is not None:
        grad_logp = grad_logp * weights
    if unit.grad_raw is not None:
        grad_logp = grad_logp + unit.grad_raw.detach().to(logp.dtype)[local]
    return unit, sums, grad_logp


def _run_term(plan: StorePlan, term: StoreTerm, acc: BackendGrads, need_hidden: bool):
    """Walk one term's groups: ``(term loss, sums [B], grad_hidden or None)``."""
    prepared = term.prepared
    tokens = prepared.tokens
    dtype = torch.float64 if tokens.hidden.dtype == torch.float64 else torch.float32
    device = tokens.hidden.device
    sums = torch.zeros(prepared.num_seqs, dtype=dtype, device=device)
    grad_hidden = None
    if need_hidden:
        grad_hidden = torch.zeros(tokens.hidden.shape, dtype=dtype, device=device)
    unit_losses = []
    for seqs in term.groups:
        index, local = _token_index(prepared, seqs)
        group = tokens.select(index)
        rows = group.rows(0, group.num_rows)  # [R, H]
        logits = plan.backend.group_logits(rows, group, plan.transform, prepared.log_sum_sq)
        unit, group_sums, grad_logp = _group_upstream(term, seqs, index, local, logits)
        unit_losses.append(unit.losses.detach())
        sums[seqs] = group_sums.to(dtype)
        flag = grad_hidden if need_hidden else None
        group_grads = BackendGrads(flag, acc.weight, acc.bias)
        grad_rows = plan.backend.group_grads(
            logits, rows, group, plan.transform, grad_logp, group_grads
        )
        del logits
        if grad_rows is not None:
            grad_hidden[group.index] = grad_rows.to(dtype)
    term_loss = torch.cat(unit_losses).sum() / term.num_units
    return term_loss, sums, grad_hidden
