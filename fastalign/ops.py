"""The core op: per-sequence log-prob sums from hidden states and lm_head, never full logits.

Story in order: validate each stream and compact its scored tokens (``_prepare``), pick a
backend (Triton on CUDA, chunked torch elsewhere), run every stream of a call in one backend
forward (``_FusedLogps``), reduce token log-probs to per-sequence sums deterministically, and
in backward recompute logits tile by tile. Public wrappers: ``sequence_logps`` and
``policy_ref_logps``; the losses call ``score_streams``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

from . import _validate as V
from . import torch_backend
from ._types import LogitTransform, LogpOutput, TokenBatch

# A differentiable stream whose lm_head needs no gradient takes the frozen-head fast path
# (E_t = softmax(z_t)·W in forward, no recompute in backward). False forces the general
# path; the benchmarks flip it to measure one against the other.
FROZEN_HEAD_FAST_PATH = True


@dataclass
class StreamInput:
    """One set of sequences to score: hidden states, lm_head and labels.

    ``differentiable=False`` streams (the reference model, KTO's mismatched pairs) are scored
    in the same launch but hold no autograd state. ``names`` maps the roles ``hidden``,
    ``weight``, ``labels``, ``bias``, ``cu_seqlens`` to the argument names errors should quote.
    """

    hidden: torch.Tensor  # [B, T, H] or [N, H]
    weight: torch.Tensor  # [V, H]
    labels: torch.Tensor  # [B, T] or [N]
    bias: torch.Tensor | None = None  # [V]
    cu_seqlens: torch.Tensor | None = None  # [B + 1]
    differentiable: bool = True
    names: dict[str, str] = field(default_factory=dict)
    # Per-sequence extras from the same launch (LD-DPO, WPO): sums over each sequence's
    # first prefix_tokens(num_tokens [B]) -> [B] scored tokens, and Σ_t log Σ_v p_tv².
    prefix_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None
    log_sum_sq: bool = False

    def name(self, role: str) -> str:
        return self.names.get(role, role)


@dataclass
class _Prepared:
    """A validated, compacted stream."""

    tokens: TokenBatch
    seq_ids: torch.Tensor  # int64 [M], non-decreasing
    positions: torch.Tensor  # int64 [M], position of each token within its sequence
    num_seqs: int
    max_len: int
    num_tokens: torch.Tensor  # int64 [B]
    differentiable: bool
    prefix_mask: torch.Tensor | None = None  # bool [M]: token in its sequence's prefix
    log_sum_sq: bool = False


@dataclass
class StreamScores:
    """Per-sequence results of one stream: ``logps``/``num_tokens`` as ``LogpOutput``, and
    the extras it asked for (``prefix_logps`` differentiable, ``log_sum_sq`` detached)."""

    logps: torch.Tensor  # [B] fp32
    num_tokens: torch.Tensor  # int64 [B]
    prefix_logps: torch.Tensor | None = None  # [B] fp32
    log_sum_sq: torch.Tensor | None = None  # [B] fp32


@dataclass
class _Plan:
    streams: list[_Prepared]
    transform: LogitTransform
    backend: ModuleType

    @property
    def extras(self) -> bool:
        """Some stream asks the fold for ``log Σ p²`` (the backends' extra output)."""
        return any(p.log_sum_sq for p in self.streams)


def check_common(
    *, shift, ignore_index, logit_scale, temperature, logit_softcap, backend
) -> LogitTransform:
    """Validate the keyword arguments every entry point shares; return the logit transform."""
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be a bool, got {type(shift).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    V.check_finite(logit_scale, "logit_scale")
    V.check_positive(temperature, "temperature")
    V.check_positive(logit_softcap, "logit_softcap", allow_none=True)
    V.check_choice(backend, "backend", V.BACKENDS)
    return LogitTransform(
        logit_scale=float(logit_scale),
        temperature=float(temperature),
        softcap=None if logit_softcap is None else float(logit_softcap),
    )


def _prepare(stream: StreamInput, *, shift: bool, ignore_index: int) -> _Prepared:
    hidden, weight, labels, bias, cu_seqlens = (
        stream.hidden,
        stream.weight,
        stream.labels,
        stream.bias,
        stream.cu_seqlens,
    )
    n_hidden, n_weight, n_labels = (
        stream.name("hidden"),
        stream.name("weight"),
        stream.name("labels"),
    )
    n_bias, n_cu = stream.name("bias"), stream.name("cu_seqlens")
    V.check_float(hidden, n_hidden)
    V.check_float(weight, n_weight)
    V.check_int(labels, n_labels)
    device = hidden.device
    if hidden.dim() not in (2, 3):
        raise ValueError(
            f"{n_hidden} must be [B, T, H] (padded) or [N, H] (packed), got shape "
            f"{tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{n_weight} must be [V, H] with H={hidden.shape[-1]} (the last dim of "
            f"{n_hidden}), got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{n_weight} dtype {weight.dtype} differs from {n_hidden} dtype {hidden.dtype}; "
            "cast one of them"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{n_weight} has an empty vocabulary (V=0)")
    V.check_same_device(weight, n_weight, device)
    vocab_size = weight.shape[0]
    if bias is not None:
        V.check_float(bias, n_bias)
        V.check_same_device(bias, n_bias, device)
        if bias.shape != (vocab_size,):
            raise ValueError(f"{n_bias} must be [V]=[{vocab_size}], got {tuple(bias.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{n_labels} shape {tuple(labels.shape)} must equal {n_hidden}.shape[:-1] = "
            f"{tuple(hidden.shape[:-1])}"
        )
    V.check_same_device(labels, n_labels, device)
    scored = labels != ignore_index
    if bool(scored.any()):
        values = labels[scored]
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"{n_labels} holds {bad}, outside [0, V={vocab_size}) and not "
                f"ignore_index={ignore_index}"
            )
    labels = labels.long()

    if hidden.dim() == 3:
        if cu_seqlens is not None:
            raise ValueError(f"{n_cu} is only for packed [N, H] {n_hidden}; got [B, T, H]")
        num_seqs, seq_len = labels.shape
        targets_grid = labels[:, 1:] if shift else labels  # hidden[:, t] scores labels[:, t+1]
        seq_ids, positions = (targets_grid != ignore_index).nonzero(as_tuple=True)
        targets = targets_grid[seq_ids, positions]
        index = (seq_ids, positions)
        max_len = seq_len
    else:
        if cu_seqlens is None:
            raise ValueError(f"{n_cu} [B+1] is required when {n_hidden} is packed [N, H]")
        V.check_int(cu_seqlens, n_cu)
        V.check_same_device(cu_seqlens, n_cu, device)
        cu = cu_seqlens.long()
        num_total = labels.shape[0]
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{n_cu} must be 1-D [B+1] with B >= 1, got {tuple(cu.shape)}")
        lengths = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or int(cu[-1]) != num_total or bool((lengths < 0).any()):
            raise ValueError(
                f"{n_cu} must start at 0, be non-decreasing and end at N={num_total}; "
                f"got {cu.tolist() if cu.numel() <= 16 else '...'}"
            )
        num_seqs = cu.numel() - 1
        if shift:
            # Score hidden[i] against labels[i+1] inside each sequence; a sequence's last
            # token has nothing to predict.
            shifted = torch.full_like(labels, ignore_index)
            shifted[:-1] = labels[1:]
            ends = cu[1:][lengths > 0] - 1
            shifted[ends] = ignore_index
            labels = shifted
        (rows,) = (labels != ignore_index).nonzero(as_tuple=True)
        targets = labels[rows]
        seq_ids = torch.searchsorted(cu[1:], rows, right=True)
        positions = rows - cu[seq_ids]
        index = (rows,)
        max_len = int(lengths.max())
    row_offsets = sum(i * hidden.stride(d) for d, i in enumerate(index))
    if not isinstance(row_offsets, torch.Tensor):  # no scored dims (cannot happen) guard
        row_offsets = torch.zeros(0, dtype=torch.long, device=device)
    tokens = TokenBatch(
        hidden=hidden,
        index=index,
        row_offsets=row_offsets,
        targets=targets,
        weight=weight,
        bias=bias,
    )
    num_tokens = torch.bincount(seq_ids, minlength=num_seqs)
    return _Prepared(
        tokens=tokens,
        seq_ids=seq_ids,
        positions=positions,
        num_seqs=num_seqs,
        max_len=max(max_len, 1),
        num_tokens=num_tokens,
        differentiable=stream.differentiable,
        prefix_mask=_prefix_mask(stream.prefix_tokens, seq_ids, num_tokens),
        log_sum_sq=stream.log_sum_sq,
    )


def _prefix_mask(prefix_tokens, seq_ids: torch.Tensor, num_tokens: torch.Tensor):
    """bool ``[M]``: the token is among the first ``prefix_tokens(num_tokens)[b]`` scored
    tokens of its sequence (tokens are in sequence order after compaction)."""
    if prefix_tokens is None:
        return None
    starts = torch.cumsum(num_tokens, 0) - num_tokens  # [B] first token of each sequence
    rank = torch.arange(seq_ids.numel(), device=seq_ids.device) - starts[seq_ids]
    return rank < prefix_tokens(num_tokens).to(rank.device)[seq_ids]


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _select_backend(backend: str, prepared: list[_Prepared]) -> ModuleType:
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


def _sequence_sums(token_logp: torch.Tensor, prepared: _Prepared) -> torch.Tensor:
    """Per-sequence sums of token log-probs, deterministic and NaN-contained.

    Tokens are scattered into a ``[B, max_len]`` grid (unique positions, so no atomics) and
    summed along rows in fp64: a non-finite token poisons only its own sequence, which a
    global cumsum would not guarantee.
    """
    acc = torch.float64
    grid = torch.zeros(prepared.num_seqs, prepared.max_len, dtype=acc, device=token_logp.device)
    grid[prepared.seq_ids, prepared.positions] = token_logp.to(acc)
    out_dtype = torch.float64 if token_logp.dtype == torch.float64 else torch.float32
    return grid.sum(dim=1).to(out_dtype)


class _FusedLogps(torch.autograd.Function):
    """All streams of one call in one backend forward; gradients for differentiable ones.

    Inputs after ``plan``: ``(hidden, weight, bias)`` for each differentiable stream, in
    plan order. Outputs: one ``[B]`` sum tensor per stream (non-differentiable streams'
    marked so).
    """

    @staticmethod
    def forward(ctx, plan: _Plan, *tensors: torch.Tensor | None):
        # Frozen-lm_head fast path: a stream whose hidden needs a gradient but whose weight
        # and bias do not gets E_t = softmax(z_t)·W in forward, and no recompute in backward.
        expectation, slot = [], 1
        for p in plan.streams:
            need = ctx.needs_input_grad[slot : slot + 3] if p.differentiable else (False,) * 3
            slot += 3 if p.differentiable else 0
            frozen_head = need[0] and not need[1] and not need[2]
            expectation.append(bool(FROZEN_HEAD_FAST_PATH and frozen_head))
        streams = plan.streams
        results = plan.backend.forward(
            [p.tokens for p in streams],
            plan.transform,
            expectation,
            **({"log_sum_sq": [p.log_sum_sq for p in streams]} if plan.extras else {}),
        )
        outputs = [_sequence_sums(r[0], p) for p, r in zip(streams, results)]
        frozen = [out for p, out in zip(streams, outputs) if not p.differentiable]
        for p, r in zip(streams, results):  # extras: prefix sums, then log Σ p² sums
            if p.prefix_mask is not None:
                outputs.append(_sequence_sums(r[0] * p.prefix_mask, p))
                frozen += [] if p.differentiable else [outputs[-1]]
        for p, r in zip(streams, results):
            if p.log_sum_sq:
                outputs.append(_sequence_sums(r[3], p))
                frozen.append(outputs[-1])
        ctx.plan = plan
        ctx.saved = [r[:3] if p.differentiable else None for p, r in zip(streams, results)]
        ctx.mark_non_differentiable(*frozen)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor | None):
        plan: _Plan = ctx.plan
        grads: list[torch.Tensor | None] = []
        slot = 0  # index of this stream's hidden in the inputs after plan
        prefix_grads = iter(grad_outputs[len(plan.streams) :])
        for prepared, saved, grad_sum in zip(plan.streams, ctx.saved, grad_outputs):
            grad_prefix = next(prefix_grads) if prepared.prefix_mask is not None else None
            if not prepared.differentiable:
                continue
            need = ctx.needs_input_grad[1 + slot : 4 + slot]
            slot += 3
            tokens = prepared.tokens
            grad_logp = _token_grads(prepared, grad_sum, grad_prefix)  # [M] or None
            if grad_logp is None or not any(need) or tokens.num_rows == 0:
                grads += [
                    torch.zeros_like(t) if (n and t is not None) else None
                    for n, t in zip(need, (tokens.hidden, tokens.weight, tokens.bias))
                ]
                continue
            logp, lse, expected = saved
            grad_logp = grad_logp.to(lse.dtype)
            if expected is not None:
                grad_rows = torch_backend.backward_from_expectation(
                    tokens, plan.transform, logp, lse, expected, grad_logp
                )
                grad_weight = grad_bias = None
            else:
                grad_rows, grad_weight, grad_bias = plan.backend.backward(
                    tokens,
                    plan.transform,
                    lse,
                    grad_logp,
                    need_hidden=need[0],
                    need_weight=need[1],
                    need_bias=need[2] and tokens.bias is not None,
                )
            grad_hidden = None
            if need[0]:
                hidden = tokens.hidden
                grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                grad_hidden[tokens.index] = grad_rows.to(hidden.dtype)
            grads += [
                grad_hidden,
                None if grad_weight is None else grad_weight.to(tokens.weight.dtype),
                None if grad_bias is None else grad_bias.to(tokens.bias.dtype),
            ]
        return (None, *grads)


def _token_grads(prepared: _Prepared, grad_sum, grad_prefix) -> torch.Tensor | None:
    """``∂L/∂logp_t`` ``[M]`` from the upstream gradients of the sums and prefix sums."""
    grad_logp = None if grad_sum is None else grad_sum[prepared.seq_ids]
    if grad_prefix is not None:
        extra = grad_prefix[prepared.seq_ids] * prepared.prefix_mask
        grad_logp = extra if grad_logp is None else grad_logp + extra
    return grad_logp


def score_streams(streams: list[StreamInput], **shared) -> list[LogpOutput]:
    """Score several streams in one backend launch; the building block of every loss.

    Returns one ``LogpOutput`` per stream, in order. Differentiable streams carry autograd
    to their ``hidden``, ``weight`` and ``bias``; the others are detached. ``**shared``:
    the keyword arguments of :func:`score_streams_full`.
    """
    return [LogpOutput(out.logps, out.num_tokens) for out in score_streams_full(streams, **shared)]


def score_streams_full(
    streams: list[StreamInput],
    *,
    shift: bool = False,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    backend: str = "auto",
) -> list[StreamScores]:
    """``score_streams`` with each stream's requested extras (``prefix_tokens``,
    ``log_sum_sq``) from the same launch: one ``StreamScores`` per stream, in order."""
    transform = check_common(
        shift=shift,
        ignore_index=ignore_index,
        logit_scale=logit_scale,
        temperature=temperature,
        logit_softcap=logit_softcap,
        backend=backend,
    )
    prepared = [_prepare(s, shift=shift, ignore_index=ignore_index) for s in streams]
    device = prepared[0].tokens.hidden.device
    for s, p in zip(streams, prepared):
        V.check_same_device(p.tokens.hidden, s.name("hidden"), device)
    plan = _Plan(streams=prepared, transform=transform, backend=_select_backend(backend, prepared))
    inputs = []
    for s, p in zip(streams, prepared):
        if p.differentiable:
            inputs += [s.hidden, s.weight, s.bias]
    outputs = iter(_FusedLogps.apply(plan, *inputs))
    scores = [StreamScores(next(outputs), p.num_tokens) for p in prepared]
    for out, p in zip(scores, prepared):
        out.logps = out.logps if p.differentiable else out.logps.detach()
        if p.prefix_mask is not None:
            out.prefix_logps = next(outputs)
    for out, p in zip(scores, prepared):
        if p.log_sum_sq:
            out.log_sum_sq = next(outputs)
    return scores


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    shift: bool = False,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    backend: str = "auto",
) -> LogpOutput:
    """Per-sequence sums of token log-probs, computed in tiles without full logits.

    For every scored token t (``labels[t] != ignore_index``) of sequence b:
    ``z_t = softcap(logit_scale · (hidden_t · weightᵀ + bias) / temperature)``,
    ``logp_t = z_t[labels_t] − logsumexp(z_t)`` in fp32, and ``logps[b] = Σ_t logp_t``.

    Args:
        hidden: ``[B, T, H]`` padded or ``[N, H]`` packed final hidden states; bf16, fp16,
            fp32 (or fp64 on the torch backend); any strides, never copied.
        weight: lm_head ``[V, H]``, same dtype as ``hidden``.
        labels: ``[B, T]`` / ``[N]`` integer token ids; ``ignore_index`` marks positions
            not scored (prompt, padding). ``hidden[..., t, :]`` scores ``labels[..., t]``.
        bias: optional lm_head bias ``[V]``.
        cu_seqlens: ``[B + 1]`` sequence boundaries for packed ``[N, H]`` input.
        shift: apply the Hugging Face shift (``hidden[:, :-1]`` scores ``labels[:, 1:]``,
            within each sequence when packed) without copying.
        logit_scale, temperature, logit_softcap: logit transform; defaults are the identity.
        backend: ``"auto"`` (Triton on CUDA, chunked torch elsewhere), ``"triton"`` (also
            on CPU under ``TRITON_INTERPRET=1``) or ``"torch"``.

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
    """
    (out,) = score_streams(
        [StreamInput(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens)],
        shift=shift,
        ignore_index=ignore_index,
        logit_scale=logit_scale,
        temperature=temperature,
        logit_softcap=logit_softcap,
        backend=backend,
    )
    return out


REF_NAMES = {
    "hidden": "ref_hidden",
    "weight": "ref_weight",
    "bias": "ref_bias",
    "labels": "labels",
    "cu_seqlens": "cu_seqlens",
}


def reference_stream(
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    *,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    names: dict[str, str] | None = None,
) -> StreamInput:
    """The frozen reference stream: its weight (and bias) default to the policy's."""
    names = names or REF_NAMES
    V.check_tensor(ref_hidden, names["hidden"])
    if ref_weight is not None:
        V.check_tensor(ref_weight, names["weight"])
    if ref_bias is not None:
        V.check_tensor(ref_bias, names["bias"])
    if ref_weight is None:
        ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
    return StreamInput(
        ref_hidden.detach(),
        ref_weight.detach(),
        labels,
        bias=None if ref_bias is None else ref_bias.detach(),
        cu_seqlens=cu_seqlens,
        differentiable=False,
        names=names,
    )


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
    shift: bool = False,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    backend: str = "auto",
) -> tuple[LogpOutput, LogpOutput]:
    """Policy and reference log-prob sums of the same sequences, in one launch.

    The reference stream (``ref_hidden``, with ``ref_weight``/``ref_bias`` defaulting to the
    policy's ``weight``/``bias``) produces sums only: no autograd state, detached output.
    Shapes and other arguments as in :func:`sequence_logps`; ``ref_hidden`` has the shape
    of ``hidden`` and shares ``labels``.

    Example:
        >>> h, h_ref = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16)
        >>> W = torch.randn(100, 16); y = torch.randint(0, 100, (2, 5))
        >>> policy, ref = policy_ref_logps(h, W, y, h_ref)
        >>> (policy.logps - ref.logps).sum().backward()
    """
    policy, ref = score_streams(
        [
            StreamInput(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens),
            reference_stream(
                ref_hidden,
                ref_weight,
                ref_bias,
                weight=weight,
                bias=bias,
                labels=labels,
                cu_seqlens=cu_seqlens,
            ),
        ],
        shift=shift,
        ignore_index=ignore_index,
        logit_scale=logit_scale,
        temperature=temperature,
        logit_softcap=logit_softcap,
        backend=backend,
    )
    return policy, ref
