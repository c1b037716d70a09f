"""Chunked pure-torch backend: token chunks, fp32 logsumexp, recompute in backward; and the
store path's two steps (``group_logits``, ``group_grads``) for ``fastalign.store``.

Peak extra memory is O(M) scalars plus one ``[chunk, V]`` fp32 logits tile and its softmax
gradient, whatever the number of tokens (the store path: one group's logits, bounded by its
budget, plus the gradient accumulators). Used on CPU and on any device without Triton.
"""

from __future__ import annotations

import torch

from ._types import (
    BackendGrads,
    BackendResult,
    ForwardRequest,
    GroupLogits,
    LogitTransform,
    TokenBatch,
)
from .tiles import TORCH_CHUNK_ELEMENTS as CHUNK_ELEMENTS  # noqa: F401 - re-exported
from .tiles import chunk_rows


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every input dtype but fp64, which stays fp64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _matmul_out_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with a result at least fp32 wide.

    fp16 operands are widened first: an fp16 GEMM output overflows to inf above 65504,
    where CUDA's fp32-output GEMM (the Triton backend's) stays finite. bf16 has fp32's
    range and keeps its (faster) native GEMM; its output is widened after.
    """
    acc = accumulate_dtype(a.dtype)
    if a.dtype == torch.float16:
        return a.to(acc) @ b.to(acc)
    return (a @ b).to(acc)


def _logits(rows: torch.Tensor, tokens: TokenBatch, transform: LogitTransform) -> torch.Tensor:
    """fp32 logits ``[C, V]`` of the gathered hidden rows, transform applied in place."""
    acc = accumulate_dtype(rows.dtype)
    logits = _matmul_out_fp32(rows, tokens.weight.T)  # [C, H] @ [H, V]
    if tokens.bias is not None:
        logits += tokens.bias.to(acc)
    if transform.multiplier != 1.0:
        logits *= transform.multiplier
    if transform.softcap is not None:
        logits.div_(transform.softcap).tanh_().mul_(transform.softcap)
    return logits


def _softmax_in_place(logits: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Row logsumexp ``[C]`` of a ``[C, V]`` tile, which is overwritten with
    ``exp(z − max)`` (``softmax(z)`` when ``normalize``): one exp per element, where
    ``torch.logsumexp`` would take a second one and two temporaries."""
    row_max = logits.amax(dim=1, keepdim=True)  # [C, 1]
    exp = logits.sub_(row_max).exp_()
    total = exp.sum(dim=1, keepdim=True)
    if normalize:
        exp.div_(total)
    return (row_max + total.log_()).squeeze(1)


def forward(
    requests: list[ForwardRequest], transform: LogitTransform, chunk_elements: int | None = None
) -> list[BackendResult]:
    """Per request, ``BackendResult(logp [M], lse [M], expected [M, H] or None, log_sum_sq
    [M] or None)``, fp32 (fp64 for fp64), in token chunks of ``chunk_elements`` logits
    (default ``CHUNK_ELEMENTS``; the store path scores its no-grad streams in chunks as large
    as its group budget). ``log_sum_sq``: ``log Σ_v p_tv²`` (WPO), same logits.

    ``expectation`` asks for ``E_t = Σ_v softmax(z_t)_v · s_tv · W_v`` (``s`` the softcap
    slope, 1 without softcap): with a frozen lm_head it turns the backward into
    ``grad_h_t = g_t · mult · (s_ty · W[y_t] − E_t)``, with no logits recomputed.
    """
    results = []
    for request in requests:
        tokens = request.tokens
        num_rows = tokens.num_rows
        device = tokens.hidden.device
        acc = accumulate_dtype(tokens.hidden.dtype)
        weight = tokens.weight
        logp = torch.empty(num_rows, dtype=acc, device=device)
        lse = torch.empty(num_rows, dtype=acc, device=device)
        expected = sq = None
        if request.log_sum_sq:
            sq = torch.empty(num_rows, dtype=acc, device=device)
        if request.expectation:
            expected = torch.empty(num_rows, weight.shape[1], dtype=acc, device=device)
        step = chunk_rows(weight.shape[0], chunk_elements or CHUNK_ELEMENTS)
        for start in range(0, num_rows, step):
            stop = min(start + step, num_rows)
            logits = _logits(tokens.rows(start, stop), tokens, transform)
            target = logits.gather(1, tokens.targets[start:stop, None]).squeeze(1)
            cap_slope = None
            if sq is not None:  # log Σ p² = logsumexp(2z) − 2·lse, before z is overwritten
                sq[start:stop] = torch.logsumexp(2 * logits, dim=-1)
            if expected is not None and transform.softcap is not None:
                cap_slope = 1.0 - (logits / transform.softcap).square_()
            lse[start:stop] = _softmax_in_place(logits, normalize=expected is not None)
            logp[start:stop] = target - lse[start:stop]
            if sq is not None:
                sq[start:stop] -= 2 * lse[start:stop]
            if expected is not None:
                probs = logits if cap_slope is None else logits.mul_(cap_slope)
                expected[start:stop] = probs.to(weight.dtype) @ weight
            del logits, cap_slope
        results.append(BackendResult(logp, lse, expected, sq))
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
) -> BackendGrads:
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
        dz = _logits(rows, tokens, transform)  # z, [C, V]; dz formed in its place
        _dz_in_place(
            dz, tokens.targets[start:stop], lse[start:stop], grad_logp[start:stop], transform
        )
        if grad_rows is not None:
            grad_rows[start:stop] = _matmul_out_fp32(dz.to(weight.dtype), weight)
        if grad_weight is not None:
            grad_weight.addmm_(dz.T, rows.to(acc))
        if grad_bias is not None:
            grad_bias += dz.sum(0)
        del dz
    return BackendGrads(grad_rows, grad_weight, grad_bias)


