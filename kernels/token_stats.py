"""Triton kernels of ``token_logps``: fold one vocab chunk of raw logits into per-token stats.

Story in order:
1. ``_z_block``: load a ``[BLOCK_M, BLOCK_V]`` block of a chunk's raw logits ``u = h·Wᵀ + b``
   (a cuBLAS GEMM output in the compute dtype) and apply TRL's transform in fp32:
   ``z = softcap(logit_scale·u) / temperature``, with the chain-rule slope ``∂z/∂u``.
2. ``_fold_kernel``: the online-softmax statistics of each row over that chunk — running max,
   ``Σ e``, ``Σ e·z`` (entropy), ``Σ e²`` (``log Σ p²``), ``Σ z`` (mean logit), the largest
   logit before the target (top-1 hit, first-argmax rule) and the target logit — all in the
   one pass that also serves the log-prob. With ``WRITE_PROBS`` (frozen lm_head) it overwrites
   the chunk with ``exp(z − new max)·∂z/∂u`` so the host accumulates ``E = softmax·s·W``.
3. ``_grad_kernel``: the chunk's ``∂L/∂u`` in place, from the log-prob gradient
   ``g·(onehot − p)`` and the entropy gradient ``−g_H·p·(log p + H)``.

The GEMM-per-vocab-chunk + fold-kernel split follows TRL 1.16's ``chunked_logprob.py``; here
the rows of a chunk are folded in 2-D blocks, and the kernels are fastalign's own.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _z_block(
    tile_ptr, o_m, m_m, v0, num_cols, stride_m, logit_scale, softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Columns ``[v0, v0 + BLOCK_V)`` of the rows ``o_m``: ``(o_v, m_v, m_tile, z, slope)``,
    fp32, invalid columns at −inf in ``z``."""
    o_v = v0 + tl.arange(0, BLOCK_V)
    m_v = o_v < num_cols
    m_tile = m_m[:, None] & m_v[None, :]
    p_tile = tile_ptr + o_m.to(tl.int64)[:, None] * stride_m + o_v[None, :]
    b_u = tl.load(p_tile, mask=m_tile, other=0.0).to(tl.float32) * logit_scale
    if HAS_SOFTCAP:
        # tanh(x) = 1 − 2/(exp(2x) + 1): saturates cleanly at ±1
        b_t = 1.0 - 2.0 / (tl.exp(2.0 * b_u / softcap) + 1.0)
        b_z = softcap * b_t * inv_temp
        b_slope = logit_scale * (1.0 - b_t * b_t) * inv_temp
    else:
        b_z = b_u * inv_temp
        b_slope = tl.zeros_like(b_z) + logit_scale * inv_temp
    b_z = tl.where(m_v[None, :], b_z, float("-inf"))
    return o_v, m_v, m_tile, b_z, b_slope


