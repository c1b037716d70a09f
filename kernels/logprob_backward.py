"""Recompute-path backward of the Triton backend: per vocab chunk ``dz`` in the weight's
dtype (the fused dz GEMM where it applies, else a cuBLAS GEMM and ``_grad_logits_kernel``),
then ``grad_rows += dz·W_c`` and ``grad_W[c] = dzᵀ·h``: no ``[V, H]`` fp32 accumulator.

Re-exported by ``kernels.logprob``, the backend module the host code sees.
"""

from __future__ import annotations

import torch
import triton

from .._types import BackendGrads, LogitTransform, TokenBatch
from .logprob import (
    _fold_blocks,
    _fused,
    _grad_logits_kernel,
    _mm_fp32,
    _transform_args,
    _vocab_chunks,
)


def backward(
    tokens: TokenBatch,
    transform: LogitTransform,
    lse: torch.Tensor,  # [M] fp32
    grad_logp: torch.Tensor,  # [M] fp32
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> BackendGrads:
    """``(grad_rows [M, H] fp32, grad_weight [V, H] weight's dtype, grad_bias [V] fp32)``.

    Vocab chunk by chunk: ``dz`` in the weight's dtype (``_dz_chunks``; tensor cores for the
    two GEMMs), accumulate ``grad_rows`` in fp32 and write each chunk's rows of
    ``grad_weight`` once (cuBLAS sums over the tokens in fp32). Deterministic.
    """
    weight = tokens.weight
    vocab_size, hidden_size = weight.shape
    device = weight.device
    num_rows = tokens.num_rows
    rows = tokens.rows(0, num_rows)  # [M, H], gathered: contiguous
    grad_rows = None
    if need_hidden:
        grad_rows = torch.zeros(num_rows, hidden_size, dtype=torch.float32, device=device)
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty(vocab_size, dtype=torch.float32, device=device) if need_bias else None
    inputs = (rows, tokens, transform, lse.float().contiguous(), grad_logp.float().contiguous())
    for start, stop, dz in _dz_chunks(*inputs):  # dz [M, C], the weight's dtype
        if grad_rows is not None:
            grad_rows.add_(_mm_fp32(dz, weight[start:stop]))
        if grad_weight is not None:
            torch.mm(dz.T, rows.to(dz.dtype), out=grad_weight[start:stop])
        if grad_bias is not None:
            grad_bias[start:stop] = dz.float().sum(0)
        del dz
    return BackendGrads(grad_rows, grad_weight, grad_bias)


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
