"""Triton backend of ``sequence_logps``: fused tiled forward, recompute-based backward.

Story in order:
1. ``_logits_tile``: one ``[BLOCK_M, BLOCK_V]`` tile of ``z = softcap(mult·(h·Wᵀ + b))`` in
   fp32, from a K-loop of ``tl.dot`` over the hidden size.
2. ``_forward_kernel``: grid ``(token blocks, vocab splits, streams)``. Each program folds its
   vocab range into an online logsumexp (running max and sum, fp32) and picks up the target
   logit in the tile that holds it, then writes three partials per token. Several streams
   (policy, reference, KTO's mismatched rows) share one launch: their pointers, strides and
   sizes sit in a small int64 table indexed by the stream axis.
3. ``forward``: launches it and merges the vocab-split partials with a fixed-order torch
   reduction (deterministic: no float atomics).
4. ``_grad_logits_kernel`` + ``backward``: per chunk of tokens, recompute each logits tile and
   write ``dz = g·(onehot − softmax(z))`` (chained through the softcap and multiplier) into a
   bounded ``[chunk, V]`` buffer; two GEMMs then give ``grad_rows = dz·W`` and
   ``grad_W += dzᵀ·h`` in a fixed order (deterministic), ``grad_b += Σ dz``.
5. ``_softmax_fold_kernel`` + ``_forward_expectation``: the frozen-lm_head fast path. Per
   chunk of tokens a GEMM gives the logits, the fold kernel their logsumexp, target and
   softmax, and a second GEMM ``E_t = softmax(z_t)·W``, so the backward is elementwise.

FLOPs per scored token: forward 2HV; backward 2HV (recompute) + 4HV (two GEMMs), 2HV of them
skipped when the lm_head is frozen. Frozen-head fast path: 4HV in forward, none in backward.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._types import LogitTransform, TokenBatch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Sentinel for "no logit seen yet": finite, so exp(sentinel − m) is 0 and never NaN. A
# constexpr: compiled kernels may read no other kind of global.
NEG_BIG = tl.constexpr(-1.0e30)
# Columns of a vocab split are rounded to this, a multiple of every BLOCK_V in use.
SPLIT_ALIGN = 256
# Elements of the backward's [chunk, V] dz buffer (fp32: 256 MiB on CUDA, 4 MiB interpreted).
DZ_ELEMENTS = 1 << 20 if INTERPRET else 1 << 26


@triton.jit
def _logits_tile(
    h_ptr,
    stride_hk,
    row_offsets,  # [BLOCK_M] int64 element offsets of the rows
    m_m,  # [BLOCK_M] valid rows
    w_ptr,
    stride_wv,
    stride_wk,
    b_ptr,
    has_bias,
    o_v,  # [BLOCK_V] vocab ids
    m_v,  # [BLOCK_V] valid vocab ids
    H,
    multiplier,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 ``z`` tile ``[BLOCK_M, BLOCK_V]``; invalid columns are −inf."""
    b_acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < H
        p_h = h_ptr + row_offsets[:, None] + o_k[None, :] * stride_hk
        b_h = tl.load(p_h, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        p_w = w_ptr + o_v[None, :] * stride_wv + o_k[:, None] * stride_wk
        b_w = tl.load(p_w, mask=m_k[:, None] & m_v[None, :], other=0.0)  # [BLOCK_K, BLOCK_V]
        if DOT_FP32:
            # The interpreter multiplies raw bf16 bit patterns in tl.dot (design.md §5).
            b_h = b_h.to(tl.float32)
            b_w = b_w.to(tl.float32)
        b_acc = tl.dot(b_h, b_w, b_acc, input_precision=INPUT_PRECISION)
    return _transform(b_acc, b_ptr, has_bias, o_v, m_v, multiplier, softcap, HAS_SOFTCAP)


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
def _online_update(b_z, o_v, b_target, b_max, b_sum, b_tgt):
    """Fold a ``[BLOCK_M, BLOCK_V]`` tile of ``z`` into the running max, sum of exponentials
    and target logit of each row (the target is picked up in the tile that holds it)."""
    b_tgt += tl.sum(tl.where(o_v[None, :] == b_target[:, None], b_z, 0.0), axis=1)
    b_new_max = tl.maximum(b_max, tl.max(b_z, axis=1))
    b_sum = b_sum * tl.exp(b_max - b_new_max) + tl.sum(tl.exp(b_z - b_new_max[:, None]), axis=1)
    return b_new_max, b_sum, b_tgt


@triton.jit
def _forward_kernel(
    table_ptr,  # int64 [S, TABLE_COLS] per-stream pointers, strides and sizes
    part_max_ptr,  # fp32 [S, SPLITS, M_max]
    part_sum_ptr,  # fp32 [S, SPLITS, M_max]
    part_tgt_ptr,  # fp32 [S, SPLITS, M_max]
    M_max,
    V,
    H,
    split_width,
    multiplier,
    softcap,
    H_DTYPE: tl.constexpr,
    W_DTYPE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i_m, i_split, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p_row = table_ptr + i_s * 10
    num_rows = tl.load(p_row + 9)
    if i_m * BLOCK_M >= num_rows:
        return
    h_ptr = tl.load(p_row + 0).to(tl.pointer_type(H_DTYPE), bitcast=True)
    stride_hk = tl.load(p_row + 1)
    offsets_ptr = tl.load(p_row + 2).to(tl.pointer_type(tl.int64), bitcast=True)
    targets_ptr = tl.load(p_row + 3).to(tl.pointer_type(tl.int64), bitcast=True)
    w_ptr = tl.load(p_row + 4).to(tl.pointer_type(W_DTYPE), bitcast=True)
    stride_wv = tl.load(p_row + 5)
    stride_wk = tl.load(p_row + 6)
    b_ptr = tl.load(p_row + 7).to(tl.pointer_type(W_DTYPE), bitcast=True)
    has_bias = tl.load(p_row + 8)

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < num_rows
    b_rows = tl.load(offsets_ptr + o_m, mask=m_m, other=0)
    b_target = tl.load(targets_ptr + o_m, mask=m_m, other=-1)

    b_max = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_tgt = tl.zeros([BLOCK_M], dtype=tl.float32)
    v_start = i_split * split_width
    v_stop = tl.minimum(v_start + split_width, V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < v_stop
        b_z = _logits_tile(
            h_ptr,
            stride_hk,
            b_rows,
            m_m,
            w_ptr,
            stride_wv,
            stride_wk,
            b_ptr,
            has_bias,
            o_v,
            m_v,
            H,
            multiplier,
            softcap,
            HAS_SOFTCAP=HAS_SOFTCAP,
            DOT_FP32=DOT_FP32,
            INPUT_PRECISION=INPUT_PRECISION,
            BLOCK_M=BLOCK_M,
            BLOCK_V=BLOCK_V,
            BLOCK_K=BLOCK_K,
        )
        b_max, b_sum, b_tgt = _online_update(b_z, o_v, b_target, b_max, b_sum, b_tgt)
    o_part = (i_s * SPLITS + i_split) * M_max + o_m
    tl.store(part_max_ptr + o_part, b_max, mask=m_m)
    tl.store(part_sum_ptr + o_part, b_sum, mask=m_m)
    tl.store(part_tgt_ptr + o_part, b_tgt, mask=m_m)


@triton.jit
def _grad_logits_kernel(
    h_ptr,
    stride_hk,
    offsets_ptr,  # int64 [C] row offsets of this chunk
    targets_ptr,  # int64 [C]
    lse_ptr,  # fp32 [C]
    grad_ptr,  # fp32 [C] upstream gradient of each token's logp
    w_ptr,
    stride_wv,
    stride_wk,
    b_ptr,
    has_bias,
    dz_ptr,  # [C, V] out, dtype of the weight (or fp32)
    num_rows,
    V,
    H,
    multiplier,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``dz = ∂L/∂(h·Wᵀ + b)`` for one ``[BLOCK_M, BLOCK_V]`` tile."""
    i_m, i_v = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < num_rows
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < V
    b_rows = tl.load(offsets_ptr + o_m, mask=m_m, other=0)
    b_z = _logits_tile(
        h_ptr,
        stride_hk,
        b_rows,
        m_m,
        w_ptr,
        stride_wv,
        stride_wk,
        b_ptr,
        has_bias,
        o_v,
        m_v,
        H,
        multiplier,
        softcap,
        HAS_SOFTCAP=HAS_SOFTCAP,
        DOT_FP32=DOT_FP32,
        INPUT_PRECISION=INPUT_PRECISION,
        BLOCK_M=BLOCK_M,
        BLOCK_V=BLOCK_V,
        BLOCK_K=BLOCK_K,
    )
    b_target = tl.load(targets_ptr + o_m, mask=m_m, other=-1)
    b_lse = tl.load(lse_ptr + o_m, mask=m_m, other=0.0)
    b_g = tl.load(grad_ptr + o_m, mask=m_m, other=0.0)
    b_onehot = (o_v[None, :] == b_target[:, None]).to(tl.float32)
    b_dz = b_g[:, None] * (b_onehot - tl.exp(b_z - b_lse[:, None]))
    if HAS_SOFTCAP:
        b_ratio = tl.where(m_v[None, :], b_z, 0.0) / softcap  # padding columns: z = −inf
        b_dz = b_dz * (1.0 - b_ratio * b_ratio)
    b_dz = b_dz * multiplier
    p_dz = dz_ptr + o_m[:, None] * V + o_v[None, :]
    tl.store(p_dz, b_dz.to(dz_ptr.dtype.element_ty), mask=m_m[:, None] & m_v[None, :])


@triton.jit
def _softmax_fold_kernel(
    logits_ptr,  # fp32 [C, V] h·Wᵀ of a chunk of rows (bias and transform not yet applied)
    targets_ptr,  # int64 [C]
    b_ptr,
    has_bias,
    probs_ptr,  # [C, V] out, the weight's dtype: softmax(z)·softcap slope (may alias logits)
    logp_ptr,  # fp32 [C] out
    lse_ptr,  # fp32 [C] out
    num_rows,
    V,
    multiplier,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Frozen-head forward, per row block: transform the logits, fold them into logsumexp
    and target logit, then write ``p·s`` (``s = ∂z/∂u``, 1 without softcap) for ``E = (p·s)·W``.

    The second pass reads a tile before writing the same tile, so ``probs`` may alias
    ``logits`` (fp32 weights).
    """
    i_m = tl.program_id(0)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < num_rows
    o_row = o_m.to(tl.int64)[:, None] * V
    b_target = tl.load(targets_ptr + o_m, mask=m_m, other=-1)
    b_max = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_tgt = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_x = tl.load(logits_ptr + o_row + o_v[None, :], mask=m_m[:, None] & m_v[None, :])
        b_z = _transform(b_x, b_ptr, has_bias, o_v, m_v, multiplier, softcap, HAS_SOFTCAP)
        b_max, b_sum, b_tgt = _online_update(b_z, o_v, b_target, b_max, b_sum, b_tgt)
    b_lse = b_max + tl.log(b_sum)
    tl.store(lse_ptr + o_m, b_lse, mask=m_m)
    tl.store(logp_ptr + o_m, b_tgt - b_lse, mask=m_m)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        m_tile = m_m[:, None] & m_v[None, :]
        b_x = tl.load(logits_ptr + o_row + o_v[None, :], mask=m_tile)
        b_z = _transform(b_x, b_ptr, has_bias, o_v, m_v, multiplier, softcap, HAS_SOFTCAP)
        b_p = tl.exp(b_z - b_lse[:, None])
        if HAS_SOFTCAP:
            b_ratio = tl.where(m_v[None, :], b_z, 0.0) / softcap  # padding columns: z = −inf
            b_p = b_p * (1.0 - b_ratio * b_ratio)
        p_probs = probs_ptr + o_row + o_v[None, :]
        tl.store(p_probs, b_p.to(probs_ptr.dtype.element_ty), mask=m_tile)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _blocks(dtype: torch.dtype) -> dict:
    """Tile sizes and dot precision: tiny tiles under the interpreter (speed), tensor-core
    sized on the GPU. fp32 inputs get IEEE fp32 dots: TF32 would cost ~1e-3 relative error
    in every logit, which the fp32 contract does not allow."""
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16, INPUT_PRECISION=precision, num_warps=1)
    return dict(
        BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, INPUT_PRECISION=precision, num_warps=8, num_stages=3
    )


def _fold_blocks() -> dict:
    """Tiles of the row-wise fold kernel: memory-bound, wide vocab tiles on the GPU."""
    if INTERPRET:
        return dict(BLOCK_M=4, BLOCK_V=64, num_warps=1)
    return dict(BLOCK_M=1, BLOCK_V=2048, num_warps=8)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result (fp32 accumulate on CUDA for half inputs)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _num_splits(num_row_blocks: int, vocab_size: int, device: torch.device) -> int:
    """Vocab splits so that small token counts still fill the machine."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: exercise the split merge without slowing tests
    max_splits = triton.cdiv(vocab_size, SPLIT_ALIGN)
    return max(1, min(max_splits, triton.cdiv(target, max(num_row_blocks, 1))))


def _compatible(batches: list[TokenBatch]) -> bool:
    first = batches[0]
    return all(
        b.hidden.dtype == first.hidden.dtype
        and b.weight.dtype == first.weight.dtype
        and b.weight.shape == first.weight.shape
        and (b.bias is None or b.bias.dtype == b.weight.dtype)
        for b in batches
    )


def _table(batches: list[TokenBatch]) -> torch.Tensor:
    """int64 ``[S, 10]``: the per-stream pointers, strides and row counts the kernel reads."""
    rows = []
    for b in batches:
        rows.append(
            [
                b.hidden.data_ptr(),
                b.hidden.stride(-1),
                b.row_offsets.data_ptr(),
                b.targets.data_ptr(),
                b.weight.data_ptr(),
                b.weight.stride(0),
                b.weight.stride(1),
                0 if b.bias is None else b.bias.data_ptr(),
                0 if b.bias is None else 1,
                b.num_rows,
            ]
        )
    return torch.tensor(rows, dtype=torch.int64, device=batches[0].hidden.device)


def _prepare(tokens: TokenBatch) -> TokenBatch:
    """Make the small per-token index tensors contiguous int64 (never the hidden states)."""
    bias = tokens.bias
    if bias is not None and bias.dtype != tokens.weight.dtype:
        bias = bias.to(tokens.weight.dtype)
    return TokenBatch(
        hidden=tokens.hidden,
        index=tokens.index,
        row_offsets=tokens.row_offsets.long().contiguous(),
        targets=tokens.targets.long().contiguous(),
        weight=tokens.weight,
        bias=bias.contiguous() if bias is not None else None,
    )


def forward(
    batches: list[TokenBatch],
    transform: LogitTransform,
    expectation: list[bool] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per batch, ``(logp [M], lse [M], expected [M, H] or None)``, fp32.

    Batches without ``expectation`` share one fused launch; those with it (a frozen lm_head)
    take the two-GEMM path of ``_forward_expectation``, whose ``E_t`` spares the backward.
    """
    expectation = expectation or [False] * len(batches)
    plain = [i for i, wanted in enumerate(expectation) if not wanted]
    results: list = [None] * len(batches)
    if plain:
        fused = _forward_fused([_prepare(batches[i]) for i in plain], transform)
        for i, (logp, lse) in zip(plain, fused):
            results[i] = (logp, lse, None)
    for i, wanted in enumerate(expectation):
        if wanted:
            results[i] = _forward_expectation(_prepare(batches[i]), transform)
    return results


def _forward_fused(
    batches: list[TokenBatch], transform: LogitTransform
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch, ``(logp [M] fp32, lse [M] fp32)``; compatible batches share one launch."""
    if len(batches) > 1 and not _compatible(batches):
        return [_forward_fused([b], transform)[0] for b in batches]
    device = batches[0].hidden.device
    vocab_size, hidden_size = batches[0].weight.shape
    max_rows = max(b.num_rows for b in batches)
    empty = torch.empty(0, dtype=torch.float32, device=device)
    if max_rows == 0:
        return [(empty, empty) for _ in batches]
    blocks = _blocks(batches[0].hidden.dtype)
    row_blocks = triton.cdiv(max_rows, blocks["BLOCK_M"])
    splits = _num_splits(row_blocks * len(batches), vocab_size, device)
    split_width = triton.cdiv(triton.cdiv(vocab_size, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    splits = triton.cdiv(vocab_size, split_width)
    shape = (len(batches), splits, max_rows)
    part_max = torch.empty(shape, dtype=torch.float32, device=device)
    part_sum = torch.empty(shape, dtype=torch.float32, device=device)
    part_tgt = torch.empty(shape, dtype=torch.float32, device=device)
    table = _table(batches)
    _forward_kernel[(row_blocks, splits, len(batches))](
        table_ptr=table,
        part_max_ptr=part_max,
        part_sum_ptr=part_sum,
        part_tgt_ptr=part_tgt,
        M_max=max_rows,
        V=vocab_size,
        H=hidden_size,
        split_width=split_width,
        multiplier=transform.multiplier,
        softcap=transform.softcap or 1.0,
        H_DTYPE=_TL_DTYPES[batches[0].hidden.dtype],
        W_DTYPE=_TL_DTYPES[batches[0].weight.dtype],
        HAS_SOFTCAP=transform.softcap is not None,
        DOT_FP32=INTERPRET,
        SPLITS=splits,
        **blocks,
    )
    # Merge the vocab splits in a fixed order: lse = m + log Σ_s sum_s·exp(max_s − m).
    merged_max = part_max.amax(dim=1, keepdim=True)  # [S, 1, M]
    lse = merged_max.squeeze(1) + torch.log((part_sum * torch.exp(part_max - merged_max)).sum(1))
    target = part_tgt.sum(dim=1)  # only the split holding the target contributes
    results = []
    for i, b in enumerate(batches):
        row_lse = lse[i, : b.num_rows].contiguous()
        results.append((target[i, : b.num_rows] - row_lse, row_lse))
    return results


def _chunk_rows(vocab_size: int, block_m: int) -> int:
    """Rows per chunk of the two-GEMM passes: a ``[chunk, V]`` buffer of ~``DZ_ELEMENTS``."""
    return max(block_m, DZ_ELEMENTS // vocab_size // block_m * block_m)


def _forward_expectation(
    tokens: TokenBatch, transform: LogitTransform
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen-head forward: ``(logp [M], lse [M], expected [M, H])``, fp32.

    Per chunk of rows: a GEMM for the logits (fp32 out), ``_softmax_fold_kernel`` for the
    transform, logsumexp, target and ``p·s``, then ``E = (p·s)·W``: 4·H·V FLOPs a token, and
    the backward needs only ``W[y_t]`` and ``E_t`` (``torch_backend.backward_from_expectation``).
    ``E_t`` is an ``[H]`` vector per token, too wide to keep in registers beside the online
    logsumexp for real hidden sizes, hence the chunked GEMMs rather than one fused kernel.
    """
    weight = tokens.weight
    vocab_size, hidden_size = weight.shape
    device = tokens.hidden.device
    num_rows = tokens.num_rows
    logp = torch.empty(num_rows, dtype=torch.float32, device=device)
    lse = torch.empty(num_rows, dtype=torch.float32, device=device)
    expected = torch.empty(num_rows, hidden_size, dtype=torch.float32, device=device)
    fold = _fold_blocks()
    step = _chunk_rows(vocab_size, fold["BLOCK_M"])
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        logits = _mm_fp32(tokens.rows(start, stop), weight.T)  # [C, V] fp32
        # fp32 weights: p·s overwrites the logits in place; otherwise a half-size buffer.
        probs = logits
        if weight.dtype != torch.float32:
            probs = torch.empty_like(logits, dtype=weight.dtype)
        _softmax_fold_kernel[(triton.cdiv(stop - start, fold["BLOCK_M"]),)](
            logits_ptr=logits,
            targets_ptr=tokens.targets[start:stop],
            b_ptr=tokens.bias if tokens.bias is not None else weight,
            has_bias=0 if tokens.bias is None else 1,
            probs_ptr=probs,
            logp_ptr=logp[start:stop],
            lse_ptr=lse[start:stop],
            num_rows=stop - start,
            V=vocab_size,
            multiplier=transform.multiplier,
            softcap=transform.softcap or 1.0,
            HAS_SOFTCAP=transform.softcap is not None,
            **fold,
        )
        expected[start:stop] = _mm_fp32(probs, weight)
        del logits, probs
    return logp, lse, expected


def backward(
    tokens: TokenBatch,
    transform: LogitTransform,
    lse: torch.Tensor,  # [M] fp32
    grad_logp: torch.Tensor,  # [M] fp32
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_rows [M, H], grad_weight [V, H], grad_bias [V])`` in fp32, deterministic."""
    tokens = _prepare(tokens)
    weight = tokens.weight
    vocab_size, hidden_size = weight.shape
    device = tokens.hidden.device
    num_rows = tokens.num_rows
    lse = lse.float().contiguous()
    grad_logp = grad_logp.float().contiguous()
    grad_rows = (
        torch.empty(num_rows, hidden_size, dtype=torch.float32, device=device)
        if need_hidden
        else None
    )
    grad_weight = None  # the first chunk's product becomes the fp32 accumulator
    grad_bias = torch.zeros(vocab_size, dtype=torch.float32, device=device) if need_bias else None
    blocks = _blocks(tokens.hidden.dtype)
    block_m = blocks["BLOCK_M"]
    step = _chunk_rows(vocab_size, block_m)
    # dz feeds the GEMMs in the weight's dtype (tensor cores on GPU), fp32 for fp32 weights.
    dz_buffer = torch.empty(min(step, num_rows), vocab_size, dtype=weight.dtype, device=device)
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        dz = dz_buffer[: stop - start]
        grid = (triton.cdiv(stop - start, block_m), triton.cdiv(vocab_size, blocks["BLOCK_V"]))
        _grad_logits_kernel[grid](
            h_ptr=tokens.hidden,
            stride_hk=tokens.hidden.stride(-1),
            offsets_ptr=tokens.row_offsets[start:stop],
            targets_ptr=tokens.targets[start:stop],
            lse_ptr=lse[start:stop],
            grad_ptr=grad_logp[start:stop],
            w_ptr=weight,
            stride_wv=weight.stride(0),
            stride_wk=weight.stride(1),
            b_ptr=tokens.bias if tokens.bias is not None else weight,
            has_bias=0 if tokens.bias is None else 1,
            dz_ptr=dz,
            num_rows=stop - start,
            V=vocab_size,
            H=hidden_size,
            multiplier=transform.multiplier,
            softcap=transform.softcap or 1.0,
            HAS_SOFTCAP=transform.softcap is not None,
            DOT_FP32=INTERPRET,
            **blocks,
        )
        if grad_rows is not None:
            grad_rows[start:stop] = _mm_fp32(dz, weight)
        if need_weight:
            product = _mm_fp32(dz.T, tokens.rows(start, stop).to(dz.dtype))
            grad_weight = product if grad_weight is None else grad_weight.add_(product)
        if grad_bias is not None:
            grad_bias += dz.float().sum(0)
    return grad_rows, grad_weight, grad_bias
