"""Chunked pure-torch backend: token chunks, fp32 logsumexp, recompute in backward.

Peak extra memory is O(M) scalars plus one ``[chunk, V]`` fp32 logits tile and its softmax
gradient, whatever the number of tokens. Used on CPU and on any device without Triton.
"""

from __future__ import annotations

import torch

from ._types import LogitTransform, TokenBatch

# One logits tile holds about this many fp32 elements (16 MiB). Large enough that the
# [chunk, H] x [H, V] matmul runs near peak on a CPU, small enough to stay a rounding error
# next to the [N, V] logits of the eager path.
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one ``[chunk, V]`` fp32 tile holds ~``chunk_elements``."""
    return max(8, chunk_elements // max(vocab_size, 1))


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every input dtype but fp64, which stays fp64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(rows: torch.Tensor, tokens: TokenBatch, transform: LogitTransform) -> torch.Tensor:
    """fp32 logits ``[C, V]`` of the gathered hidden rows, transform applied in place."""
    acc = accumulate_dtype(rows.dtype)
    # [C, H] @ [H, V] in the input dtype (as the GPU path does), then fp32.
    logits = (rows @ tokens.weight.T).to(acc)
    if tokens.bias is not None:
        logits += tokens.bias.to(acc)
    if transform.multiplier != 1.0:
        logits *= transform.multiplier
    if transform.softcap is not None:
        logits.div_(transform.softcap).tanh_().mul_(transform.softcap)
    return logits


def forward(
    batches: list[TokenBatch], transform: LogitTransform
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch, ``(logp [M] fp32, lse [M] fp32)`` of each scored token (fp64 for fp64)."""
    results = []
    for tokens in batches:
        num_rows = tokens.num_rows
        device = tokens.hidden.device
        acc = accumulate_dtype(tokens.hidden.dtype)
        logp = torch.empty(num_rows, dtype=acc, device=device)
        lse = torch.empty(num_rows, dtype=acc, device=device)
        step = chunk_rows(tokens.weight.shape[0])
        for start in range(0, num_rows, step):
            stop = min(start + step, num_rows)
            logits = _logits(tokens.rows(start, stop), tokens, transform)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, tokens.targets[start:stop, None]).squeeze(1)
            lse[start:stop] = chunk_lse
            logp[start:stop] = target - chunk_lse
            del logits
        results.append((logp, lse))
    return results


def backward(
    tokens: TokenBatch,
    transform: LogitTransform,
    lse: torch.Tensor,  # [M] fp32
    grad_logp: torch.Tensor,  # [M] fp32
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``Σ_t grad_logp[t] · logp[t]``: ``(rows [M, H], weight [V, H], bias [V])``.

    All fp32 (fp64 for fp64 inputs; ``None`` where not asked for). Logits are recomputed chunk by chunk, and each
    chunk's ``dz = g·(onehot − softmax)`` is turned into the three gradients before the next
    chunk is formed, in a fixed order, so the result is deterministic.
    """
    num_rows = tokens.num_rows
    weight = tokens.weight
    vocab_size, hidden_size = weight.shape
    device = tokens.hidden.device
    acc = accumulate_dtype(tokens.hidden.dtype)
    grad_rows = (
        torch.empty(num_rows, hidden_size, dtype=acc, device=device) if need_hidden else None
    )
    grad_weight = (
        torch.zeros(vocab_size, hidden_size, dtype=acc, device=device) if need_weight else None
    )
    grad_bias = torch.zeros(vocab_size, dtype=acc, device=device) if need_bias else None
    step = chunk_rows(vocab_size)
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        rows = tokens.rows(start, stop)
        logits = _logits(rows, tokens, transform)  # z, [C, V]
        g = grad_logp[start:stop, None]  # [C, 1]
        targets = tokens.targets[start:stop, None]
        # dz = g·(onehot(y) − softmax(z)), formed in place of the logits tile.
        if transform.softcap is not None:
            # dz/du of the softcap is 1 − (z/c)²; keep it before z is overwritten.
            cap_slope = 1.0 - (logits / transform.softcap).square_()
        dz = logits.sub_(lse[start:stop, None]).exp_().mul_(-g)
        dz.scatter_add_(1, targets, g.expand(-1, 1).contiguous())
        if transform.softcap is not None:
            dz.mul_(cap_slope)
            del cap_slope
        if transform.multiplier != 1.0:
            dz.mul_(transform.multiplier)
        # dz is now ∂L/∂(h·Wᵀ + b) for this chunk.
        if grad_rows is not None:
            grad_rows[start:stop] = dz.to(weight.dtype) @ weight
        if grad_weight is not None:
            grad_weight.addmm_(dz.T, rows.to(acc))
        if grad_bias is not None:
            grad_bias += dz.sum(0)
        del dz, logits
    return grad_rows, grad_weight, grad_bias
