"""Chunked pure-torch backend: token chunks, fp32 logsumexp, recompute in backward.

Peak extra memory is O(M) scalars plus one ``[chunk, V]`` fp32 logits tile and its softmax
gradient, whatever the number of tokens. Used on CPU and on any device without Triton.
"""

from __future__ import annotations

import torch

from ._types import LogitTransform, TokenBatch
from .tiles import TORCH_CHUNK_ELEMENTS as CHUNK_ELEMENTS  # noqa: F401 - re-exported
from .tiles import chunk_rows


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
    batches: list[TokenBatch],
    transform: LogitTransform,
    expectation: list[bool] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per batch, ``(logp [M], lse [M], expected [M, H] or None)``, fp32 (fp64 for fp64).

    ``expectation[i]`` asks for batch i's ``E_t = Σ_v softmax(z_t)_v · s_tv · W_v`` (``s``
    the softcap slope, 1 without softcap): with a frozen lm_head it turns the backward into
    ``grad_h_t = g_t · mult · (s_ty · W[y_t] − E_t)``, with no logits recomputed.
    """
    results = []
    for i, tokens in enumerate(batches):
        num_rows = tokens.num_rows
        device = tokens.hidden.device
        acc = accumulate_dtype(tokens.hidden.dtype)
        weight = tokens.weight
        logp = torch.empty(num_rows, dtype=acc, device=device)
        lse = torch.empty(num_rows, dtype=acc, device=device)
        expected = None
        if expectation is not None and expectation[i]:
            expected = torch.empty(num_rows, weight.shape[1], dtype=acc, device=device)
        step = chunk_rows(weight.shape[0])
        for start in range(0, num_rows, step):
            stop = min(start + step, num_rows)
            logits = _logits(tokens.rows(start, stop), tokens, transform)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, tokens.targets[start:stop, None]).squeeze(1)
            lse[start:stop] = chunk_lse
            logp[start:stop] = target - chunk_lse
            if expected is not None:
                if transform.softcap is not None:
                    cap_slope = 1.0 - (logits / transform.softcap).square_()
                probs = logits.sub_(chunk_lse[:, None]).exp_()
                if transform.softcap is not None:
                    probs.mul_(cap_slope)
                    del cap_slope
                expected[start:stop] = probs.to(weight.dtype) @ weight
            del logits
        results.append((logp, lse, expected))
    return results


def backward_from_expectation(
    tokens: TokenBatch,
    transform: LogitTransform,
    logp: torch.Tensor,  # [M]
    lse: torch.Tensor,  # [M]
    expected: torch.Tensor,  # [M, H]
    grad_logp: torch.Tensor,  # [M]
) -> torch.Tensor:
    """Frozen-head gradient of the hidden rows, ``[M, H]``, from the forward's ``E_t``.

    ``∂logp_t/∂h_t = mult · (s_ty · W[y_t] − E_t)``: one gather of target rows, no matmul.
    Shared by every backend (it is O(M·H) elementwise work).
    """
    scale = grad_logp * transform.multiplier  # [M]
    if transform.softcap is not None:
        target_logit = logp + lse  # z_ty, recovered without a recompute
        target_scale = scale * (1.0 - (target_logit / transform.softcap).square())
    else:
        target_scale = scale
    grad_rows = tokens.weight.index_select(0, tokens.targets).to(expected.dtype)
    grad_rows.mul_(target_scale[:, None])
    grad_rows.addcmul_(expected, scale[:, None], value=-1.0)
    return grad_rows


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

    All fp32 (fp64 for fp64 inputs; ``None`` where not asked for). Logits are recomputed
    chunk by chunk, and each chunk's ``dz = g·(onehot − softmax)`` is turned into the three
    gradients before the next chunk is formed, in a fixed order: deterministic.
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
