"""Loss-side terms: the bytes each loss implementation holds, one function per implementation.

``eager_loss`` (full ``[N, V]`` logits, TRL style), ``torch_loss`` (the chunked torch backend,
CPU), ``triton_loss`` (the Triton backend, CUDA) and ``store_loss`` (gradients formed in the
forward) each return a :class:`LossBytes`. Tile sizes come from ``fastalign.tiles``, the
module the backends themselves read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import tiles
from .body import BodyBytes
from .step import Step

# Per scored token: logp, lse (fp32), targets, offsets, ids, positions (int64), and the
# fp64 per-sequence grid; padded layout assumed (no index tensors for cu_seqlens).
SCALAR_BYTES_PER_TOKEN = 2 * 4 + 4 * 8 + 8


@dataclass(frozen=True)
class LossBytes:
    """Bytes of one loss implementation: live during the loss ``forward`` (the no-grad body
    forwards included) and ``backward``, and the ``buffers`` the table reports."""

    forward: int
    backward: int
    buffers: int


@dataclass(frozen=True)
class EagerLogits:
    """The ``[N, V]`` tensors of TRL's ``concatenated_forward`` for N policy tokens.

    ``forward``: while ``log_softmax`` runs, lm_head logits in the model dtype, their fp32
    upcast (half dtypes only; the ``.float()`` input, freed after it) and the fp32 output.
    ``saved``: the fp32 ``log_softmax`` output kept to backward. ``backward``: the saved
    output, ``gather``'s zeroed fp32 gradient and the ``log_softmax`` gradient.
    ``backward_cast``: after it, the fp32 gradient and its cast to the logits dtype (fp32:
    the same tensor).
    """

    forward: int
    saved: int
    backward: int
    backward_cast: int


def eager_logits_bytes(rows_tokens: int, vocab: int, act: int) -> EagerLogits:
    """The eager path's ``[N, V]`` tensors for ``rows_tokens`` tokens (see EagerLogits)."""
    nv = rows_tokens * vocab
    half = act if act < 4 else 0
    upcast = 4 if act < 4 else 0
    return EagerLogits(nv * (act + upcast + 4), nv * 4, nv * 12, nv * (4 + half))


def fused_tile_bytes(
    vocab: int,
    hidden: int,
    act: int,
    num_rows: int,
    chunk_elements: int = tiles.TORCH_CHUNK_ELEMENTS,
) -> int:
    """The torch backend's bounded ``[chunk, V]`` working set: the matmul's ``[C, V]`` in the
    model dtype and its fp32 copy (dz formed in place), and the chunk's gathered rows."""
    rows = min(tiles.chunk_rows(vocab, chunk_elements), num_rows)
    return rows * vocab * (4 + (act if act < 4 else 0)) + rows * hidden * (4 + act)


def triton_chunk_bytes(
    num_rows: int,
    vocab: int,
    act: int,
    half_copy: bool,
    chunk_elements: int = tiles.TRITON_CHUNK_ELEMENTS,
    align: int = tiles.TRITON_VOCAB_ALIGN,
    fp32_logits: bool = True,
) -> int:
    """The Triton backend's ``[R, C]`` vocab chunk: the GEMM's fp32 logits (none for the
    fused kernels' dz, ``fp32_logits=False``), plus (when ``half_copy``) the ``dz`` or ``p``
    the fold writes in a half model dtype."""
    width = tiles.vocab_chunk_width(num_rows, vocab, chunk_elements, align)
    per_element = (4 if fp32_logits else 0) + (act if half_copy and act < 4 else 0)
    return num_rows * width * per_element


def gradient_outputs(step: Step) -> int:
    """What the loss hands the body's backward: ``grad_hidden`` ``[N, H]`` and, with a
    trainable head, the lm_head gradient ``[V, H]``, both in the model dtype."""
    head = step.head_params * step.act if step.head_trainable else 0
    return step.rows.tokens * step.shape.hidden_size * step.act + head


