"""Fused-epilogue Triton GEMMs for ``sequence_logps`` on CUDA: logits tiles never leave registers.

Story in order:
1. ``_tile_coords``: the persistent tile order, GROUP_M row tiles side by side so that a
   weight tile is reused from L2 (the ordering of Triton's persistent-matmul tutorial).
2. ``_mainloop``: ``acc = rows[m-tile] · W[n-tile]ᵀ`` over H in fp32. Tiles come through TMA
   tensor descriptors (``TMA``; Hopper's bulk tensor copy, ``wgmma`` on the GPU) or plain
   masked pointer loads of the same tile (unaligned H, GPUs without TMA: a correctness
   fall-back, not pipelined in the persistent loop, at its own smaller tiles, see
   tests/test_triton_compile.py). Interpreted, the operands are cast to fp32 first
   (``DOT_FP32``): the interpreter's bf16 dot is wrong (triton-lang/triton#11584); bf16
   products are exact in fp32, so this is the GPU's math. The interpreter (triton 3.9) runs
   the TMA descriptors too, so both loaders are tested on CPU.
3. ``_logits2``: the logit transform in base-2 units, ``z₂ = log2(e)·softcap(mult·(acc + b))``
   with ``log2(e)`` folded into the multiplier and the softcap's tanh written with ``exp2``.
4. ``_fused_gemm_kernel``: the persistent loop (tile order, mainloop, row targets), then the
   epilogue on one column part of the tile at a time (``EPILOGUE_PARTS``). Forward
   (``_partials``): per (row, part) the max and the sum of ``exp2(z₂ − max)``, and the
   target logit from the one part that holds it; every value is written by exactly one
   part, so no atomics and no logits in HBM. ``STORE`` (the store path's forward) also keeps
   ``exp2(z₂ − part max)·s``, in ``[0, 1]``, in the weight's dtype. ``DZ`` (backward):
   ``dz = g·(onehot − exp2(z₂ − lse₂))·s·mult`` in the weight's dtype. Tiles leave through
   TMA stores (``_store_tile``) or masked pointer stores.
5. ``_merge_partials_kernel`` folds one vocab chunk's partials, part by part in a fixed
   order, into each row's running (max, sum): deterministic.
6. ``_store_dz_kernel`` (store path, once ``g`` is known): ``dz`` in place of what ``STORE``
   kept, ``p·s = kept·exp2(part max − lse₂)``; the target column from the fp32 log-prob.

Ideas from QuACK's GEMM with an online-logsumexp epilogue (``lse_target_epi``, no stored
logits; Dao-AILab/quack) and Triton's persistent TMA matmul tutorial (09-persistent-matmul);
the code is this project's own. Host code: ``kernels/fused_logprob.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of a linear tile id: groups of GROUP_M row tiles walk the vocab
    together, so each weight tile is read from HBM about once per group."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _mainloop(
    rows,  # [R, H] 16-bit: TMA descriptor (block [BLOCK_M, BLOCK_K]) or pointer
    weight,  # [C, H] the chunk's lm_head rows: TMA descriptor (block [BLOCK_N, BLOCK_K]) or pointer
    stride_rows,  # elements between rows (pointer loads)
    stride_weight,
    num_rows,
    chunk_width,
    hidden_size,
    off_m,
    off_n,
    TMA: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 ``[BLOCK_M, BLOCK_N]`` tile of ``rows · weightᵀ``; out-of-range rows, columns and
    K are zero-filled (by the TMA unit, or by the load masks)."""
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    o_m = off_m + tl.arange(0, BLOCK_M)
    o_n = off_n + tl.arange(0, BLOCK_N)
    for k in range(0, tl.cdiv(hidden_size, BLOCK_K)):
        off_k = k * BLOCK_K
        if TMA:
            b_a = rows.load([off_m, off_k])
            b_b = weight.load([off_n, off_k])
        else:
            o_k = off_k + tl.arange(0, BLOCK_K)
            m_k = o_k < hidden_size
            p_a = rows + o_m.to(tl.int64)[:, None] * stride_rows + o_k[None, :]
            p_b = weight + o_n.to(tl.int64)[:, None] * stride_weight + o_k[None, :]
            b_a = tl.load(p_a, mask=(o_m < num_rows)[:, None] & m_k[None, :], other=0.0)
            b_b = tl.load(p_b, mask=(o_n < chunk_width)[:, None] & m_k[None, :], other=0.0)
        if DOT_FP32:
            b_a = b_a.to(tl.float32)
            b_b = b_b.to(tl.float32)
        b_acc = tl.dot(b_a, b_b.T, b_acc)
    return b_acc


