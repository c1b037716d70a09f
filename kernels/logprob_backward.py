"""Recompute-path backward of the Triton backend: per vocab chunk ``dz`` in the weight's
dtype (the fused dz GEMM where it applies, else a cuBLAS GEMM and ``_grad_logits_kernel``),
then ``grad_rows += dz·W_c`` and ``grad_W[c] = dzᵀ·h``: no ``[V, H]`` fp32 accumulator.

Re-exported by ``kernels.logprob``, the backend module the host code sees.
"""

from __future__ import annotations

import torch

from .._types import BackendGrads, LogitTransform, TokenBatch
from .logprob import _dz_chunks, _mm_fp32


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