def _dz_in_place(
    logits: torch.Tensor,  # [C, V] z, overwritten with dz
    targets: torch.Tensor,  # [C] int64
    lse: torch.Tensor,  # [C]
    grad_logp: torch.Tensor,  # [C]
    transform: LogitTransform,
) -> None:
    """``dz = g·(onehot(y) − softmax(z))·s·mult`` (``s`` the softcap slope) in place of z:
    ∂L/∂(h·Wᵀ + b) for these rows."""
    g = grad_logp[:, None].to(logits.dtype)  # [C, 1]
    cap_slope = None
    if transform.softcap is not None:
        # dz/du of the softcap is 1 − (z/c)²; kept before z is overwritten.
        cap_slope = 1.0 - (logits / transform.softcap).square_()
    dz = logits.sub_(lse[:, None]).exp_().mul_(-g)
    dz.scatter_add_(1, targets[:, None], g.contiguous())
    if cap_slope is not None:
        dz.mul_(cap_slope)
    if transform.multiplier != 1.0:
        dz.mul_(transform.multiplier)


def group_logits(
    rows: torch.Tensor, tokens: TokenBatch, transform: LogitTransform, log_sum_sq: bool = False
) -> GroupLogits:
    """Store path: the logits of one group's ``[R, H]`` rows (one GEMM), kept; per row its
    logp and logsumexp (and ``log Σ_v p_v²`` when ``log_sum_sq``: WPO), chunk by chunk. The
    kept buffer holds ``softmax(z)`` (``z`` itself with a softcap, whose slope
    ``group_grads`` needs)."""
    logits = _logits(rows, tokens, transform)  # [R, V]
    target = logits.gather(1, tokens.targets[:, None]).squeeze(1)
    lse = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
    sq = torch.empty_like(lse) if log_sum_sq else None
    step = chunk_rows(logits.shape[1])
    for start in range(0, logits.shape[0], step):
        chunk, part = logits[start : start + step], slice(start, start + step)
        if sq is not None:  # log Σ p² = logsumexp(2z) − 2·lse, before z is overwritten
            sq[part] = torch.logsumexp(2 * chunk, dim=-1)
        if transform.softcap is None:
            lse[part] = _softmax_in_place(chunk, normalize=True)
        else:
            lse[part] = torch.logsumexp(chunk, dim=-1)
    if sq is not None:
        sq -= 2 * lse
    return GroupLogits(logits, target - lse, lse, log_sum_sq=sq)


def group_grads(
    group: GroupLogits,
    rows: torch.Tensor,  # [R, H] the group's hidden rows
    tokens: TokenBatch,  # the group's tokens (targets [R]) and lm_head
    transform: LogitTransform,
    grad_logp: torch.Tensor,  # [R] fp32
    grads: BackendGrads,
) -> torch.Tensor | None:
    """Store path: ``dz`` in place of the group's kept buffer; ``grads.weight`` /
    ``grads.bias`` accumulate (fp32); returns the rows' gradient ``[R, H]`` if asked for."""
    dz = group.logits
    if transform.softcap is None:  # dz = g·mult·(onehot − p), p already in place
        g = (grad_logp * transform.multiplier).to(dz.dtype)[:, None]  # [R, 1]
        dz.mul_(-g).scatter_add_(1, tokens.targets[:, None], g)
    else:
        step = chunk_rows(dz.shape[1])
        for start in range(0, dz.shape[0], step):
            stop = start + step
            _dz_in_place(
                dz[start:stop], tokens.targets[start:stop], group.lse[start:stop],
                grad_logp[start:stop], transform,
            )  # fmt: skip
    weight = tokens.weight
    if grads.weight is not None:
        grads.weight.addmm_(dz.T, rows.to(dz.dtype))
    if grads.bias is not None:
        grads.bias.add_(dz.sum(0))
    if grads.rows is None:
        return None
    return _matmul_out_fp32(dz.to(weight.dtype), weight)
