"""The core op: per-sequence log-prob sums from hidden states and lm_head, never full logits.

Story in order: each stream is validated and compacted (``streams.prepare``), a backend is
picked (Triton on CUDA, chunked torch elsewhere), every stream of a call runs in one backend
forward (``_FusedLogps``), token log-probs are reduced to per-sequence sums
deterministically, and backward recomputes logits tile by tile. Public wrappers:
``sequence_logps`` and ``policy_ref_logps`` (through ``score_streams``); the losses call
``score_prepared`` from ``fastalign.losses.units`` (or, for the store path, ``fastalign.store``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from . import checks, torch_backend
from ._types import Backend, ForwardRequest, LogitTransform, LogpOutput
from .options import LogpOptions
from .streams import (  # noqa: F401  (StreamInput, reference_stream: part of this module's API)
    REF_NAMES,
    Prepared,
    StreamInput,
    prepare,
    reference_stream,
    sequence_sums,
)

# A differentiable stream whose lm_head needs no gradient takes the frozen-head fast path
# (E_t = softmax(z_t)·W in forward, no recompute in backward). False forces the general
# path; the benchmarks flip it to measure one against the other.
FROZEN_HEAD_FAST_PATH = True


@dataclass
class _Plan:
    streams: list[Prepared]
    transform: LogitTransform
    backend: Backend
    chunk_elements: int | None = None  # logits tile hint for the backend's forward


@dataclass
class StreamScores:
    """Per-sequence results of one stream: ``logps``/``num_tokens`` as ``LogpOutput``, and
    the extras it asked for (``prefix_logps`` differentiable, ``log_sum_sq`` detached)."""

    logps: torch.Tensor  # [B] fp32
    num_tokens: torch.Tensor  # int64 [B]
    prefix_logps: torch.Tensor | None = None  # [B] fp32
    log_sum_sq: torch.Tensor | None = None  # [B] fp32

    def sums(self) -> LogpOutput:
        """The per-sequence sums and counts alone."""
        return LogpOutput(self.logps, self.num_tokens)


@dataclass(frozen=True)
class InputSlots:
    """Where each differentiable stream's ``(hidden, weight, bias)`` sit among the tensors
    an autograd Function's ``apply`` takes after its plan (non-differentiable streams have
    none). One helper for both gradient paths, so the slot arithmetic lives here only."""

    first: tuple[int | None, ...]  # per stream: index of its hidden among the tensors

    @staticmethod
    def of(streams: list[Prepared]) -> InputSlots:
        first, count = [], 0
        for p in streams:
            first.append(count if p.differentiable else None)
            count += 3 if p.differentiable else 0
        return InputSlots(tuple(first))

    @staticmethod
    def tensors(streams: list[StreamInput]) -> list[torch.Tensor | None]:
        """The tensors to pass to ``apply``: ``(hidden, weight, bias)`` per differentiable one."""
        return [t for s in streams if s.differentiable for t in (s.hidden, s.weight, s.bias)]

    def needs(self, ctx, stream: int) -> tuple[bool, bool, bool]:
        """``ctx.needs_input_grad`` of the stream's ``(hidden, weight, bias)``."""
        first = self.first[stream]
        if first is None:
            return (False, False, False)
        return tuple(ctx.needs_input_grad[1 + first : 4 + first])  # 0 is the plan


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(backend: str, prepared: list[Prepared]) -> Backend:
    """The backend module for these streams: ``torch_backend`` or Triton's ``logprob``."""
    device = prepared[0].tokens.hidden.device
    dtypes = {p.tokens.hidden.dtype for p in prepared}
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_usable() else "torch"
        if torch.float64 in dtypes:
            backend = "torch"
    if backend == "torch":
        return torch_backend
    if torch.float64 in dtypes:
        raise TypeError("backend='triton' takes bfloat16, float16 or float32 hidden, not float64")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            f"imported to run on {device.type} tensors; use backend='torch' or 'auto'"
        )
    if not _triton_usable():
        raise ValueError("backend='triton' needs the triton package; install it or use 'torch'")
    from .kernels import logprob

    return logprob


def _sums(token_logp: torch.Tensor, p: Prepared) -> torch.Tensor:
    return sequence_sums(token_logp, p.seq_ids, p.positions, p.num_seqs, p.max_len)  # [B]