@triton.jit
def _logits2(
    b_acc,  # fp32 [BLOCK_M, BLOCK_N] rows·Wᵀ
    b_ptr,  # the chunk's bias [C] (any pointer when has_bias is 0)
    has_bias,
    o_n,  # [BLOCK_N] columns relative to the chunk
    m_n,  # [BLOCK_N] valid columns
    scale2,  # mult·log2(e)
    cap2,  # softcap·log2(e)
    cap_k,  # 2/softcap
    HAS_SOFTCAP: tl.constexpr,
):
    """``z₂ = log2(e)·softcap(mult·(acc + b))``; invalid columns are −inf.

    ``c·tanh(u/c) = c·(1 − 2/(exp(2u/c) + 1))`` saturates cleanly at ±c; in base 2 the
    exponent is ``exp2(u₂·2/c)`` with ``u₂ = log2(e)·u``.
    """
    if has_bias != 0:
        b_acc += tl.load(b_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    b_z2 = b_acc * scale2
    if HAS_SOFTCAP:
        b_z2 = cap2 * (1.0 - 2.0 / (tl.exp2(b_z2 * cap_k) + 1.0))
    return tl.where(m_n[None, :], b_z2, float("-inf"))


@triton.jit
def _halves(b_acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right ``[BLOCK_M, BLOCK_N // 2]`` halves of a tile (epilogue subtiling,
    as the persistent-matmul tutorial: fewer live registers per step)."""
    return tl.split(tl.permute(tl.reshape(b_acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _slope(b_z2, inv_cap2):
    """The softcap's slope ``∂z/∂u = 1 − (z/c)²`` (``z₂/cap₂ = z/c``). Padding columns (z₂ =
    −inf) get a non-finite slope: they are never stored (TMA clips them, pointer stores mask)."""
    b_ratio = b_z2 * inv_cap2
    return 1.0 - b_ratio * b_ratio


@triton.jit
def _store_tile(out, stride_out, b_out, off_m, off_n, o_m, m_m, o_n, m_n, TMA: tl.constexpr):
    """``b_out`` into ``out`` at ``[off_m, off_n]`` in out's dtype: one TMA store (the unit
    clips rows and columns past the end) or masked pointer stores."""
    if TMA:
        out.store([off_m, off_n], b_out.to(out.dtype))
    else:
        p_out = out + o_m.to(tl.int64)[:, None] * stride_out + o_n[None, :]
        tl.store(p_out, b_out.to(out.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _partials(
    b_z2,  # fp32 [BLOCK_M, PART_N] z₂ of the columns o_n = [off_n, off_n + PART_N)
    off_n,
    o_m,
    m_m,
    o_n,
    b_target,  # [BLOCK_M] target columns relative to the chunk
    part_max_ptr,
    part_sum_ptr,
    tgt_ptr,
    num_rows,
    chunk_width,
    PART_N: tl.constexpr,
):
    """Store the part's ``(max, Σ exp2(z₂ − max))`` per row and the target's z₂ where the part
    holds it; returns ``exp2(z₂ − max)``. The max is floored at a finite −1e30 so that a
    part of padding columns adds exactly 0."""
    b_max = tl.maximum(tl.max(b_z2, axis=1), -1.0e30)
    b_e = tl.exp2(b_z2 - b_max[:, None])
    o_part = (off_n // PART_N).to(tl.int64) * num_rows + o_m
    tl.store(part_max_ptr + o_part, b_max, mask=m_m)
    tl.store(part_sum_ptr + o_part, tl.sum(b_e, axis=1), mask=m_m)
    b_tgt = tl.sum(tl.where(o_n[None, :] == b_target[:, None], b_z2, 0.0), axis=1)
    m_here = (b_target >= off_n) & (b_target < tl.minimum(off_n + PART_N, chunk_width))
    tl.store(tgt_ptr + o_m, b_tgt, mask=m_m & m_here)
    return b_e


@triton.jit
def _fused_gemm_kernel(
    rows,  # [R, H] descriptor or pointer (see _mainloop)
    weight,  # [C, H] descriptor or pointer
    stride_rows,
    stride_weight,
    b_ptr,
    has_bias,
    targets_ptr,  # int64 [R] vocab ids
    part_max_ptr,  # fp32 [P, R] out (forward): per epilogue part of the chunk, the max of z₂
    part_sum_ptr,  # fp32 [P, R] out (forward): Σ exp2(z₂ − max) over the part
    tgt_ptr,  # fp32 [R] out (forward): z₂ of the target, written by the part that holds it
    lse_ptr,  # fp32 [R] (DZ) natural-log logsumexp of each row
    grad_ptr,  # fp32 [R] (DZ) g, the upstream gradient of each row's logp
    out,  # [R, C] out (DZ or STORE), weight's dtype: descriptor (block [BLOCK_M, part]) or pointer
    stride_out,
    num_rows,
    chunk_start,  # vocab id of the chunk's first column
    chunk_width,
    hidden_size,
    scale2,
    cap2,
    cap_k,
    multiplier,
    DZ: tl.constexpr,
    STORE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    TMA: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE_PARTS: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):
    """Persistent GEMM over (row tile, vocab tile) of one vocab chunk; the epilogue takes
    ``EPILOGUE_PARTS`` (1 or 2) column parts of each tile in turn.

    Forward: logsumexp partials per (row, part), ``8·BLOCK_M`` bytes per part instead of
    ``4·BLOCK_M·BLOCK_N`` of logits; with ``STORE`` (the store path) also
    ``exp2(z₂ − part max)·s`` into ``out``, in ``[0, 1]``. ``DZ``: ``dz = g·(onehot −
    softmax(z))·s·mult`` into ``out``, ``s`` the softcap slope ``1 − (z/c)²``.
    """
    num_pid_m = tl.cdiv(num_rows, BLOCK_M)
    num_pid_n = tl.cdiv(chunk_width, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        b_acc = _mainloop(
            rows, weight, stride_rows, stride_weight, num_rows, chunk_width, hidden_size,
            off_m, pid_n * BLOCK_N, TMA, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        o_m = off_m + tl.arange(0, BLOCK_M)
        m_m = o_m < num_rows
        b_target = tl.load(targets_ptr + o_m, mask=m_m, other=-1) - chunk_start
        if DZ:
            b_lse2 = tl.load(lse_ptr + o_m, mask=m_m, other=0.0) * 1.4426950408889634
            b_g = tl.load(grad_ptr + o_m, mask=m_m, other=0.0) * multiplier
        if EPILOGUE_PARTS == 2:
            b_parts = _halves(b_acc, BLOCK_M, BLOCK_N)
        else:
            b_parts = (b_acc,)
        for i in tl.static_range(EPILOGUE_PARTS):
            off_n = pid_n * BLOCK_N + i * (BLOCK_N // EPILOGUE_PARTS)
            o_n = off_n + tl.arange(0, BLOCK_N // EPILOGUE_PARTS)
            m_n = o_n < chunk_width
            b_z2 = _logits2(b_parts[i], b_ptr, has_bias, o_n, m_n, scale2, cap2, cap_k, HAS_SOFTCAP)
            if DZ:
                b_p = tl.exp2(b_z2 - b_lse2[:, None])
                b_out = b_g[:, None] * tl.where(o_n[None, :] == b_target[:, None], 1.0 - b_p, -b_p)
            else:
                b_out = _partials(
                    b_z2, off_n, o_m, m_m, o_n, b_target, part_max_ptr, part_sum_ptr, tgt_ptr,
                    num_rows, chunk_width, BLOCK_N // EPILOGUE_PARTS,
                )  # fmt: skip
            if HAS_SOFTCAP and (DZ or STORE):
                b_out = b_out * _slope(b_z2, 1.0 / cap2)
            if DZ or STORE:
                _store_tile(out, stride_out, b_out, off_m, off_n, o_m, m_m, o_n, m_n, TMA)


@triton.jit
def _merge_partials_kernel(
    part_max_ptr,  # fp32 [P, R] a chunk's per-part maxima (base 2)
    part_sum_ptr,  # fp32 [P, R] per-part sums of exp2(z₂ − max)
    max_ptr,  # fp32 [R] running max, updated in place
    sum_ptr,  # fp32 [R] running sum of exp2(z₂ − running max), updated in place
    num_rows,
    num_parts,
    BLOCK_R: tl.constexpr,
):
    """Fold a chunk's partials into the running statistics, part 0 first: fixed order."""
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < num_rows
    b_max = tl.load(max_ptr + o_r, mask=m_r, other=0.0)
    b_sum = tl.load(sum_ptr + o_r, mask=m_r, other=0.0)
    for t in range(0, num_parts):
        o_part = t * num_rows.to(tl.int64) + o_r
        b_part_max = tl.load(part_max_ptr + o_part, mask=m_r, other=0.0)
        b_part_sum = tl.load(part_sum_ptr + o_part, mask=m_r, other=0.0)
        b_new = tl.maximum(b_max, b_part_max)
        b_sum = b_sum * tl.exp2(b_max - b_new) + b_part_sum * tl.exp2(b_part_max - b_new)
        b_max = b_new
    tl.store(max_ptr + o_r, b_max, mask=m_r)
    tl.store(sum_ptr + o_r, b_sum, mask=m_r)


