"""Store path of the Triton backend (``fastalign.store``): a group's full-vocabulary logits
from one cuBLAS GEMM and the fold, kept; then ``dz`` in place and the two gradient GEMMs.

Re-exported by ``kernels.logprob``, the backend module the host code sees.
"""

from __future__ import annotations

import torch
import triton

from .._types import BackendGrads, GroupLogits, LogitTransform, TokenBatch
from .logprob import (
    _bias_args,
    _chunk_width,
    _fold_blocks,
    _fold_kernel,
    _grad_logits_kernel,
    _mm_fp32,
    _running_stats,
    _transform_args,
)


def group_logits(rows: torch.Tensor, tokens: TokenBatch, transform: LogitTransform) -> GroupLogits:
    """Store path: one cuBLAS GEMM gives the group's raw fp32 logits ``[R, V]`` (kept, raw:
    the kernels apply bias and transform on the fly), the fold their logp and logsumexp."""
    weight, bias = tokens.weight, tokens.bias
    num_rows, vocab_size = rows.shape[0], weight.shape[0]
    device = weight.device
    logits = _mm_fp32(rows, weight.T)  # [R, V] fp32
    running_max, running_sum, target_logit = _running_stats(num_rows, device)
    if num_rows:
        blocks = _fold_blocks()
        _fold_kernel[(triton.cdiv(num_rows, blocks["BLOCK_M"]),)](
            logits_ptr=logits,
            targets_ptr=tokens.targets.long().contiguous(),
            **_bias_args(weight, bias),
            max_ptr=running_max,
            sum_ptr=running_sum,
            tgt_ptr=target_logit,
            probs_ptr=logits,
            rescale_ptr=running_sum,
            sq_ptr=running_sum,
            num_rows=num_rows,
            chunk_start=0,
            chunk_width=vocab_size,
            **_transform_args(transform),
            WRITE_PROBS=False,
            WRITE_SQ=False,
            **blocks,
        )
    lse = running_max + torch.log(running_sum)
    return GroupLogits(logits, target_logit - lse, lse)


def group_grads(
    group: GroupLogits,
    rows: torch.Tensor,  # [R, H] the group's hidden rows
    tokens: TokenBatch,  # the group's tokens (targets [R]) and lm_head
    transform: LogitTransform,
    grad_logp: torch.Tensor,  # [R] fp32
    grads: BackendGrads,
) -> torch.Tensor | None:
    """Store path: ``dz`` in place of the group's logits (in the weight's dtype, inside the
    fp32 buffer for half weights), then the rows' gradient ``[R, H]`` fp32 (one GEMM) and
    the lm_head's fp32 accumulator (vocab chunks, fixed order: deterministic)."""
    logits = group.logits  # [R, V] fp32, raw
    weight, bias = tokens.weight, tokens.bias
    num_rows, vocab_size = logits.shape
    half = weight.dtype != torch.float32
    # A half dz lives in the first half of each fp32 row: [R, V] with row stride 2V.
    dz = logits.view(weight.dtype)[:, :vocab_size] if half else logits
    if num_rows:
        blocks = _fold_blocks()
        _grad_logits_kernel[(triton.cdiv(num_rows, blocks["BLOCK_M"]),)](
            logits_ptr=logits,
            targets_ptr=tokens.targets.long().contiguous(),
            lse_ptr=group.lse.float().contiguous(),
            grad_ptr=grad_logp.float().contiguous(),
            **_bias_args(weight, bias),
            dz_ptr=dz,
            dz_row_stride=dz.stride(0),
            num_rows=num_rows,
            chunk_start=0,
            chunk_width=vocab_size,
            **_transform_args(transform),
            HALF_IN_PLACE=half,
            **blocks,
        )
    if grads.bias is not None:
        grads.bias.add_(dz.float().sum(0))
    if grads.weight is not None:
        if half:
            width = _chunk_width(weight.shape[1], vocab_size)
            for start in range(0, vocab_size, width):
                part = _mm_fp32(dz[:, start : start + width].T, rows.to(dz.dtype))
                grads.weight[start : start + width].add_(part)
        else:
            grads.weight.addmm_(dz.T, rows.float())
    return None if grads.rows is None else _mm_fp32(dz, weight)