class _FusedLogps(torch.autograd.Function):
    """All streams of one call in one backend forward; gradients for differentiable ones.

    Inputs after ``plan``: ``InputSlots.tensors`` of the streams. Outputs: one ``[B]`` sum
    tensor per stream (non-differentiable streams' marked so).
    """

    @staticmethod
    def forward(ctx, plan: _Plan, *tensors: torch.Tensor | None):
        # Frozen-lm_head fast path: a stream whose hidden needs a gradient but whose weight
        # and bias do not gets E_t = softmax(z_t)·W in forward, and no recompute in backward.
        slots = InputSlots.of(plan.streams)
        expectation = [
            FROZEN_HEAD_FAST_PATH and slots.needs(ctx, i) == (True, False, False)
            for i in range(len(plan.streams))
        ]
        streams = plan.streams
        requests = [
            ForwardRequest(p.tokens, wants_e, p.log_sum_sq)
            for p, wants_e in zip(streams, expectation)
        ]
        results = plan.backend.forward(requests, plan.transform, plan.chunk_elements)
        outputs = [_sums(r.logp, p) for p, r in zip(streams, results)]
        frozen = [out for p, out in zip(streams, outputs) if not p.differentiable]
        for p, r in zip(streams, results):  # extras: prefix sums, then log Σ p² sums
            if p.prefix_mask is not None:
                outputs.append(_sums(r.logp * p.prefix_mask, p))
                frozen += [] if p.differentiable else [outputs[-1]]
        for p, r in zip(streams, results):
            if p.log_sum_sq:
                outputs.append(_sums(r.log_sum_sq, p))
                frozen.append(outputs[-1])
        ctx.plan, ctx.slots = plan, slots
        ctx.saved = [r if p.differentiable else None for p, r in zip(streams, results)]
        # The recompute reads the inputs again in backward: saved so that autograd refuses
        # a backward after one of them was modified in place (as for any op), instead of
        # recomputing from the changed values.
        ctx.save_for_backward(*tensors)
        ctx.mark_non_differentiable(*frozen)
        return tuple(outputs)

    @staticmethod
    @once_differentiable  # the gradients are formed by kernels: no double backward
    def backward(ctx, *grad_outputs: torch.Tensor | None):
        ctx.saved_tensors  # noqa: B018  (raises if an input was modified in place)
        plan: _Plan = ctx.plan
        grads: list[torch.Tensor | None] = []
        prefix_grads = iter(grad_outputs[len(plan.streams) :])
        for i, (prepared, saved, grad_sum) in enumerate(zip(plan.streams, ctx.saved, grad_outputs)):
            grad_prefix = next(prefix_grads) if prepared.prefix_mask is not None else None
            if prepared.differentiable:
                need = ctx.slots.needs(ctx, i)
                grad_logp = _token_grads(prepared, grad_sum, grad_prefix)  # [M] or None
                grads += _stream_grads(plan, prepared, saved, grad_logp, need)
        return (None, *grads)


def _token_grads(prepared: Prepared, grad_sum, grad_prefix) -> torch.Tensor | None:
    """``∂L/∂logp_t`` ``[M]`` from the upstream gradients of the sums and prefix sums."""
    grad_logp = None if grad_sum is None else grad_sum[prepared.seq_ids]
    if grad_prefix is not None:
        extra = grad_prefix[prepared.seq_ids] * prepared.prefix_mask
        grad_logp = extra if grad_logp is None else grad_logp + extra
    return grad_logp


def _stream_grads(plan: _Plan, prepared: Prepared, saved, grad_logp, need) -> list:
    """``[grad_hidden, grad_weight, grad_bias]`` of one differentiable stream (recompute),
    from ``grad_logp [M]`` (None: no gradient reached the stream)."""
    tokens = prepared.tokens
    inputs = (tokens.hidden, tokens.weight, tokens.bias)
    if grad_logp is None or not any(need) or tokens.num_rows == 0:
        return [
            torch.zeros_like(t) if (n and t is not None) else None for n, t in zip(need, inputs)
        ]
    grad_logp = grad_logp.to(saved.lse.dtype)
    if saved.expected is not None:
        grad_rows = torch_backend.backward_from_expectation(
            tokens, plan.transform, saved.logp, saved.lse, saved.expected, grad_logp
        )
        grad_weight = grad_bias = None
    else:
        grad_rows, grad_weight, grad_bias = plan.backend.backward(
            tokens,
            plan.transform,
            saved.lse,
            grad_logp,
            need_hidden=need[0],
            need_weight=need[1],
            need_bias=need[2] and tokens.bias is not None,
        )
    grad_hidden = None
    if need[0]:
        grad_hidden = torch.zeros_like(tokens.hidden, memory_format=torch.contiguous_format)
        grad_hidden[tokens.index] = grad_rows.to(tokens.hidden.dtype)
    return [
        grad_hidden,
        None if grad_weight is None else grad_weight.to(tokens.weight.dtype),
        None if grad_bias is None else grad_bias.to(tokens.bias.dtype),
    ]


def prepare_all(streams: list[StreamInput], options: LogpOptions) -> list[Prepared]:
    """Validate and compact every stream; all must live on the first one's device."""
    prepared = [prepare(s, shift=options.shift, ignore_index=options.ignore_index) for s in streams]
    device = prepared[0].tokens.hidden.device
    for s, p in zip(streams, prepared):
        checks.check_same_device(p.tokens.hidden, s.name("hidden"), device)
    return prepared


