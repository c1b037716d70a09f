"""Host code of the fused-epilogue kernels (``kernels/fused_gemm.py``) behind the Triton backend.

Selected with ``FASTALIGN_CUDA_KERNEL=fused`` (or ``kernels.logprob.CUDA_KERNEL = "fused"``);
the default stays ``"gemm_fold"`` until a GPU measurement shows the fused kernels faster.

Story in order:
1. ``applies``: which stream groups the fused kernels take: 16-bit weights (the GEMMs run on
   tensor cores) whose lm_head is trainable. A frozen lm_head keeps the GEMM+fold path: its
   forward must materialise ``softmax·s`` per chunk for the ``E_t`` GEMM anyway.
2. ``forward_group``: the stacked rows of every stream sharing the lm_head, in vocab chunks
   whose logsumexp partials fit ``PARTIAL_ELEMENTS``: one persistent GEMM launch writes a
   chunk's per-part partials and target logits, one small launch merges them in order.
3. ``dz_chunk`` / ``dz_chunks``: one vocab chunk's ``dz`` in the weight's dtype from the
   saved logsumexp; ``logprob.backward`` takes them per chunk in place of its GEMM + dz
   kernel and runs the same cuBLAS ``grad_rows += dz·W_c`` (fp32) and ``grad_W[c] = dzᵀ·h``.
   Deterministic: no atomics.
4. ``group_logits`` / ``group_dz`` (the store path, ``fastalign.store``, through
   ``logprob_store``): per group ONE launch over the whole vocabulary writes the partials,
   the target logits and ``exp2(z₂ − part max)·s`` in the weight's dtype (no fp32 logits:
   half the GEMM+fold store path's buffer, and no fold pass); once the loss gives ``g``,
   ``_store_dz_kernel`` turns that into ``dz`` in place. Not ``dz`` straight from the forward
   epilogue: ``g`` of a row depends on the logsumexp of every token of its gradient unit,
   which no tile knows before the whole group's GEMM is done. Exactness: ``p·s`` off the
   target goes through the weight's dtype once before ``dz`` is rounded to it (two roundings,
   ≤ 2 units of roundoff, vs one on the recompute path); the target column is formed from
   the fp32 log-prob, so ``1 − p_y`` cancels nothing rounded.

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

from .. import tiles
from .._types import GroupLogits, LogitTransform, TokenBatch
from . import fused_gemm as K
from .logprob import _NEG_BIG, INTERPRET, _chunk_width, _fold_blocks

KERNELS = tiles.CUDA_KERNELS
# How the mainloop loads tiles: "auto" (TMA descriptors where the hardware and the
# alignment allow, else pointer loads), "tma" or "pointer" (tests and benchmarks force one).
LOADS = os.environ.get("FASTALIGN_FUSED_LOADS", "auto")
# fp32 logsumexp partials per forward launch ([tiles, rows], two of them): 16 MiB each on the
# GPU; interpreted, small, so that the tests' vocabularies span several chunks.
PARTIAL_ELEMENTS = 1 << 8 if INTERPRET else tiles.FUSED_PARTIAL_ELEMENTS
LOG2E = 1.4426950408889634


class FusedForward(NamedTuple):
    """Forward over stacked rows; fp32. (Field names as the backend contract's result.)"""

    logp: torch.Tensor  # [R] log-prob of each scored token
    lse: torch.Tensor  # [R] logsumexp of each token's transformed logits
    expected: None  # the fused kernels never take a frozen lm_head


class TileConfig(NamedTuple):
    """Tile shape and launch options of both fused kernels."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    epilogue_split: bool = False  # the epilogue in two column halves (fewer live registers)

    @property
    def parts(self) -> int:
        """Column parts of a tile the epilogue handles one at a time."""
        return 2 if self.epilogue_split else 1

    @property
    def part_n(self) -> int:
        """Columns of one epilogue part: the unit of the forward's logsumexp partials."""
        return self.block_n // self.parts


# 128×256×64 tiles, GROUP_M 8, 8 warps, 3 stages (the persistent-matmul tutorial's Hopper
# choice) with the epilogue in two column halves: no register spills in either kernel (ptxas
# for sm_90a, checked by tests/test_triton_compile.py with triton 3.9 and with the GPU image's
# 3.6); without the split the dz epilogue spills ~700 B at these tiles, and with the softcap's
# dz written as (onehot − p)·s·mult in separate steps triton 3.6 spilled 184 B.
# benchmarks/fused_bench.py sweeps others; unmeasured so far.
GPU_CONFIG = TileConfig(128, 256, 64, 8, 8, 3, True)
# The pointer-load fall-back (unaligned rows, no TMA): 128×64×32, 2 stages, no spills in any
# epilogue (at 128×128 the store path's forward epilogue spills 144 B).
POINTER_CONFIG = TileConfig(128, 64, 32, 8, 8, 2, True)
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


def _launch(
    rows: torch.Tensor,  # [R, H]
    weight_chunk: torch.Tensor,  # [C, H] lm_head rows [chunk_start, chunk_start + C)
    bias_chunk: torch.Tensor | None,  # [C]
    targets: torch.Tensor,  # int64 [R]
    chunk_start: int,
    transform: LogitTransform,
    tma: bool,
    forward: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    backward: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    probs: torch.Tensor | None = None,
) -> None:
    """One persistent ``_fused_gemm_kernel`` launch over a vocab chunk, with the forward
    epilogue (``forward``: part maxima [P, R], part sums [P, R], target z₂ [R], written; with
    ``probs`` [R, C] the store path's ``exp2(z₂ − part max)·s`` too) or the dz one
    (``backward``: lse [R], g [R], dz [R, C] written). ``targets`` stands in for the
    buffers the chosen epilogue does not touch."""
    cfg, t2 = tile_config(tma), _transform2(transform)
    num_rows, width = rows.shape[0], weight_chunk.shape[0]
    part_max, part_sum, target2 = forward if forward is not None else (targets,) * 3
    lse, grad_logp, dz = backward if backward is not None else (targets, targets, None)
    written = dz if backward is not None else probs  # [R, C] in the weight's dtype, or None
    out = targets if written is None else _operand(written, tma, [cfg.block_m, cfg.part_n])
    K._fused_gemm_kernel[(_grid(num_rows, width, cfg, rows.device),)](
        rows=_operand(rows, tma, [cfg.block_m, cfg.block_k]),
        weight=_operand(weight_chunk, tma, [cfg.block_n, cfg.block_k]),
        stride_rows=rows.stride(0),
        stride_weight=weight_chunk.stride(0),
        b_ptr=weight_chunk if bias_chunk is None else bias_chunk,
        has_bias=int(bias_chunk is not None),
        targets_ptr=targets,
        part_max_ptr=part_max,
        part_sum_ptr=part_sum,
        tgt_ptr=target2,
        lse_ptr=lse,
        grad_ptr=grad_logp,
        out=out,
        stride_out=0 if written is None else written.stride(0),
        num_rows=num_rows,
        chunk_start=chunk_start,
        chunk_width=width,
        hidden_size=rows.shape[1],
        scale2=t2.scale2,
        cap2=t2.cap2,
        cap_k=t2.cap_k,
        multiplier=transform.multiplier,
        DZ=backward is not None,
        STORE=probs is not None,
        HAS_SOFTCAP=t2.has_softcap,
        TMA=tma,
        DOT_FP32=INTERPRET,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        EPILOGUE_PARTS=cfg.parts,
        NUM_PROGRAMS=_num_programs(rows.device),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _grid(num_rows: int, width: int, cfg: TileConfig, device: torch.device) -> int:
    tiles = triton.cdiv(num_rows, cfg.block_m) * triton.cdiv(width, cfg.block_n)
    return min(_num_programs(device), tiles)


def forward_chunk_width(num_rows: int, vocab_size: int, cfg: TileConfig) -> int:
    """Vocab columns per forward launch: whole tiles whose partials, ``[parts, R]`` fp32
    twice, hold about ``PARTIAL_ELEMENTS`` each."""
    tiles = max(1, PARTIAL_ELEMENTS // (num_rows * cfg.parts))
    return min(tiles, triton.cdiv(vocab_size, cfg.block_n)) * cfg.block_n


def forward_group(parts: list[TokenBatch], transform: LogitTransform) -> FusedForward:
    """``(logp [R], lse [R], None)`` fp32 over the stacked rows of streams sharing an lm_head."""
    weight = parts[0].weight
    gathered = [p.rows(0, p.num_rows) for p in parts]
    rows = (gathered[0] if len(gathered) == 1 else torch.cat(gathered)).contiguous()  # [R, H]
    del gathered
    targets = torch.cat([p.targets for p in parts]).long().contiguous()  # [R]
    tma = _use_tma(rows, weight)  # chunks start on whole tiles: each as aligned as the head
    width = forward_chunk_width(rows.shape[0], weight.shape[0], tile_config(tma))
    stats = _forward(rows, weight, parts[0].bias, targets, transform, tma, width)
    return FusedForward(stats.logp, stats.lse, None)


class _ForwardStats(NamedTuple):
    logp: torch.Tensor  # [R] fp32
    lse: torch.Tensor  # [R] fp32
    part_max: torch.Tensor  # [P, R] fp32 base-2 max of each epilogue part of the last chunk


def _forward(
    rows: torch.Tensor,  # [R, H] contiguous
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # int64 [R]
    transform: LogitTransform,
    tma: bool,
    width: int,  # vocab columns per launch, whole tiles
    probs: torch.Tensor | None = None,  # [R, V] out (store path): exp2(z₂ − part max)·s
) -> _ForwardStats:
    """Per vocab chunk one GEMM launch writes the partials, one small launch merges them."""
    num_rows, device = rows.shape[0], weight.device
    cfg = tile_config(tma)
    running_max = torch.full((num_rows,), _NEG_BIG, dtype=torch.float32, device=device)
    running_sum = torch.zeros(num_rows, dtype=torch.float32, device=device)
    target2 = torch.empty(num_rows, dtype=torch.float32, device=device)
    part_max = torch.empty(width // cfg.part_n, num_rows, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    block_r = 16 if INTERPRET else 256
    for start in range(0, weight.shape[0] if num_rows else 0, width):
        stop = min(start + width, weight.shape[0])
        chunk_bias = None if bias is None else bias[start:stop]
        chunk_probs = None if probs is None else probs[:, start:stop]
        _launch(
            rows, weight[start:stop], chunk_bias, targets, start, transform, tma,
            (part_max, part_sum, target2), probs=chunk_probs,
        )  # fmt: skip
        K._merge_partials_kernel[(triton.cdiv(num_rows, block_r),)](
            part_max_ptr=part_max,
            part_sum_ptr=part_sum,
            max_ptr=running_max,
            sum_ptr=running_sum,
            num_rows=num_rows,
            num_parts=triton.cdiv(stop - start, cfg.part_n),
            BLOCK_R=block_r,
        )
    lse2 = running_max + torch.log2(running_sum)
    return _ForwardStats((target2 - lse2) * math.log(2.0), lse2 * math.log(2.0), part_max)


def group_logits(rows: torch.Tensor, tokens: TokenBatch, transform: LogitTransform) -> GroupLogits:
    """Store path, fused: ONE persistent GEMM launch over the whole vocabulary writes the
    group's logsumexp partials, its target logits and ``exp2(z₂ − part max)·s`` (in ``[0, 1]``:
    the weight's dtype keeps its full relative precision) into an ``[R, V]`` buffer in the
    weight's dtype, which ``group_dz`` turns into ``dz`` in place once ``g`` is known. No fp32
    logits: half the memory of the GEMM+fold store path's buffer, and no fold pass."""
    weight = tokens.weight
    rows = rows.contiguous()  # [R, H]
    num_rows, vocab_size = rows.shape[0], weight.shape[0]
    probs = dz_buffer(num_rows, vocab_size, weight)[:, :vocab_size]  # [R, V]
    tma = _use_tma(rows, weight, probs)
    cfg = tile_config(tma)
    width = triton.cdiv(vocab_size, cfg.block_n) * cfg.block_n  # the whole vocabulary
    targets = tokens.targets.long().contiguous()
    stats = _forward(rows, weight, tokens.bias, targets, transform, tma, width, probs)
    return GroupLogits(probs, stats.logp, stats.lse, stats.part_max, cfg.part_n)


def group_dz(
    group: GroupLogits,  # from group_logits
    tokens: TokenBatch,
    transform: LogitTransform,
    grad_logp: torch.Tensor,  # [R] fp32
) -> torch.Tensor:
    """``dz [R, V]`` in the weight's dtype, in place of ``group.logits`` (one row-wise launch
    of ``_store_dz_kernel``)."""
    probs = group.logits
    num_rows, vocab_size = probs.shape
    if num_rows:
        blocks = _fold_blocks()
        K._store_dz_kernel[(triton.cdiv(num_rows, blocks["BLOCK_M"]),)](
            probs_ptr=probs,
            stride_probs=probs.stride(0),
            part_max_ptr=group.part_max,
            targets_ptr=tokens.targets.long().contiguous(),
            lse_ptr=group.lse.float().contiguous(),
            logp_ptr=group.logp.float().contiguous(),
            grad_ptr=grad_logp.float().contiguous(),
            num_rows=num_rows,
            vocab_size=vocab_size,
            softcap=transform.softcap or 1.0,
            multiplier=transform.multiplier,
            HAS_SOFTCAP=transform.softcap is not None,
            PART_N=group.part_width,
            **blocks,
        )
    return probs


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
    dz = buffer[:, : weight_chunk.shape[0]]
    tma = _use_tma(rows, weight_chunk, dz)
    grads = (lse, grad_logp, dz)
    _launch(rows, weight_chunk, bias_chunk, targets, chunk_start, transform, tma, backward=grads)
    return dz


def dz_chunks(
    rows: torch.Tensor,  # [M, H] the weight's dtype
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # int64 [M]
    lse: torch.Tensor,  # fp32 [M]
    grad_logp: torch.Tensor,  # fp32 [M]
    transform: LogitTransform,
):
    """Per vocab chunk of ``logprob``'s width, ``(start, stop, dz [M, C])`` from ``dz_chunk``
    (one scratch buffer, overwritten chunk after chunk)."""
    vocab_size = weight.shape[0]
    width = _chunk_width(rows.shape[0], vocab_size)
    buffer = dz_buffer(rows.shape[0], width, weight)
    for start in range(0, vocab_size, width):
        stop = min(start + width, vocab_size)
        chunk_bias = None if bias is None else bias[start:stop]
        dz = dz_chunk(
            rows, weight[start:stop], chunk_bias, targets, start, lse, grad_logp, transform, buffer
        )  # [M, C]
        yield start, stop, dz