def eager_loss(step: Step, body: BodyBytes) -> LossBytes:
    """Eager full-logits loss: ``[N, V]`` tensors for every scored row."""
    act, tokens, vocab = step.act, step.rows.tokens, step.shape.vocab_size
    policy = eager_logits_bytes(tokens, vocab, act)
    # a no-grad stream's logits (the reference, KTO's KL rows), transient beside the
    # policy's saved log_softmax output
    no_grad_logits = policy.forward if step.rows.has_nograd else 0
    forward = max(policy.forward, policy.saved + no_grad_logits + body.nograd_forward)
    backward = max(policy.backward, policy.backward_cast + gradient_outputs(step))
    return LossBytes(forward, backward, buffers=max(forward, backward))


def _scalars(step: Step) -> int:
    """O(N) per-token scalars of every scored token (policy, reference, KL rows)."""
    rows = step.rows
    return (rows.tokens + rows.ref_tokens + rows.nograd_tokens) * SCALAR_BYTES_PER_TOKEN


def _forward_inputs(step: Step) -> int:
    """The scalars, and the hidden states the loss reads besides the policy's own (saved
    activations): the reference's and KTO's KL rows."""
    rows = step.rows
    extra_hidden = (rows.ref_tokens + rows.nograd_tokens) * step.shape.hidden_size * step.act
    return _scalars(step) + extra_hidden


def _fused(forward: int, backward: int, body: BodyBytes) -> LossBytes:
    return LossBytes(forward, backward, max(forward - body.nograd_forward, backward))


def torch_loss(step: Step, body: BodyBytes) -> LossBytes:
    """The chunked torch backend (CPU): one ``[chunk, V]`` tile per stream in turn, fp32
    accumulators; a frozen head keeps its fp32 ``[M, H]`` E instead of recomputing."""
    act, tokens = step.act, step.rows.tokens
    vocab, hidden = step.shape.vocab_size, step.shape.hidden_size
    tile = fused_tile_bytes(vocab, hidden, act, tokens)
    expectation = 0 if step.head_trainable else tokens * hidden * 4
    grad_rows_fp32 = tokens * hidden * 4
    grad_rows_cast = tokens * hidden * act if act < 4 else 0
    head_grad_fp32 = step.head_params * 4 if step.head_trainable else 0
    held = _scalars(step) + expectation + grad_rows_fp32 + head_grad_fp32
    backward = max(
        held + (tile if step.head_trainable else 0),
        held + grad_rows_cast + tokens * hidden * act,
    )
    # the cast [V, H] beside the fp32 accumulator at the end
    backward += step.head_params * act if step.head_trainable and act < 4 else 0
    forward = _forward_inputs(step) + tile + expectation + body.nograd_forward
    return _fused(forward, backward, body)


def _triton_groups(step: Step) -> list[tuple[int, bool]]:
    """``(tokens, writes p)`` per stacked group: streams sharing an lm_head are stacked
    (their rows gathered into one ``[R, H]`` copy) and scored vocab chunk by vocab chunk; a
    frozen head's policy is its own group (it writes ``p`` for E)."""
    rows = step.rows
    if not step.head_trainable:
        return [(rows.tokens, True), (rows.nograd_tokens + rows.ref_tokens, False)]
    if step.separate_reference:
        return [(rows.tokens + rows.nograd_tokens, False), (rows.ref_tokens, False)]
    return [(rows.tokens + rows.nograd_tokens + rows.ref_tokens, False)]


def _forward_chunk_bytes(step: Step, rows: int, probs: bool) -> int:
    """One forward vocab chunk of a stacked group: GEMM+fold's fp32 logits (and ``p``), or
    the fused kernels' two fp32 ``[parts, rows]`` logsumexp partials."""
    if step.fused_kernels and not probs:
        return 2 * tiles.FUSED_PARTIAL_ELEMENTS * 4
    return triton_chunk_bytes(rows, step.shape.vocab_size, step.act, half_copy=probs)


