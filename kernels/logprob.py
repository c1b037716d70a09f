"""Triton backend of ``sequence_logps``: vocab-chunked cuBLAS GEMMs + Triton fold kernels.

Story in order:
1. ``_transform`` / ``_online_update``: the logit transform ``z = softcap(mult·(h·Wᵀ + b))``
   and the online logsumexp step (running max, sum of exponentials, target logit), in fp32.
2. ``_fold_kernel``: folds one ``[R, C]`` vocab chunk of raw logits (an fp32 GEMM output)
   into each row's running statistics; for a frozen lm_head it also writes ``exp(z − m)·s``
   (``s`` the softcap slope) and the rescale of the old statistics, so that
   ``E_t = softmax(z_t)·s·W`` accumulates online, as flash attention's output does.
3. ``forward``: the scored rows of every stream sharing an lm_head are stacked; per vocab
   chunk ONE GEMM and ONE fold launch serve them all (policy, reference, KL rows, samples).
4. ``_grad_logits_kernel`` + ``backward`` (recompute path, ``logprob_backward.py``): per
   vocab chunk, recompute the logits (GEMM), form ``dz = g·(onehot − softmax(z))·s·mult`` in
   the weight's dtype, then ``grad_rows += dz·W_c`` and ``grad_W[c] = dzᵀ·h``: no ``[V, H]``
   fp32 accumulator.
5. ``group_logits`` + ``group_grads`` (store path, ``fastalign.store``; ``logprob_store.py``):
   one GEMM for a group's full-vocabulary logits, the fold, then ``dz`` in place and the two
   GEMMs.

Why GEMMs and not one fused kernel: on an H100 a single-launch design (a ``tl.dot`` K-loop
per logits tile) ran at 45-72 TFLOP/s (``benchmarks/results/h100-fused-kernel-4813b96``),
cuBLAS GEMMs with a memory-bound fold at 450-550 TFLOP/s. Deterministic: no atomics, fixed
chunk order. FLOPs per scored token: forward 2HV; recompute backward 2HV + 4HV (2HV fewer
for a frozen head); frozen-head fast path 4HV in forward, none in backward; store path 6HV
in forward, none in backward. Extra memory: one ``[R, C]`` fp32 logits chunk (bounded by
``CHUNK_ELEMENTS``; the store path: one group, bounded by its budget), O(M) statistics,
the gathered rows ``[M, H]`` and an fp32 ``[M, H]`` accumulator.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import tiles
from .._types import BackendResult, ForwardRequest, LogitTransform, TokenBatch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Sentinel for "no logit seen yet": finite, so exp(sentinel − m) is 0 and never NaN. A
# constexpr: compiled kernels may read no other kind of global.
NEG_BIG = tl.constexpr(-1.0e30)
_NEG_BIG = -1.0e30  # the same, for host code
# The chunk budget and vocab alignment (fastalign.tiles): small under the interpreter.
CHUNK_ELEMENTS = tiles.TRITON_INTERPRET_CHUNK_ELEMENTS if INTERPRET else tiles.TRITON_CHUNK_ELEMENTS
VOCAB_ALIGN = tiles.TRITON_INTERPRET_VOCAB_ALIGN if INTERPRET else tiles.TRITON_VOCAB_ALIGN
# "gemm_fold" (this module) or "fused": the GEMMs with the logsumexp / dz in their epilogue
# (kernels/fused_logprob.py), unmeasured on a GPU so far, hence not the default.
CUDA_KERNEL = tiles.cuda_kernel()


@triton.jit
def _transform(b_acc, b_ptr, has_bias, o_v, m_v, multiplier, softcap, HAS_SOFTCAP: tl.constexpr):
    """``z = softcap(mult·(acc + b))`` on an fp32 ``[BLOCK_M, BLOCK_V]`` tile of ``h·Wᵀ``;
    invalid columns are −inf."""
    if has_bias != 0:
        b_bias = tl.load(b_ptr + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_acc += b_bias[None, :]
    b_z = b_acc * multiplier
    if HAS_SOFTCAP:
        # c·tanh(u/c) with tanh(x) = 1 − 2/(exp(2x) + 1): saturates cleanly at ±1.
        b_z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * b_z / softcap) + 1.0))
    return tl.where(m_v[None, :], b_z, float("-inf"))


@triton.jit
def _softcap_slope(b_z, m_v, softcap):
    """``∂z/∂u = 1 − (z/c)²`` of the softcap; padding columns (z = −inf) give 1, not NaN."""
    b_ratio = tl.where(m_v[None, :], b_z, 0.0) / softcap
    return 1.0 - b_ratio * b_ratio


@triton.jit
def _online_update(b_z, o_v, b_target, b_max, b_sum, b_tgt):
    """Fold a ``[BLOCK_M, BLOCK_V]`` tile of ``z`` into the running max, sum of exponentials
    and target logit of each row (the target is picked up in the tile that holds it)."""
    b_tgt += tl.sum(tl.where(o_v[None, :] == b_target[:, None], b_z, 0.0), axis=1)
    b_new_max = tl.maximum(b_max, tl.max(b_z, axis=1))
    b_sum = b_sum * tl.exp(b_max - b_new_max) + tl.sum(tl.exp(b_z - b_new_max[:, None]), axis=1)
    return b_new_max, b_sum, b_tgt


@triton.jit
def _row_block(targets_ptr, num_rows, chunk_start, chunk_width, BLOCK_M: tl.constexpr):
    """This program's rows of a vocab chunk: ``(o_m, m_m, o_row, target)`` with ``o_row`` the
    rows' int64 offsets in the ``[R, C]`` chunk and ``target`` relative to the chunk start."""
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < num_rows
    o_row = o_m.to(tl.int64)[:, None] * chunk_width
    b_target = tl.load(targets_ptr + o_m, mask=m_m, other=-1) - chunk_start
    return o_m, m_m, o_row, b_target