@triton.jit
def _store_dz_kernel(
    probs_ptr,  # [R, V] weight's dtype: exp2(z₂ − part max)·s in, dz out (in place)
    stride_probs,
    part_max_ptr,  # fp32 [P, R] base-2 max of each PART_N-column part of the vocabulary
    targets_ptr,  # int64 [R]
    lse_ptr,  # fp32 [R] natural-log logsumexp
    logp_ptr,  # fp32 [R] log-prob of the target
    grad_ptr,  # fp32 [R] g
    num_rows,
    vocab_size,
    softcap,
    multiplier,
    HAS_SOFTCAP: tl.constexpr,
    PART_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """The store path's ``dz = g·(onehot − p)·s·mult`` in place of what the forward kept.

    Off the target ``p·s = kept·exp2(part max − lse₂)``, a product: one more rounding to the
    weight's dtype than ``dz`` itself. At the target ``g·s_y·(1 − p_y)·mult`` comes from the
    fp32 ``logp`` (``z_y = logp + lse``), so ``1 − p_y`` cancels nothing that was rounded.
    """
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < num_rows
    b_target = tl.load(targets_ptr + o_m, mask=m_m, other=-1)
    b_lse = tl.load(lse_ptr + o_m, mask=m_m, other=0.0)
    b_logp = tl.load(logp_ptr + o_m, mask=m_m, other=0.0)
    b_g = tl.load(grad_ptr + o_m, mask=m_m, other=0.0) * multiplier
    b_dz_target = b_g * (1.0 - tl.exp(b_logp))
    if HAS_SOFTCAP:
        b_ratio = (b_logp + b_lse) / softcap
        b_dz_target = b_dz_target * (1.0 - b_ratio * b_ratio)
    b_lse2 = b_lse * 1.4426950408889634
    for v0 in range(0, vocab_size, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_tile = m_m[:, None] & (o_v < vocab_size)[None, :]
        p_probs = probs_ptr + o_m.to(tl.int64)[:, None] * stride_probs + o_v[None, :]
        b_kept = tl.load(p_probs, mask=m_tile, other=0.0).to(tl.float32)
        o_part = (o_v // PART_N).to(tl.int64)[None, :] * num_rows + o_m[:, None]
        b_part_max = tl.load(part_max_ptr + o_part, mask=m_tile, other=0.0)
        b_dz = -b_g[:, None] * (b_kept * tl.exp2(b_part_max - b_lse2[:, None]))
        b_dz = tl.where(o_v[None, :] == b_target[:, None], b_dz_target[:, None], b_dz)
        tl.store(p_probs, b_dz.to(probs_ptr.dtype.element_ty), mask=m_tile)
