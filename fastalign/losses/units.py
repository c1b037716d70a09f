"""Gradient units: a fused loss is described once and runs on the store or recompute path.

The contract (for anyone adding a loss):

1. Put the loss's differentiable rows in ``PolicyTerm(stream, unit)``s and its no-grad rows
   (reference model, KTO's mismatched rows) in plain ``StreamInput``s
   (``differentiable=False``).
2. Write ``build(nograd) -> [UnitLoss per term]``: it receives the no-grad streams' sums
   (detached ``LogpOutput``s, in order) and returns, per term, ``unit_loss(stats) -> [U]``
   (each unit's loss, weights included) and optionally ``unit_grad(stats) -> [n]``, the
   closed form of ``∂ unit_loss(stats).sum() / ∂ stats.logps`` (None: autograd on
   ``unit_loss``, exact and cheap: it runs on ``[n]`` tensors). ``stats`` is a ``UnitStats``
   of a *group* of whole units: ``logps`` (fp32 sums), ``num_tokens`` and ``rows`` (each
   sequence's index in its stream, to pick per-row constants such as reference sums or
   KTO's desirable flags). Layout: ``"row"`` units are consecutive rows; ``"pair"`` units
   keep the concatenated layout inside the group (its k chosen rows, then their k rejected
   rows, so ``logps[:k] - logps[k:]`` is the pair margin); ``"batch"`` is one unit holding
   every row (a loss that couples the whole batch). A stream with token weights
   (``StreamInput.prefix_tokens`` + ``tail_weight``, LD-DPO) gives ``logps`` =
   ``Σ_t w_t·logp_t`` on both paths and its plain sums in ``raw_logps`` (the store path then
   hands ``g·w_t`` plus the raw sums' gradient to each token).
3. ``fused_loss(terms, nograd, build, options)`` returns the loss
   ``Σ_terms mean_over_units(unit_loss)`` and every stream's sums, on either path:

   - store (``grad_mode="store"``, or ``"auto"`` when the lm_head is trainable and one unit's
     fp32 logits fit ``store_budget_bytes``, default ``fastalign.tiles``): no-grad streams are
     scored first, then the policy rows in groups of whole units; each group's gradient is
     formed in the forward from its own ``g = ∂loss/∂logps`` (``fastalign.store``);
   - recompute (``"recompute"``, a frozen lm_head, no grad mode, or a unit over the budget):
     every stream in one launch, ``unit_loss`` on all rows with autograd, logits recomputed
     in backward.

   So ``unit_loss`` on a group must depend on that group's stats only (plus constants
   computed in ``build``); ``"batch"`` is the way out for losses that couple units.

Example (SimPO-like, reference-free, pair units)::

    def build(nograd):
        def unit_loss(s):
            k = s.logps.numel() // 2
            r = s.logps / s.num_tokens.clamp_min(1)
            return -F.logsigmoid(beta * (r[:k] - r[k:]) - gamma)
        return [UnitLoss(unit_loss)]
    out = fused_loss([PolicyTerm(StreamInput(hidden, weight, labels), "pair")], [], build, opts)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import tiles
from .._types import LogpOutput
from ..ops import InputSlots, StreamScores, prepare_all, score_prepared, select_backend
from ..options import LogpOptions
from ..store import StorePlan, StoreResult, StoreTerm, UnitGradients, UnitStats
from ..streams import Prepared, StreamInput
from .pair_losses import ld_weighted

UNITS = ("pair", "row", "batch")


@dataclass(frozen=True)
class PolicyTerm:
    """A differentiable stream and the gradient unit its loss is made of."""

    stream: StreamInput
    unit: str  # one of UNITS


@dataclass(frozen=True)
class UnitLoss:
    """A term's per-unit loss ``[U]`` and, optionally, its closed-form gradient ``[n]``."""

    unit_loss: Callable[[UnitStats], torch.Tensor]
    unit_grad: Callable[[UnitStats], torch.Tensor] | None = None


class FusedLoss(NamedTuple):
    """``fused_loss``'s result: the scalar loss and every stream's sums, in order."""

    loss: torch.Tensor  # scalar, differentiable
    policy: list[LogpOutput]  # one per term
    nograd: list[LogpOutput]  # one per no-grad stream, detached


def fused_loss(
    terms: list[PolicyTerm],
    nograd: list[StreamInput],
    build: Callable[[list[LogpOutput]], list[UnitLoss]],
    options: LogpOptions,
) -> FusedLoss:
    """Evaluate a loss described by gradient units on the store or recompute path.

    Every stream is validated before any work starts (the options were, on construction).
    See the module docstring.
    """
    transform = options.transform()
    streams = [t.stream for t in terms] + list(nograd)
    prepared = prepare_all(streams, options)
    backend = select_backend(options.backend, prepared)
    policy = prepared[: len(terms)]
    groups = _store_groups(terms, policy, options) if _wants_store(terms, options) else None
    if groups is None:
        scores = score_prepared(streams, prepared, transform, backend)
        outputs = [_weighted_sums(out, p) for out, p in zip(scores, prepared)]
        losses = build(outputs[len(terms) :])
        loss = sum(
            _whole_batch_loss(unit_loss, out, score)
            for unit_loss, out, score in zip(losses, outputs, scores)
        )
        return FusedLoss(loss, outputs[: len(terms)], outputs[len(terms) :])
    nograd_out = []
    if nograd:
        # No autograd state here: tiles as large as the groups' budget (larger GEMMs).
        chunk = _budget(options, policy[0]) // 4
        scores = score_prepared(list(nograd), prepared[len(terms) :], transform, backend, chunk)
        nograd_out = [_weighted_sums(out, p) for out, p in zip(scores, prepared[len(terms) :])]
    losses = build(nograd_out)
    store_terms = [
        StoreTerm(
            p, g, _num_units(t.unit, p.num_seqs), _unit_grads(u, _num_units(t.unit, p.num_seqs))
        )
        for t, p, g, u in zip(terms, policy, groups, losses)
    ]
    plan = StorePlan(store_terms, transform, backend)
    loss, *sums = StoreResult.apply(plan, *InputSlots.tensors(streams[: len(terms)]))
    outs = [LogpOutput(s, p.num_tokens) for s, p in zip(sums, policy)]
    return FusedLoss(loss, outs, nograd_out)