@triton.jit
def _z_tile(
    logits_ptr,
    o_row,  # [BLOCK_M, 1] int64 offsets of the rows in the [R, C] chunk
    m_m,  # [BLOCK_M] valid rows
    v0,
    chunk_width,
    b_ptr,
    has_bias,
    multiplier,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Columns ``[v0, v0 + BLOCK_V)`` of a chunk's raw logits, transformed:
    ``(o_v, m_v, m_tile, z)`` with invalid columns at −inf."""
    o_v = v0 + tl.arange(0, BLOCK_V)
    m_v = o_v < chunk_width
    m_tile = m_m[:, None] & m_v[None, :]
    b_x = tl.load(logits_ptr + o_row + o_v[None, :], mask=m_tile)
    b_z = _transform(b_x, b_ptr, has_bias, o_v, m_v, multiplier, softcap, HAS_SOFTCAP)
    return o_v, m_v, m_tile, b_z


@triton.jit
def _fold_kernel(
    logits_ptr,  # fp32 [R, C] h·Wᵀ of one vocab chunk (bias and transform not yet applied)
    targets_ptr,  # int64 [R]
    b_ptr,  # the chunk's bias [C] (any pointer when has_bias is 0)
    has_bias,
    max_ptr,  # fp32 [R] running max, updated in place
    sum_ptr,  # fp32 [R] running sum of exp(z − max), updated in place
    tgt_ptr,  # fp32 [R] target logit, updated in place
    probs_ptr,  # [R, C] out (WRITE_PROBS): exp(z − new max)·s, the weight's dtype
    rescale_ptr,  # fp32 [R] out (WRITE_PROBS): exp(old max − new max)
    sq_ptr,  # fp32 [R] (WRITE_SQ): running Σ exp(2(z − max)), for WPO's log Σ p², in place
    num_rows,
    chunk_start,  # vocab id of the chunk's first column
    chunk_width,
    multiplier,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_PROBS: tl.constexpr,
    WRITE_SQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One vocab chunk into each row's online logsumexp (and the frozen head's ``p·s``, and
    the online ``Σ exp(2(z − max))`` whose log minus twice the sum's gives ``log Σ p²``).

    The second pass reads a tile before writing the same tile, so ``probs`` may alias
    ``logits`` (fp32 weights).
    """
    o_m, m_m, o_row, b_target = _row_block(targets_ptr, num_rows, chunk_start, chunk_width, BLOCK_M)
    b_old_max = tl.load(max_ptr + o_m, mask=m_m, other=0.0)
    b_max = b_old_max
    b_sum = tl.load(sum_ptr + o_m, mask=m_m, other=0.0)
    b_tgt = tl.load(tgt_ptr + o_m, mask=m_m, other=0.0)
    b_sq = tl.zeros_like(b_sum)  # defined on every path: loop-carried when compiled
    if WRITE_SQ:
        b_sq = tl.load(sq_ptr + o_m, mask=m_m, other=0.0)
    for v0 in range(0, chunk_width, BLOCK_V):
        o_v, m_v, m_tile, b_z = _z_tile(
            logits_ptr, o_row, m_m, v0, chunk_width, b_ptr, has_bias, multiplier, softcap,
            HAS_SOFTCAP, BLOCK_V,
        )  # fmt: skip
        b_prev_max = b_max
        b_max, b_sum, b_tgt = _online_update(b_z, o_v, b_target, b_max, b_sum, b_tgt)
        if WRITE_SQ:
            b_sq = b_sq * tl.exp(2.0 * (b_prev_max - b_max)) + tl.sum(
                tl.exp(2.0 * (b_z - b_max[:, None])), axis=1
            )
    if WRITE_SQ:
        tl.store(sq_ptr + o_m, b_sq, mask=m_m)
    tl.store(max_ptr + o_m, b_max, mask=m_m)
    tl.store(sum_ptr + o_m, b_sum, mask=m_m)
    tl.store(tgt_ptr + o_m, b_tgt, mask=m_m)
    if WRITE_PROBS:
        tl.store(rescale_ptr + o_m, tl.exp(b_old_max - b_max), mask=m_m)
        for v0 in range(0, chunk_width, BLOCK_V):
            o_v, m_v, m_tile, b_z = _z_tile(
                logits_ptr, o_row, m_m, v0, chunk_width, b_ptr, has_bias, multiplier, softcap,
                HAS_SOFTCAP, BLOCK_V,
            )  # fmt: skip
            b_p = tl.exp(b_z - b_max[:, None])
            if HAS_SOFTCAP:
                b_p = b_p * _softcap_slope(b_z, m_v, softcap)
            p_probs = probs_ptr + o_row + o_v[None, :]
            tl.store(p_probs, b_p.to(probs_ptr.dtype.element_ty), mask=m_tile)


@triton.jit
def _grad_logits_kernel(
    logits_ptr,  # fp32 [R, C] recomputed h·Wᵀ of one vocab chunk
    targets_ptr,  # int64 [R]
    lse_ptr,  # fp32 [R]
    grad_ptr,  # fp32 [R] upstream gradient of each token's logp
    b_ptr,
    has_bias,
    dz_ptr,  # [R, C] out, the weight's dtype: ∂L/∂(h·Wᵀ + b) (may alias logits)
    dz_row_stride,  # elements between dz rows: C, or 2C for a half dz inside fp32 logits
    num_rows,
    chunk_start,
    chunk_width,
    multiplier,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HALF_IN_PLACE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``dz = g·(onehot − exp(z − lse))·s·mult`` for one vocab chunk of rows.

    In place: for fp32, each tile is read before the same tile is written. ``HALF_IN_PLACE``
    writes a half-precision ``dz`` into the first half of each fp32 logits row (row stride
    ``2C``): tile ``v0`` writes the bytes of fp32 columns ``[v0/2, (v0+BLOCK_V)/2)``, already
    read by this program; a barrier keeps the first tile's reads ahead of its writes.
    """
    o_m, m_m, o_row, b_target = _row_block(targets_ptr, num_rows, chunk_start, chunk_width, BLOCK_M)
    b_lse = tl.load(lse_ptr + o_m, mask=m_m, other=0.0)
    b_g = tl.load(grad_ptr + o_m, mask=m_m, other=0.0)
    for v0 in range(0, chunk_width, BLOCK_V):
        o_v, m_v, m_tile, b_z = _z_tile(
            logits_ptr, o_row, m_m, v0, chunk_width, b_ptr, has_bias, multiplier, softcap,
            HAS_SOFTCAP, BLOCK_V,
        )  # fmt: skip
        b_onehot = (o_v[None, :] == b_target[:, None]).to(tl.float32)
        b_dz = b_g[:, None] * (b_onehot - tl.exp(b_z - b_lse[:, None]))
        if HAS_SOFTCAP:
            b_dz = b_dz * _softcap_slope(b_z, m_v, softcap)
        b_dz = b_dz * multiplier
        if HALF_IN_PLACE:
            tl.debug_barrier()
        p_dz = dz_ptr + o_m.to(tl.int64)[:, None] * dz_row_stride + o_v[None, :]
        tl.store(p_dz, b_dz.to(dz_ptr.dtype.element_ty), mask=m_tile)


def _fold_blocks() -> dict:
    """Tiles of the row-wise fold kernels: memory-bound, wide vocab tiles on the GPU."""
    if INTERPRET:
        return dict(BLOCK_M=4, BLOCK_V=16, num_warps=1)
    return dict(BLOCK_M=1, BLOCK_V=1024, num_warps=4)


def _transform_args(transform: LogitTransform) -> dict:
    """The logit transform as the kernels take it."""
    softcap = transform.softcap
    return dict(
        multiplier=transform.multiplier, softcap=softcap or 1.0, HAS_SOFTCAP=softcap is not None
    )


def _bias_args(weight: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """The bias as the kernels take it (any pointer and a 0 flag without bias)."""
    return dict(b_ptr=weight if bias is None else bias, has_bias=int(bias is not None))


def _fold(
    logits: torch.Tensor,  # [R, C] fp32 raw h·Wᵀ of one vocab chunk
    targets: torch.Tensor,  # int64 [R] vocab ids
    bias: dict,  # the chunk's bias (_bias_args)
    chunk_start: int,
    transform: LogitTransform,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # fp32 [R] max, sum, target logit
    probs: torch.Tensor | None = None,  # [R, C] out: exp(z − new max)·s (frozen head)
    rescale: torch.Tensor | None = None,  # fp32 [R] out with probs: exp(old max − new max)
    sq: torch.Tensor | None = None,  # fp32 [R] running Σ exp(2(z − max)) (WPO)
) -> None:
    """One ``_fold_kernel`` launch: the chunk into the running statistics, in place."""
    running_max, running_sum, target_logit = stats
    blocks = _fold_blocks()
    _fold_kernel[(triton.cdiv(logits.shape[0], blocks["BLOCK_M"]),)](
        logits_ptr=logits,
        targets_ptr=targets,
        **bias,
        max_ptr=running_max,
        sum_ptr=running_sum,
        tgt_ptr=target_logit,
        probs_ptr=logits if probs is None else probs,
        rescale_ptr=running_sum if rescale is None else rescale,
        sq_ptr=running_sum if sq is None else sq,
        num_rows=logits.shape[0],
        chunk_start=chunk_start,
        chunk_width=logits.shape[1],
        **_transform_args(transform),
        WRITE_PROBS=probs is not None,
        WRITE_SQ=sq is not None,
        **blocks,
    )


def _running_stats(num_rows: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh fp32 ``[R]`` running max (at the "nothing seen" sentinel), sum and target logit."""
    running_max = torch.full((num_rows,), _NEG_BIG, dtype=torch.float32, device=device)
    zeros = torch.zeros(2, num_rows, dtype=torch.float32, device=device)
    return running_max, zeros[0], zeros[1]


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result (fp32 accumulate on CUDA for half inputs)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    if a.dtype == torch.float16:  # the interpreter on CPU: an fp16 output would overflow
        return a.float() @ b.float()
    return (a @ b).float()


def _chunk_width(num_rows: int, vocab_size: int) -> int:
    """Vocab columns per chunk: an fp32 ``[num_rows, width]`` buffer of ~``CHUNK_ELEMENTS``."""
    return tiles.vocab_chunk_width(num_rows, vocab_size, CHUNK_ELEMENTS, VOCAB_ALIGN)


class _VocabChunk(NamedTuple):
    start: int
    stop: int
    weight: torch.Tensor  # [C, H] the chunk's lm_head rows
    logits: torch.Tensor  # [R, C] fp32 h·Wᵀ
    out: torch.Tensor  # [R, C] where the kernel writes p or dz (the logits for fp32 weights)
    bias: dict  # the chunk's bias as the kernels take it (_bias_args)


def _vocab_chunks(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, writes_out: bool
):
    """The vocabulary in chunks of ``_chunk_width`` columns, each with its GEMM done.

    ``out`` is the logits buffer itself for fp32 weights (the kernels read a tile before
    writing it) and, when the kernel ``writes_out``, a buffer in the weight's dtype
    otherwise, so the next GEMMs run on tensor cores.
    """
    vocab_size = weight.shape[0]
    width = _chunk_width(rows.shape[0], vocab_size)
    for start in range(0, vocab_size, width):
        stop = min(start + width, vocab_size)
        chunk_weight = weight[start:stop]
        logits = _mm_fp32(rows, chunk_weight.T)
        out = logits
        if writes_out and weight.dtype != torch.float32:
            out = torch.empty_like(logits, dtype=weight.dtype)
        chunk_bias = _bias_args(weight, None if bias is None else bias[start:stop])
        yield _VocabChunk(start, stop, chunk_weight, logits, out, chunk_bias)
        del logits, out  # before the next chunk's GEMM: one chunk at a time


def _fused(tokens: TokenBatch, with_expectation: bool):
    """``kernels/fused_logprob`` when ``CUDA_KERNEL`` selects it and this group qualifies."""
    if CUDA_KERNEL == "gemm_fold":
        return None
    from . import fused_logprob

    return fused_logprob if fused_logprob.applies(CUDA_KERNEL, tokens, with_expectation) else None


def _group_key(tokens: TokenBatch, wants_expectation: bool) -> tuple:
    """Streams with the same lm_head (and bias, and path) are stacked into one GEMM."""
    bias = tokens.bias
    return (
        tokens.weight.data_ptr(),
        tokens.weight.shape,
        tokens.weight.stride(),
        tokens.weight.dtype,
        tokens.hidden.dtype,
        None if bias is None else (bias.data_ptr(), bias.dtype),
        wants_expectation,
    )


def forward(
    requests: list[ForwardRequest], transform: LogitTransform, chunk_elements: int | None = None
) -> list[BackendResult]:
    """Per request, ``BackendResult(logp [M], lse [M], expected [M, H] or None, log_sum_sq [M]
    or None)``, fp32. (``chunk_elements`` is the torch backend's knob; vocab chunks here
    follow ``CHUNK_ELEMENTS``.) ``log_sum_sq`` (WPO's ``log Σ_v p_tv²``) comes from the same
    fold; requests sharing an lm_head are scored together, one GEMM per vocab chunk.
    """
    groups: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(_group_key(request.tokens, request.expectation), []).append(i)
    results: list = [None] * len(requests)
    for members in groups.values():
        parts = [requests[i].tokens for i in members]
        with_sq = any(requests[i].log_sum_sq for i in members)
        with_expectation = requests[members[0]].expectation
        logp, lse, expected, sq = _forward_group(parts, transform, with_expectation, with_sq)
        start = 0
        for i, tokens in zip(members, parts):
            stop = start + tokens.num_rows
            rows_expected = None if expected is None else expected[start:stop]
            rows_sq = sq[start:stop] if requests[i].log_sum_sq else None
            results[i] = BackendResult(logp[start:stop], lse[start:stop], rows_expected, rows_sq)
            start = stop
    return results


def _forward_group(
    parts: list[TokenBatch], transform: LogitTransform, with_expectation: bool, with_sq: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Stacked rows of streams sharing one lm_head: ``(logp, lse, expected, log_sum_sq)``."""
    # The opt-in fused-epilogue GEMM forms no log Σ p²: WPO's rows take the fold below.
    fused = None if with_sq else _fused(parts[0], with_expectation)
    if fused is not None:
        return (*fused.forward_group(parts, transform), None)
    weight, bias = parts[0].weight, parts[0].bias
    hidden_size = weight.shape[1]
    device = weight.device
    gathered = [p.rows(0, p.num_rows) for p in parts]
    rows = gathered[0] if len(gathered) == 1 else torch.cat(gathered)  # [R, H]
    del gathered
    targets = torch.cat([p.targets for p in parts]).long().contiguous()  # [R]
    num_rows = rows.shape[0]
    running_max, running_sum, target_logit = _running_stats(num_rows, device)
    expected = rescale = None
    if with_expectation:
        expected = torch.zeros(num_rows, hidden_size, dtype=torch.float32, device=device)
        rescale = torch.empty(num_rows, dtype=torch.float32, device=device)
    sq_sum = torch.zeros(num_rows, dtype=torch.float32, device=device) if with_sq else None
    if num_rows == 0:
        return target_logit, target_logit, expected, sq_sum
    for chunk in _vocab_chunks(rows, weight, bias, writes_out=with_expectation):
        _fold(
            chunk.logits, targets, chunk.bias, chunk.start, transform,
            (running_max, running_sum, target_logit),
            probs=chunk.out if with_expectation else None, rescale=rescale, sq=sq_sum,
        )  # fmt: skip
        if expected is not None:
            # E ← E·exp(m_old − m_new) + exp(z − m_new)·s·W_c: the online softmax-weighted sum.
            expected.mul_(rescale[:, None]).add_(_mm_fp32(chunk.out, chunk.weight))
        del chunk
    lse = running_max + torch.log(running_sum)
    if expected is not None:
        expected.div_(running_sum[:, None])
    if sq_sum is not None:  # log Σ p² = log Σ e^{2(z−m)} − 2·log Σ e^{z−m}
        sq_sum = torch.log(sq_sum) - 2 * torch.log(running_sum)
    return target_logit - lse, lse, expected, sq_sum


def _dz_chunks(
    rows: torch.Tensor,  # [M, H]
    tokens: TokenBatch,
    transform: LogitTransform,
    lse: torch.Tensor,  # [M] fp32
    grad_logp: torch.Tensor,  # [M] fp32
):
    """Per vocab chunk, ``(start, stop, dz [M, C])`` in the weight's dtype: the fused dz GEMM
    where it applies (``fused_logprob.dz_chunks``), else a cuBLAS GEMM recomputes the chunk's
    logits and ``_grad_logits_kernel`` turns them into ``dz``."""
    weight, bias = tokens.weight, tokens.bias
    targets = tokens.targets.long().contiguous()
    if (fused := _fused(tokens, False)) is not None:
        yield from fused.dz_chunks(rows, weight, bias, targets, lse, grad_logp, transform)
        return
    blocks = _fold_blocks()
    for chunk in _vocab_chunks(rows, weight, bias, writes_out=True):
        _grad_logits_kernel[(triton.cdiv(rows.shape[0], blocks["BLOCK_M"]),)](
            logits_ptr=chunk.logits,
            targets_ptr=targets,
            lse_ptr=lse,
            grad_ptr=grad_logp,
            **chunk.bias,
            dz_ptr=chunk.out,
            dz_row_stride=chunk.stop - chunk.start,
            num_rows=rows.shape[0],
            chunk_start=chunk.start,
            chunk_width=chunk.stop - chunk.start,
            **_transform_args(transform),
            HALF_IN_PLACE=False,
            **blocks,
        )
        yield chunk.start, chunk.stop, chunk.out
        del chunk  # before the next chunk's GEMM


# The recompute path's backward and the store path's two steps live in their own modules.
from .logprob_backward import backward  # noqa: E402, F401
from .logprob_store import group_grads, group_logits  # noqa: E402, F401
