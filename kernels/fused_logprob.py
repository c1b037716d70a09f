"""Host code of the fused-epilogue kernels (``kernels/fused_gemm.py``) behind the Triton backend.

Selected with ``FASTALIGN_CUDA_KERNEL=fused`` (or ``kernels.logprob.CUDA_KERNEL = "fused"``);
the default stays ``"gemm_fold"`` until a GPU measurement shows the fused kernels faster.

Story in order:
1. ``applies``: which stream groups the fused kernels take: 16-bit weights (the GEMMs run on
   tensor cores) whose lm_head is trainable. A frozen lm_head keeps the GEMM+fold path: its
   forward must materialise ``softmax·s`` per chunk for the ``E_t`` GEMM anyway.
2. ``forward_group``: the stacked rows of every stream sharing the lm_head, in vocab chunks
   whose logsumexp partials fit ``PARTIAL_ELEMENTS``: one persistent GEMM launch writes a
   chunk's per-tile partials and target logits, one small launch merges them in order.
3. ``dz_chunk``: one vocab chunk's ``dz`` in the weight's dtype from the saved logsumexp —
   also the entry point for a loss-level path that knows ``g`` after its forward (the store
   path, fastalign.store, can call it per group instead of the GEMM + in-place dz kernel).
4. ``backward``: per vocab chunk, ``dz_chunk`` then cuBLAS ``grad_rows += dz·W_c`` (fp32) and
   ``grad_W[c] = dzᵀ·h``, as the GEMM+fold backend does. Deterministic: no atomics.

FLOPs as the GEMM+fold backend (2HV forward, 6HV backward per scored token); HBM traffic
per token drops by ``8·V`` bytes forward (no fp32 logits written and read back) and by
``8·V`` backward (the recompute's logits), leaving ``2·V`` bytes of ``dz`` written once.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton

from .._types import LogitTransform, TokenBatch
from . import fused_gemm as K
from .logprob import _NEG_BIG, INTERPRET, _chunk_width, _mm_fp32

KERNELS = ("gemm_fold", "fused")
# How the mainloop loads tiles: "auto" (TMA descriptors where the hardware and the
# alignment allow, else pointer loads), "tma" or "pointer" (tests and benchmarks force one).
LOADS = os.environ.get("FASTALIGN_FUSED_LOADS", "auto")
# fp32 logsumexp partials per forward launch ([tiles, rows], two of them): 16 MiB each on the
# GPU; interpreted, small, so that the tests' vocabularies span several chunks.
PARTIAL_ELEMENTS = 1 << 8 if INTERPRET else 1 << 22
LOG2E = 1.4426950408889634


class FusedForward(NamedTuple):
    """Forward over stacked rows; fp32. (Field names as the backend contract's result.)"""

    logp: torch.Tensor  # [R] log-prob of each scored token
    lse: torch.Tensor  # [R] logsumexp of each token's transformed logits
    expected: None  # the fused kernels never take a frozen lm_head


class FusedGrads(NamedTuple):
    """Gradients of ``Σ_t g_t · logp_t``; ``None`` where not asked for."""

    rows: torch.Tensor | None  # [M, H] fp32
    weight: torch.Tensor | None  # [V, H] the weight's dtype
    bias: torch.Tensor | None  # [V] fp32


class TileConfig(NamedTuple):
    """Tile shape and launch options of both fused kernels."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    epilogue_split: bool = False  # the epilogue in two column halves (fewer live registers)


# 128×256×64 tiles, GROUP_M 8, 8 warps, 3 stages (the persistent-matmul tutorial's Hopper
# choice) with the epilogue in two column halves: no register spills in either kernel (ptxas
# for sm_90a, checked by tests/test_triton_compile.py); without the split the dz epilogue
# spills ~700 B at these tiles. benchmarks/fused_bench.py sweeps others; unmeasured so far.
GPU_CONFIG = TileConfig(128, 256, 64, 8, 8, 3, True)
# The pointer-load fall-back (unaligned rows, no TMA): 128×128×32, 2 stages, no spills.
POINTER_CONFIG = TileConfig(128, 128, 32, 8, 8, 2, True)
INTERPRET_CONFIG = TileConfig(16, 32, 16, 2, 1, 1)


def tile_config(tma: bool = True) -> TileConfig:
    """The tiles the kernels launch with (interpreted: small, to exercise several tiles)."""
    if INTERPRET:
        return INTERPRET_CONFIG
    return GPU_CONFIG if tma else POINTER_CONFIG


def applies(kernel: str, tokens: TokenBatch, with_expectation: bool) -> bool:
    """Whether the fused kernels take this stream group under the ``kernel`` setting."""
    if kernel not in KERNELS:
        raise ValueError(
            f"FASTALIGN_CUDA_KERNEL / logprob.CUDA_KERNEL must be one of {KERNELS}, got {kernel!r}"
        )
    if LOADS not in ("auto", "tma", "pointer"):
        raise ValueError(f"FASTALIGN_FUSED_LOADS must be auto, tma or pointer, got {LOADS!r}")
    weight = tokens.weight
    half = weight.dtype in (torch.bfloat16, torch.float16)
    return (
        kernel == "fused" and not with_expectation and half and tokens.hidden.dtype == weight.dtype
    )


def _num_programs(device: torch.device) -> int:
    """Persistent grid: one program per SM (3 interpreted, to exercise the tile stride)."""
    if INTERPRET or device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def _use_tma(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need 16-byte aligned bases and row strides (and sm_90 on the GPU)."""
    if LOADS != "auto":
        return LOADS == "tma"
    first = tensors[0]
    if first.is_cuda and torch.cuda.get_device_capability(first.device)[0] < 9:
        return False
    return all(
        t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
        for t in tensors
    )


def _operand(t: torch.Tensor, tma: bool, block: list[int]):
    """A kernel operand: a host TMA descriptor over ``t`` or ``t`` itself (pointer loads)."""
    if not tma:
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


class _Transform2(NamedTuple):
    """The logit transform's constants in base-2 units (see ``fused_gemm._logits2``)."""

    scale2: float
    cap2: float
    cap_k: float
    has_softcap: bool


def _transform2(transform: LogitTransform) -> _Transform2:
    cap = transform.softcap
    return _Transform2(
        scale2=transform.multiplier * LOG2E,
        cap2=(cap or 1.0) * LOG2E,
        cap_k=2.0 / (cap or 1.0),
        has_softcap=cap is not None,
    )


def _launch_args(
    rows: torch.Tensor,  # [R, H]
    weight: torch.Tensor,  # [C, H]
    tma: bool,
    transform: LogitTransform,
) -> dict:
    """Keyword arguments shared by both kernels: GEMM operands, transform, tiles, grid size."""
    cfg, t2 = tile_config(tma), _transform2(transform)
    return dict(
        scale2=t2.scale2,
        cap2=t2.cap2,
        cap_k=t2.cap_k,
        HAS_SOFTCAP=t2.has_softcap,
        NUM_PROGRAMS=_num_programs(rows.device),
        rows=_operand(rows, tma, [cfg.block_m, cfg.block_k]),
        weight=_operand(weight, tma, [cfg.block_n, cfg.block_k]),
        stride_rows=rows.stride(0),
        stride_weight=weight.stride(0),
        num_rows=rows.shape[0],
        chunk_width=weight.shape[0],
        hidden_size=rows.shape[1],
        TMA=tma,
        DOT_FP32=INTERPRET,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        EPILOGUE_SPLIT=cfg.epilogue_split,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _grid(num_rows: int, width: int, cfg: TileConfig, device: torch.device) -> int:
    tiles = triton.cdiv(num_rows, cfg.block_m) * triton.cdiv(width, cfg.block_n)
    return min(_num_programs(device), tiles)


def forward_group(parts: list[TokenBatch], transform: LogitTransform) -> FusedForward:
    """``(logp [R], lse [R], None)`` fp32 over the stacked rows of streams sharing an lm_head."""
    weight, bias = parts[0].weight, parts[0].bias
    gathered = [p.rows(0, p.num_rows) for p in parts]
    rows = (gathered[0] if len(gathered) == 1 else torch.cat(gathered)).contiguous()  # [R, H]
    del gathered
    targets = torch.cat([p.targets for p in parts]).long().contiguous()  # [R]
    num_rows, device = rows.shape[0], weight.device
    running_max = torch.full((num_rows,), _NEG_BIG, dtype=torch.float32, device=device)
    running_sum = torch.zeros(num_rows, dtype=torch.float32, device=device)
    target2 = torch.empty(num_rows, dtype=torch.float32, device=device)
    if num_rows == 0:
        return FusedForward(running_sum, running_sum, None)
    tma = _use_tma(rows, weight)  # chunks start on whole tiles: each as aligned as the head
    cfg = tile_config(tma)
    tiles_per_chunk = min(
        max(1, PARTIAL_ELEMENTS // num_rows), triton.cdiv(weight.shape[0], cfg.block_n)
    )
    width = tiles_per_chunk * cfg.block_n
    part_max = torch.empty(tiles_per_chunk, num_rows, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    block_r = 16 if INTERPRET else 256
    for start in range(0, weight.shape[0], width):
        stop = min(start + width, weight.shape[0])
        chunk = weight[start:stop]  # [C, H]
        K._lse_partials_kernel[(_grid(num_rows, stop - start, cfg, device),)](
            **_launch_args(rows, chunk, tma, transform),
            b_ptr=weight if bias is None else bias[start:stop],
            has_bias=int(bias is not None),
            targets_ptr=targets,
            part_max_ptr=part_max,
            part_sum_ptr=part_sum,
            tgt_ptr=target2,
            chunk_start=start,
        )
        K._merge_partials_kernel[(triton.cdiv(num_rows, block_r),)](
            part_max_ptr=part_max,
            part_sum_ptr=part_sum,
            max_ptr=running_max,
            sum_ptr=running_sum,
            num_rows=num_rows,
            num_tiles=triton.cdiv(stop - start, cfg.block_n),
            BLOCK_R=block_r,
        )
    lse2 = running_max + torch.log2(running_sum)
    return FusedForward((target2 - lse2) * math.log(2.0), lse2 * math.log(2.0), None)


def dz_buffer(num_rows: int, width: int, weight: torch.Tensor) -> torch.Tensor:
    """``[R, width]`` scratch for ``dz`` in the weight's dtype, rows padded to 16 bytes so
    that a TMA descriptor can cover any chunk width."""
    align = 16 // weight.element_size()
    padded = triton.cdiv(width, align) * align
    return torch.empty(num_rows, padded, dtype=weight.dtype, device=weight.device)


def dz_chunk(
    rows: torch.Tensor,  # [R, H] the weight's dtype
    weight_chunk: torch.Tensor,  # [C, H] lm_head rows [start, start + C)
    bias_chunk: torch.Tensor | None,  # [C]
    targets: torch.Tensor,  # int64 [R] vocab ids
    chunk_start: int,
    lse: torch.Tensor,  # fp32 [R]
    grad_logp: torch.Tensor,  # fp32 [R]
    transform: LogitTransform,
    buffer: torch.Tensor,  # [R, ≥C] from dz_buffer
) -> torch.Tensor:
    """``dz [R, C]`` (a view of ``buffer``): ``g·(onehot − softmax(z))·s·mult`` for one vocab
    chunk, in the weight's dtype, logits recomputed in registers (one GEMM-shaped launch).

    Example::

        buf = dz_buffer(rows.shape[0], 4096, weight)
        dz = dz_chunk(rows, weight[:4096], None, targets, 0, lse, g, LogitTransform(), buf)
    """
    num_rows, width = rows.shape[0], weight_chunk.shape[0]
    dz = buffer[:, :width]
    tma = _use_tma(rows, weight_chunk, dz)
    cfg = tile_config(tma)
    K._dz_kernel[(_grid(num_rows, width, cfg, rows.device),)](
        **_launch_args(rows, weight_chunk, tma, transform),
        b_ptr=weight_chunk if bias_chunk is None else bias_chunk,
        has_bias=int(bias_chunk is not None),
        targets_ptr=targets,
        lse_ptr=lse,
        grad_ptr=grad_logp,
        dz=_operand(dz, tma, [cfg.block_m, cfg.block_n // (2 if cfg.epilogue_split else 1)]),
        stride_dz=dz.stride(0),
        chunk_start=chunk_start,
        multiplier=transform.multiplier,
    )
    return dz


def backward(
    tokens: TokenBatch,
    transform: LogitTransform,
    lse: torch.Tensor,  # [M] fp32
    grad_logp: torch.Tensor,  # [M] fp32
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> FusedGrads:
    """``(grad_rows [M, H] fp32, grad_weight [V, H], grad_bias [V] fp32)``, as
    ``logprob.backward`` but with each chunk's ``dz`` from ``dz_chunk`` (no logits in HBM)."""
    weight, bias = tokens.weight, tokens.bias
    vocab_size, hidden_size = weight.shape
    num_rows, device = tokens.num_rows, weight.device
    rows = tokens.rows(0, num_rows).contiguous()  # [M, H]
    targets = tokens.targets.long().contiguous()
    lse, grad_logp = lse.float().contiguous(), grad_logp.float().contiguous()
    grad_rows = None
    if need_hidden:
        grad_rows = torch.zeros(num_rows, hidden_size, dtype=torch.float32, device=device)
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty(vocab_size, dtype=torch.float32, device=device) if need_bias else None
    width = _chunk_width(num_rows, vocab_size)
    buffer = dz_buffer(num_rows, width, weight)
    for start in range(0, vocab_size, width):
        stop = min(start + width, vocab_size)
        chunk_bias = None if bias is None else bias[start:stop]
        dz = dz_chunk(
            rows, weight[start:stop], chunk_bias, targets, start, lse, grad_logp, transform, buffer
        )  # [M, C]
        if grad_rows is not None:
            grad_rows.add_(_mm_fp32(dz, weight[start:stop]))
        if grad_weight is not None:
            torch.mm(dz.T, rows, out=grad_weight[start:stop])
        if grad_bias is not None:
            grad_bias[start:stop] = dz.float().sum(0)
    return FusedGrads(grad_rows, grad_weight, grad_bias)