def _weighted_sums(scores: StreamScores, prepared: Prepared) -> LogpOutput:
    """A stream's sums as its loss reads them: LD-DPO weighted when it weights its tokens
    (``prefix + α·(full − prefix)``, from the same launch's prefix sums), else plain."""
    if prepared.tail_weight is None:
        return scores.sums()
    logps = ld_weighted(scores.logps, scores.prefix_logps, prepared.tail_weight)
    return LogpOutput(logps, scores.num_tokens)


def _whole_batch_loss(unit_loss: UnitLoss, out: LogpOutput, scores: StreamScores) -> torch.Tensor:
    rows = torch.arange(out.logps.numel(), device=out.logps.device)
    raw = None if scores.logps is out.logps else scores.logps
    stats = UnitStats(out.logps, out.num_tokens, rows, raw, scores.log_sum_sq)
    return unit_loss.unit_loss(stats).mean()


def _num_units(unit: str, num_seqs: int) -> int:
    return {"pair": num_seqs // 2, "row": num_seqs, "batch": 1}[unit]


def _unit_grads(unit_loss: UnitLoss, num_units: int):
    """``UnitStats -> UnitGradients`` for the store path: the closed form when the loss has
    one (it reads the weighted sums only), else autograd on the group's stats."""

    def run(stats: UnitStats) -> UnitGradients:
        sums, raw = stats.logps, stats.raw_logps
        if unit_loss.unit_grad is not None:
            g = unit_loss.unit_grad(stats)
            return UnitGradients(unit_loss.unit_loss(stats).detach(), g / num_units)
        with torch.enable_grad():
            logps = sums.detach().requires_grad_()
            raw_in = None if raw is None else raw.detach().requires_grad_()
            losses = unit_loss.unit_loss(stats._replace(logps=logps, raw_logps=raw_in))
            inputs = [logps] if raw_in is None else [logps, raw_in]
            grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
        g, g_raw = (*grads, None)[:2]
        g = torch.zeros_like(sums) if g is None else g
        return UnitGradients(
            losses.detach(), g / num_units, None if g_raw is None else g_raw / num_units
        )

    return run


def _wants_store(terms: list[PolicyTerm], options: LogpOptions) -> bool:
    """The store path is worth trying: gradients are wanted, and (auto) the head trains."""
    if options.grad_mode == "recompute" or not torch.is_grad_enabled():
        return False
    inputs = [
        t for term in terms for t in (term.stream.hidden, term.stream.weight, term.stream.bias)
    ]
    if not any(t is not None and t.requires_grad for t in inputs):
        return False
    # A frozen lm_head has a cheaper path still: E_t in forward, no GEMM in backward.
    return tiles.store_wanted(options.grad_mode, terms[0].stream.weight.requires_grad)


def _budget(options: LogpOptions, policy: Prepared) -> int:
    """The store path's group budget in bytes: the option, or the device's default."""
    if options.store_budget_bytes is not None:
        return options.store_budget_bytes
    return tiles.store_group_budget(policy.tokens.hidden.device.type)


def _store_groups(
    terms: list[PolicyTerm], policy: list[Prepared], options: LogpOptions
) -> list[list[torch.Tensor]] | None:
    """Per term, its groups of whole units (sequence ids in unit layout) under the budget;
    None when one unit alone exceeds it (then the whole call takes the recompute path)."""
    device = policy[0].tokens.hidden.device
    budget = _budget(options, policy[0])
    out = []
    for term, p in zip(terms, policy):
        vocab, dtype = p.tokens.weight.shape[0], p.tokens.hidden.dtype
        element = 8 if dtype == torch.float64 else 4
        groups = _groups(term.unit, p.num_tokens.tolist(), budget // (vocab * element), device)
        if groups is None:
            if options.grad_mode == "store":
                warnings.warn(
                    f"grad_mode='store': one gradient unit's logits exceed store_budget_bytes="
                    f"{budget}; using the recompute path",
                    stacklevel=4,
                )
            return None
        out.append(groups)
    return out


def _groups(unit: str, counts: list[int], budget_rows: int, device) -> list[torch.Tensor] | None:
    """Greedy runs of consecutive units with at most ``budget_rows`` scored tokens each."""
    num_seqs = len(counts)
    half = num_seqs // 2
    sizes = {
        "pair": [counts[u] + counts[half + u] for u in range(half)],
        "row": counts,
        "batch": [sum(counts)],
    }[unit]
    if sizes and max(sizes) > budget_rows:
        return None
    spans, start, total = [], 0, 0
    for u, size in enumerate(sizes):
        if total + size > budget_rows and u > start:
            spans.append((start, u))
            start, total = u, 0
        total += size
    if sizes:
        spans.append((start, len(sizes)))

    def ids(first: int, stop: int) -> torch.Tensor:
        if unit == "batch":
            return torch.arange(num_seqs, device=device)
        span = torch.arange(first, stop, device=device)
        return torch.cat([span, span + half]) if unit == "pair" else span

    return [ids(a, b) for a, b in spans]
