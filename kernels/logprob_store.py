"""Store path of the Triton backend (``fastalign.store``): a group's full-vocabulary logits
from one cuBLAS GEMM and the fold, kept; then ``dz`` in place and the two gradient GEMMs.
With the fused-GEMM kernels selected (``FASTALIGN_CUDA_KERNEL=fused``), their store variant
(``fused_logprob.group_logits`` / ``group_dz``) forms what is kept and ``dz``.

Re-exported by ``kernels.logprob``, the backend module the host code sees.
"""

from __future__ import annotations

import torch
import triton

from .._types import BackendGrads, GroupLogits, LogitTransform, TokenBatch
from .logprob import (
    _bias_args,
    _chunk_width,
    _fold,
    _fold_blocks,
    _fused,
    _grad_logits_kernel,
    _mm_fp32,
    _running_stats,
    _transform_args,
)


def group_logits(
    rows: torch.Tensor, tokens: TokenBatch, transform: LogitTransform, log_sum_sq: bool = False
) -> GroupLogits:
    """Store path: one cuBLAS GEMM gives the group's raw fp32 logits ``[R, V]`` (kept, raw:
    the kernels apply bias and transform on the fly), the fold their logp and logsumexp (and
    ``log Σ_v p_v²`` when ``log_sum_sq``: WPO). Where the fused-GEMM kernels are selected and
    apply (no ``log Σ p²`` asked), ``fused_logprob.group_logits``."""
    fused = None if log_sum_sq else _fused(tokens, False)
    if fused is not None:
        return fused.group_logits(rows, tokens, transform)
    weight, bias = tokens.weight, tokens.bias
    logits = _mm_fp32(rows, weight.T)  # [R, V] fp32
    running_max, running_sum, target_logit = _running_stats(rows.shape[0], weight.device)
    sq = torch.zeros_like(running_sum) if log_sum_sq else None
    if rows.shape[0]:
        _fold(logits, tokens.targets.long().contiguous(), _bias_args(weight, bias), 0, transform,
              (running_max, running_sum, target_logit), sq=sq)  # fmt: skip
    lse = running_max + torch.log(running_sum)
    if sq is not None:  # log Σ p² = log Σ e^{2(z−m)} − 2·log Σ e^{z−m}
        sq = torch.log(sq) - 2 * torch.log(running_sum)
    return GroupLogits(logits, target_logit - lse, lse, log_sum_sq=sq)


def group_grads(
    group: GroupLogits,
    rows: torch.Tensor,  # [R, H] the group's hidden rows
    tokens: TokenBatch,  # the group's tokens (targets [R]) and lm_head
    transform: LogitTransform,
    grad_logp: torch.Tensor,  # [R] fp32
    grads: BackendGrads,
) -> torch.Tensor | None:
    """Store path: ``dz`` in place of what the group's forward kept (in the weight's dtype),
    then the rows' gradient ``[R, H]`` fp32 (one GEMM) and the lm_head's fp32 accumulator
    (vocab chunks, fixed order: deterministic)."""
    weight = tokens.weight
    if group.part_max is not None:
        from . import fused_logprob

        dz = fused_logprob.group_dz(group, tokens, transform, grad_logp)
    else:
        dz = _dz_in_place(group, tokens, transform, grad_logp)
    vocab_size = dz.shape[1]
    if grads.bias is not None:
        grads.bias.add_(dz.float().sum(0))
    if grads.weight is not None:
        if dz.dtype != torch.float32:
            width = _chunk_width(weight.shape[1], vocab_size)
            for start in range(0, vocab_size, width):
                part = _mm_fp32(dz[:, start : start + width].T, rows.to(dz.dtype))
                grads.weight[start : start + width].add_(part)
        else:
            grads.weight.addmm_(dz.T, rows.float())
    return None if grads.rows is None else _mm_fp32(dz, weight)


def _dz_in_place(
    group: GroupLogits, tokens: TokenBatch, transform: LogitTransform, grad_logp: torch.Tensor
) -> torch.Tensor:
    """``dz [R, V]`` in the weight's dtype in place of the group's raw fp32 logits: a half
    ``dz`` lives in the first half of each fp32 row (row stride 2V)."""
    logits = group.logits  # [R, V] fp32, raw
    weight = tokens.weight
    num_rows, vocab_size = logits.shape
    half = weight.dtype != torch.float32
    dz = logits.view(weight.dtype)[:, :vocab_size] if half else logits
    if num_rows:
        blocks = _fold_blocks()
        _grad_logits_kernel[(triton.cdiv(num_rows, blocks["BLOCK_M"]),)](
            logits_ptr=logits,
            targets_ptr=tokens.targets.long().contiguous(),
            lse_ptr=group.lse.float().contiguous(),
            grad_ptr=grad_logp.float().contiguous(),
            **_bias_args(weight, tokens.bias),
            dz_ptr=dz,
            dz_row_stride=dz.stride(0),
            num_rows=num_rows,
            chunk_start=0,
            chunk_width=vocab_size,
            **_transform_args(transform),
            HALF_IN_PLACE=half,
            **blocks,
        )
    return dz