def triton_loss(step: Step, body: BodyBytes) -> LossBytes:
    """The Triton backend (CUDA): stacked groups in vocab chunks; backward recomputes the
    chunks, or (frozen head) turns the forward's fp32 ``[M, H]`` E into grad_hidden."""
    act, tokens = step.act, step.rows.tokens
    vocab, hidden = step.shape.vocab_size, step.shape.hidden_size
    scalars = _scalars(step)
    group_peak = max(
        rows * hidden * act
        + rows * 3 * 4
        + _forward_chunk_bytes(step, rows, probs)
        + (2 * rows * hidden * 4 if probs else 0)  # the fp32 E and one GEMM product
        for rows, probs in _triton_groups(step)
        if rows
    )
    forward = _forward_inputs(step) + body.nograd_forward + group_peak
    grad_rows_fp32 = tokens * hidden * 4
    # after the loop: fp32 grad_rows, their cast, and the grad_hidden ops writes (zeros,
    # model dtype)
    after_loop = grad_rows_fp32 + (tokens * hidden * act if act < 4 else 0)
    after_loop += tokens * hidden * act
    if not step.head_trainable:
        # backward from E: W[y_t] gathered in fp32 becomes grad_rows; no recompute
        return _fused(forward, scalars + tokens * hidden * 4 + after_loop, body)
    # the vocab-chunk loop: gathered rows, the chunk (fp32 logits + dz; the fused kernels:
    # dz only, same width), the fp32 grad_rows and one fp32 [M, H] GEMM product added into
    # it, the lm_head gradient
    head_grad = step.head_params * act
    in_loop = tokens * hidden * act + 2 * grad_rows_fp32 + head_grad
    fp32_logits = not step.fused_kernels
    in_loop += triton_chunk_bytes(tokens, vocab, act, half_copy=True, fp32_logits=fp32_logits)
    return _fused(forward, scalars + max(in_loop, after_loop + head_grad), body)


def store_group_tokens(step: Step, budget_bytes: int | None = None) -> int:
    """Tokens of one store-path group: whole gradient units whose fp32 logits fit the budget
    (default: the library's budget for ``step.device``; 0 when not even one unit fits: the
    loss then takes the recompute path)."""
    if budget_bytes is None:
        budget_bytes = tiles.store_group_budget(step.device)
    rows = step.rows
    unit_tokens = rows.unit_rows * rows.seq_len
    units = tiles.store_group_units(unit_tokens * step.shape.vocab_size * 4, budget_bytes)
    return min(rows.tokens, units * unit_tokens)


def store_loss(step: Step, body: BodyBytes) -> LossBytes:
    """Gradients formed in the forward (``grad_mode="store"``, or ``"auto"`` with a trainable
    head).

    From forward to backward it holds the fp32 grad_hidden of the scored policy rows
    ``[M, H]`` and, for a trainable head, an fp32 ``[V, H]`` lm_head gradient accumulator
    (HF decoders have no lm_head bias; one adds an fp32 ``[V]``); during the forward, one
    group's logits (in the model dtype and fp32, ``dz`` formed in place; at most
    ``store_group_budget(device)`` bytes of fp32; the fused kernels keep ``exp(z − max)·s``
    in the model dtype alone) and its gathered rows, instead of recomputing the logits in
    backward. The backward
    scales the held gradients by ``grad_output`` into grad_hidden and the lm_head gradient
    in the model dtype.
    """
    act, tokens = step.act, step.rows.tokens
    vocab, hidden = step.shape.vocab_size, step.shape.hidden_size
    group = store_group_tokens(step)
    kept = act if step.fused_kernels else 4 + (act if act < 4 else 0)  # bytes per logit
    group_bytes = group * vocab * kept + group * hidden * (4 + act)
    head = step.head_params if step.head_trainable else 0  # a frozen head: no accumulator
    held = tokens * hidden * 4 + head * 4
    forward = _forward_inputs(step) + body.nograd_forward + held + group_bytes
    # the scaled grad rows in the model dtype, the grad_hidden they are written into, and
    # the scaled lm_head gradient
    backward = _scalars(step) + held + 2 * tokens * hidden * act + head * act
    return _fused(forward, backward, body)


def grad_path(step: Step) -> str:
    """The fused loss's gradient path under ``step.grad_mode``, by the losses' own rule
    (``tiles.store_wanted``): ``"store"`` when wanted and one gradient unit's logits fit the
    budget, else ``"recompute"`` (trainable head) or ``"frozen"`` (E_t, no recompute)."""
    if tiles.store_wanted(step.grad_mode, step.head_trainable) and store_group_tokens(step) > 0:
        return "store"
    return "recompute" if step.head_trainable else "frozen"


def fused_loss(step: Step, body: BodyBytes) -> LossBytes:
    """The fused loss as the library runs it on ``step.device`` with ``step.grad_mode``."""
    if grad_path(step) == "store":
        return store_loss(step, body)
    return triton_loss(step, body) if step.device == "cuda" else torch_loss(step, body)