@triton.jit
def _fold_kernel(
    tile_ptr,  # [M, C] raw logits of one vocab chunk, compute dtype; probs out (WRITE_PROBS)
    targets_ptr,  # int64 [M]
    max_ptr,  # fp32 [M] running max, in place
    sum_ptr,  # fp32 [M] Σ exp(z − max), in place
    zexp_ptr,  # fp32 [M] Σ exp(z − max)·z, in place (HAS_ENTROPY)
    sqexp_ptr,  # fp32 [M] Σ exp(z − max)², in place (HAS_SQ)
    zsum_ptr,  # fp32 [M] Σ z, in place (HAS_MEAN)
    before_ptr,  # fp32 [M] max z over ids below the target, in place (HAS_TOP1)
    target_ptr,  # fp32 [M] target logit, written by the chunk that holds it
    rescale_ptr,  # fp32 [M] out (WRITE_PROBS): exp(old max − new max)
    num_rows,
    num_cols,
    stride_m,
    vocab_start,
    logit_scale,
    softcap,
    inv_temp,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_SQ: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    HAS_TOP1: tl.constexpr,
    WRITE_PROBS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One vocab chunk into each row's online-softmax statistics (see the module docstring)."""
    i_m = tl.program_id(0)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < num_rows
    b_local = tl.load(targets_ptr + o_m, mask=m_m, other=-1) - vocab_start
    b_old_max = tl.load(max_ptr + o_m, mask=m_m, other=0.0)
    b_max = b_old_max
    b_sum = tl.load(sum_ptr + o_m, mask=m_m, other=0.0)
    b_zexp = tl.load(zexp_ptr + o_m, mask=m_m, other=0.0)
    b_sqexp = tl.load(sqexp_ptr + o_m, mask=m_m, other=0.0)
    b_zsum = tl.load(zsum_ptr + o_m, mask=m_m, other=0.0)
    b_before = tl.load(before_ptr + o_m, mask=m_m, other=0.0)
    b_tgt = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(0, num_cols, BLOCK_V):
        o_v, m_v, m_tile, b_z, b_slope = _z_block(
            tile_ptr, o_m, m_m, v0, num_cols, stride_m, logit_scale, softcap, inv_temp,
            HAS_SOFTCAP, BLOCK_V,
        )  # fmt: skip
        b_tgt += tl.sum(tl.where(o_v[None, :] == b_local[:, None], b_z, 0.0), axis=1)
        if HAS_MEAN:
            b_zsum += tl.sum(tl.where(m_v[None, :], b_z, 0.0), axis=1)
        if HAS_TOP1:
            b_lower = tl.where(o_v[None, :] < b_local[:, None], b_z, float("-inf"))
            b_before = tl.maximum(b_before, tl.max(b_lower, axis=1))
        b_new_max = tl.maximum(b_max, tl.max(b_z, axis=1))
        b_rescale = tl.exp(b_max - b_new_max)
        b_e = tl.exp(b_z - b_new_max[:, None])
        b_sum = b_sum * b_rescale + tl.sum(b_e, axis=1)
        if HAS_ENTROPY:
            b_zexp = b_zexp * b_rescale + tl.sum(b_e * tl.where(m_v[None, :], b_z, 0.0), axis=1)
        if HAS_SQ:
            b_sqexp = b_sqexp * b_rescale * b_rescale + tl.sum(b_e * b_e, axis=1)
        b_max = b_new_max
    tl.store(max_ptr + o_m, b_max, mask=m_m)
    tl.store(sum_ptr + o_m, b_sum, mask=m_m)
    if HAS_ENTROPY:
        tl.store(zexp_ptr + o_m, b_zexp, mask=m_m)
    if HAS_SQ:
        tl.store(sqexp_ptr + o_m, b_sqexp, mask=m_m)
    if HAS_MEAN:
        tl.store(zsum_ptr + o_m, b_zsum, mask=m_m)
    if HAS_TOP1:
        tl.store(before_ptr + o_m, b_before, mask=m_m)
    m_here = m_m & (b_local >= 0) & (b_local < num_cols)
    tl.store(target_ptr + o_m, b_tgt, mask=m_here)
    if WRITE_PROBS:
        tl.store(rescale_ptr + o_m, tl.exp(b_old_max - b_max), mask=m_m)
        _write_probs(
            tile_ptr, o_m, m_m, b_max, num_cols, stride_m, logit_scale, softcap, inv_temp,
            HAS_SOFTCAP, BLOCK_V,
        )  # fmt: skip


@triton.jit
def _write_probs(
    tile_ptr, o_m, m_m, b_max, num_cols, stride_m, logit_scale, softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Overwrite the rows ``o_m`` of a chunk with ``exp(z − b_max)·∂z/∂u`` (frozen lm_head).
    Each block is read before the same block is written, so the chunk is reused in place."""
    for v0 in range(0, num_cols, BLOCK_V):
        o_v, m_v, m_tile, b_z, b_slope = _z_block(
            tile_ptr, o_m, m_m, v0, num_cols, stride_m, logit_scale, softcap, inv_temp,
            HAS_SOFTCAP, BLOCK_V,
        )  # fmt: skip
        b_p = tl.exp(b_z - b_max[:, None]) * b_slope
        p_tile = tile_ptr + o_m.to(tl.int64)[:, None] * stride_m + o_v[None, :]
        tl.store(p_tile, b_p.to(tile_ptr.dtype.element_ty), mask=m_tile)


@triton.jit
def _grad_kernel(
    tile_ptr,  # [M, C] recomputed raw logits of one vocab chunk; ∂L/∂u written in place
    targets_ptr,  # int64 [M]
    logz_ptr,  # fp32 [M] log Σ exp z
    entropy_ptr,  # fp32 [M] (HAS_ENTROPY_GRAD)
    grad_logp_ptr,  # fp32 [M] (HAS_LOGP_GRAD)
    grad_entropy_ptr,  # fp32 [M] (HAS_ENTROPY_GRAD)
    num_rows,
    num_cols,
    stride_m,
    vocab_start,
    logit_scale,
    softcap,
    inv_temp,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGP_GRAD: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``∂L/∂u = (g·(onehot − p) − g_H·p·(log p + H))·∂z/∂u`` for one block of a chunk."""
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < num_rows
    v0 = tl.program_id(1) * BLOCK_V
    o_v, m_v, m_tile, b_z, b_slope = _z_block(
        tile_ptr, o_m, m_m, v0, num_cols, stride_m, logit_scale, softcap, inv_temp,
        HAS_SOFTCAP, BLOCK_V,
    )  # fmt: skip
    b_logp = b_z - tl.load(logz_ptr + o_m, mask=m_m, other=0.0)[:, None]
    b_p = tl.exp(b_logp)
    b_dz = tl.zeros_like(b_z)
    if HAS_LOGP_GRAD:
        b_g = tl.load(grad_logp_ptr + o_m, mask=m_m, other=0.0)
        b_local = tl.load(targets_ptr + o_m, mask=m_m, other=-1) - vocab_start
        b_hit = (o_v[None, :] == b_local[:, None]).to(tl.float32)
        b_dz += b_g[:, None] * (b_hit - b_p)
    if HAS_ENTROPY_GRAD:
        b_gh = tl.load(grad_entropy_ptr + o_m, mask=m_m, other=0.0)
        b_h = tl.load(entropy_ptr + o_m, mask=m_m, other=0.0)
        b_dz -= b_gh[:, None] * b_p * (tl.where(m_v[None, :], b_logp, 0.0) + b_h[:, None])
    p_tile = tile_ptr + o_m.to(tl.int64)[:, None] * stride_m + o_v[None, :]
    tl.store(p_tile, (b_dz * b_slope).to(tile_ptr.dtype.element_ty), mask=m_tile)


def blocks() -> dict:
    """Tile sizes: wide vocab blocks on the GPU, small ones interpreted (fast, many chunks)."""
    if INTERPRET:
        return dict(BLOCK_M=8, BLOCK_V=32, num_warps=1)
    return dict(BLOCK_M=4, BLOCK_V=512, num_warps=4)


def fold(tile, targets, stats, vocab_start, transform, flags, rescale=None) -> None:
    """Launch ``_fold_kernel`` on one ``[M, C]`` chunk; ``stats`` fields are updated in place.

    ``flags``: ``HAS_ENTROPY``/``HAS_SQ``/``HAS_MEAN``/``HAS_TOP1`` booleans; ``rescale``
    (fp32 ``[M]``) turns on ``WRITE_PROBS``.
    """
    num_rows, num_cols = tile.shape
    cfg = blocks()
    _fold_kernel[(triton.cdiv(num_rows, cfg["BLOCK_M"]),)](
        tile, targets, stats.running_max, stats.sum_exp, stats.z_exp, stats.sq_exp,
        stats.z_sum, stats.max_before_target, stats.target_z,
        stats.sum_exp if rescale is None else rescale,
        num_rows, num_cols, tile.stride(0), vocab_start, **transform,
        WRITE_PROBS=rescale is not None, **flags, **cfg,
    )  # fmt: skip


def grad(tile, targets, log_z, entropy, grad_logp, grad_entropy, vocab_start, transform) -> None:
    """Launch ``_grad_kernel``: ``tile`` (``[M, C]`` raw logits) becomes ``∂L/∂u`` in place."""
    num_rows, num_cols = tile.shape
    cfg = blocks()
    grid = (triton.cdiv(num_rows, cfg["BLOCK_M"]), triton.cdiv(num_cols, cfg["BLOCK_V"]))
    _grad_kernel[grid](
        tile, targets, log_z, log_z if entropy is None else entropy,
        log_z if grad_logp is None else grad_logp,
        log_z if grad_entropy is None else grad_entropy,
        num_rows, num_cols, tile.stride(0), vocab_start, **transform,
        HAS_LOGP_GRAD=grad_logp is not None, HAS_ENTROPY_GRAD=grad_entropy is not None, **cfg,
    )  # fmt: skip