def score_prepared(
    streams: list[StreamInput],
    prepared: list[Prepared],
    transform: LogitTransform,
    backend: Backend,
    chunk_elements: int | None = None,
) -> list[StreamScores]:
    """Score prepared streams in one backend launch (the recompute path's autograd), with
    each stream's extras (``prefix_tokens``, ``log_sum_sq``)."""
    plan = _Plan(prepared, transform, backend, chunk_elements)
    outputs = iter(_FusedLogps.apply(plan, *InputSlots.tensors(streams)))
    scores = [StreamScores(next(outputs), p.num_tokens) for p in prepared]
    for out, p in zip(scores, prepared):
        out.logps = out.logps if p.differentiable else out.logps.detach()
        if p.prefix_mask is not None:
            out.prefix_logps = next(outputs)
    for out, p in zip(scores, prepared):
        if p.log_sum_sq:
            out.log_sum_sq = next(outputs)
    return scores


def score_streams(
    streams: list[StreamInput], options: LogpOptions | None = None
) -> list[StreamScores]:
    """Score several streams in one backend launch: the building block of the ops.

    Returns one ``StreamScores`` per stream, in order. Differentiable streams carry autograd
    to their ``hidden``, ``weight`` and ``bias``; the others are detached. Always the
    recompute path (``options.grad_mode`` is the losses': ``fastalign.losses.units``).
    """
    options = LogpOptions.of(options)
    prepared = prepare_all(streams, options)
    backend = select_backend(options.backend, prepared)
    return score_prepared(streams, prepared, options.transform(), backend)


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    options: LogpOptions | None = None,
) -> LogpOutput:
    """Per-sequence sums of token log-probs, computed in tiles without full logits.

    For every scored token t (``labels[t] != options.ignore_index``) of sequence b:
    ``z_t = softcap(logit_scale · (hidden_t · weightᵀ + bias) / temperature)``,
    ``logp_t = z_t[labels_t] − logsumexp(z_t)`` in fp32, and ``logps[b] = Σ_t logp_t``.

    Args:
        hidden: ``[B, T, H]`` padded or ``[N, H]`` packed final hidden states; bf16, fp16,
            fp32 (or fp64 on the torch backend); any strides, never copied.
        weight: lm_head ``[V, H]``, same dtype as ``hidden``.
        labels: ``[B, T]`` / ``[N]`` integer token ids; ``ignore_index`` marks positions
            not scored (prompt, padding). ``hidden[..., t, :]`` scores ``labels[..., t]``
            (``labels[..., t + 1]`` with ``shift``).
        bias: optional lm_head bias ``[V]``.
        cu_seqlens: ``[B + 1]`` sequence boundaries for packed ``[N, H]`` input.
        options: a ``LogpOptions`` (None: the defaults): ``shift``, ``ignore_index``, the
            logit transform (``logit_scale``, ``temperature``, ``logit_softcap``; defaults
            are the identity) and ``backend``. This op always recomputes logits in backward:
            ``grad_mode``/``store_budget_bytes`` other than the defaults raise ValueError.

    Returns:
        ``LogpOutput(logps, num_tokens)``: fp32 ``[B]`` sums (differentiable w.r.t.
        ``hidden``, ``weight``, ``bias``) and int64 ``[B]`` scored-token counts. A sequence
        with no scored token gives 0 and 0.

    Example:
        >>> h = torch.randn(2, 5, 16); W = torch.randn(100, 16)
        >>> y = torch.randint(0, 100, (2, 5)); y[:, :2] = -100  # prompt not scored
        >>> out = sequence_logps(h, W, y)
        >>> out.logps.shape, out.num_tokens.tolist()
        (torch.Size([2]), [3, 3])
        >>> hf = sequence_logps(h, W, y, options=LogpOptions(shift=True, temperature=0.7))
        >>> hf.num_tokens.tolist()  # hidden[:, t] scores y[:, t + 1]
        [3, 3]
    """
    (out,) = score_streams(
        [StreamInput(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens)],
        LogpOptions.of(options).for_op("sequence_logps"),
    )
    return out.sums()


def policy_ref_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    options: LogpOptions | None = None,
) -> tuple[LogpOutput, LogpOutput]:
    """Policy and reference log-prob sums of the same sequences, in one launch.

    The reference stream (``ref_hidden``, with ``ref_weight``/``ref_bias`` defaulting to the
    policy's ``weight``/``bias``) produces sums only: no autograd state, detached output.
    Shapes and other arguments (``options`` included) as in :func:`sequence_logps`;
    ``ref_hidden`` has the shape of ``hidden`` and shares ``labels``.

    Example:
        >>> h, h_ref = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16)
        >>> W = torch.randn(100, 16); y = torch.randint(0, 100, (2, 5))
        >>> policy, ref = policy_ref_logps(h, W, y, h_ref)
        >>> (policy.logps - ref.logps).sum().backward()
    """
    policy = StreamInput(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens)
    ref = reference_stream(ref_hidden, ref_weight, ref_bias, policy=policy)
    policy_out, ref_out = score_streams(
        [policy, ref], LogpOptions.of(options).for_op("policy_ref_logps")
    )
    return policy_out.sums(), ref_out.sums()
