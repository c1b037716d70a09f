"""Per-token log-probs of compacted rows, with entropy, mean logit, top-1 hit and ``log Σ p²``.

The op behind fastalign's TRL integration: TRL 1.16's fused LM head contract (its
``ChunkedLogProbFunction``: ``z = softcap(logit_scale·(h·Wᵀ + b)) / temperature``, chunks in
the autocast dtype), computed with one GEMM per vocab chunk and one online fold per chunk.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from . import checks

TOKEN_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Elements of one [M, C] vocab chunk of logits: 16 MiB of fp32 on a CPU, 128 MiB of bf16 on
# a GPU (TRL's tile is 4096 x 32768); interpreted, a tiny budget so tests span many chunks.
TILE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26, "interpret": 1 << 10}
VOCAB_ALIGN = {"cpu": 64, "cuda": 256, "interpret": 16}


class TokenLogpsOutput(NamedTuple):
    """Per-token results, each ``[M]`` (``None`` where not requested).

    log_probs:        fp32, ``log p(y_t)``; differentiable.
    entropy:          fp32, ``−Σ_v p_v log p_v``; differentiable.
    log_sum_sq_probs: fp32, ``log Σ_v p_v²`` (WPO weights); no gradient.
    mean_logits:      fp32, mean of the transformed logits over the vocabulary; no gradient.
    is_top1:          bool, the label is the first argmax of the logits; no gradient.
    """

    log_probs: torch.Tensor
    entropy: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None
    mean_logits: torch.Tensor | None
    is_top1: torch.Tensor | None


@dataclass(frozen=True)
class _HeadPlan:
    """Everything about one call that is not a tensor (passed through ``apply`` as one)."""

    logit_scale: float
    softcap: float | None
    temperature: float
    outputs: frozenset
    backend: str  # "torch" or "triton"
    compute_dtype: torch.dtype
    gather_weight: Callable | None

    @property
    def kernel_transform(self) -> dict:
        return dict(
            logit_scale=float(self.logit_scale),
            softcap=float(self.softcap or 1.0),
            inv_temp=1.0 / self.temperature,
            HAS_SOFTCAP=self.softcap is not None,
        )

    @property
    def kernel_flags(self) -> dict:
        names = dict(HAS_ENTROPY="entropy", HAS_SQ="log_sum_sq_probs")
        names.update(HAS_MEAN="mean_logits", HAS_TOP1="is_top1")
        return {flag: name in self.outputs for flag, name in names.items()}

    def gathered(self, *params: torch.Tensor | None):
        """Context in which ``weight``/``bias`` are whole (DeepSpeed ZeRO-3 re-gathers here)."""
        if self.gather_weight is None:
            return contextlib.nullcontext()
        return self.gather_weight(*params)


@dataclass
class _FoldStats:
    """Running online-softmax statistics of each row, fp32 (fp64 for fp64) ``[M]`` each."""

    running_max: torch.Tensor
    sum_exp: torch.Tensor  # Σ exp(z − max)
    z_exp: torch.Tensor  # Σ exp(z − max)·z
    sq_exp: torch.Tensor  # Σ exp(z − max)²
    z_sum: torch.Tensor  # Σ z
    max_before_target: torch.Tensor  # max z over ids below the label
    target_z: torch.Tensor

    @classmethod
    def start(cls, num_rows: int, device: torch.device, dtype: torch.dtype) -> _FoldStats:
        def full(value):
            return torch.full((num_rows,), value, device=device, dtype=dtype)

        return cls(full(-torch.inf), full(0.0), full(0.0), full(0.0), full(0.0), full(-torch.inf),
                   full(0.0))  # fmt: skip


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _vocab_chunks(num_rows: int, vocab: int, plan: _HeadPlan) -> list[tuple[int, int]]:
    """``[start, stop)`` column ranges whose ``[M, C]`` tile fits the device's budget."""
    kind = plan_kind(plan)
    align = VOCAB_ALIGN[kind]
    width = max(align, TILE_ELEMENTS[kind] // max(num_rows, 1) // align * align)
    return [(start, min(start + width, vocab)) for start in range(0, vocab, width)]


def plan_kind(plan: _HeadPlan) -> str:
    """Which tile budget applies: the interpreter, a CUDA device or a CPU."""
    if plan.backend == "triton":
        from .kernels import token_stats

        return "interpret" if token_stats.INTERPRET else "cuda"
    return "cpu"


def _raw_logits(rows: torch.Tensor, weight, bias, start: int, stop: int, dtype) -> torch.Tensor:
    """``u = h·W[start:stop]ᵀ + b[start:stop]`` in the compute dtype: ``[M, C]``."""
    tile = rows @ weight[start:stop].to(dtype).t()
    if bias is not None:
        tile += bias[start:stop].to(dtype)
    return tile


def _transform(tile: torch.Tensor, plan: _HeadPlan, acc: torch.dtype):
    """``(z, slope)``: TRL's transform of a raw tile in ``acc``, and ``∂z/∂u``."""
    u = tile.to(acc) * plan.logit_scale
    if plan.softcap is None:
        return u / plan.temperature, plan.logit_scale / plan.temperature
    t = torch.tanh(u / plan.softcap)
    return plan.softcap * t / plan.temperature, plan.logit_scale * (1 - t * t) / plan.temperature


def _fold_torch(tile, targets, stats: _FoldStats, start: int, plan: _HeadPlan, want_probs: bool):
    """``_fold_kernel`` in torch, whole tile at once; returns ``(probs·s, rescale)`` or None."""
    z, slope = _transform(tile, plan, stats.sum_exp.dtype)  # [M, C]
    local = targets - start
    cols = torch.arange(z.shape[1], device=z.device)
    if "mean_logits" in plan.outputs:
        stats.z_sum += z.sum(1)
    if "is_top1" in plan.outputs:
        lower = z.masked_fill(cols >= local[:, None], -torch.inf).amax(1)
        torch.maximum(stats.max_before_target, lower, out=stats.max_before_target)
    new_max = torch.maximum(stats.running_max, z.amax(1))
    rescale = torch.exp(stats.running_max - new_max)
    e = torch.exp(z - new_max[:, None])
    stats.sum_exp.mul_(rescale).add_(e.sum(1))
    if "entropy" in plan.outputs:
        stats.z_exp.mul_(rescale).add_((e * z).sum(1))
    if "log_sum_sq_probs" in plan.outputs:
        stats.sq_exp.mul_(rescale * rescale).add_((e * e).sum(1))
    stats.running_max.copy_(new_max)
    here = (local >= 0) & (local < z.shape[1])
    picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    stats.target_z.copy_(torch.where(here, picked, stats.target_z))
    return (e * slope, rescale) if want_probs else None


def _fold(tile, targets, stats, start, plan: _HeadPlan, want_probs: bool):
    """Fold one chunk into ``stats`` with the plan's backend; ``(probs·s [M, C], rescale [M])``
    when ``want_probs`` (the frozen-head expectation), else None."""
    if plan.backend == "torch":
        return _fold_torch(tile, targets, stats, start, plan, want_probs)
    from .kernels import token_stats

    rescale = torch.empty_like(stats.sum_exp) if want_probs else None
    token_stats.fold(tile, targets, stats, start, plan.kernel_transform, plan.kernel_flags,
                     rescale)  # fmt: skip
    return (tile, rescale) if want_probs else None


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` accumulated (and returned) in ``acc``, without rounding to a half dtype first."""
    if a.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


def _finish(
    stats: _FoldStats, vocab: int, plan: _HeadPlan
) -> tuple[TokenLogpsOutput, torch.Tensor]:
    """Per-token outputs from the final statistics, and ``log Z`` ``[M]`` for the backward."""
    log_z = stats.running_max + torch.log(stats.sum_exp)
    want = plan.outputs
    out = TokenLogpsOutput(
        log_probs=stats.target_z - log_z,
        entropy=log_z - stats.z_exp / stats.sum_exp if "entropy" in want else None,
        log_sum_sq_probs=(torch.log(stats.sq_exp) - 2 * torch.log(stats.sum_exp)
                          if "log_sum_sq_probs" in want else None),
        mean_logits=stats.z_sum / vocab if "mean_logits" in want else None,
        is_top1=((stats.target_z >= stats.running_max) & (stats.target_z > stats.max_before_target)
                 if "is_top1" in want else None),
    )  # fmt: skip
    return out, log_z


def _forward(plan: _HeadPlan, rows, weight, bias, labels, frozen_head: bool):
    """One pass over the vocab chunks: ``(outputs, log_z [M], expected [M, H] or None)``."""
    num_rows, vocab = rows.shape[0], weight.shape[0]
    acc = _acc_dtype(plan.compute_dtype)
    stats = _FoldStats.start(num_rows, rows.device, acc)
    expected = (
        torch.zeros(num_rows, weight.shape[1], device=rows.device, dtype=acc)
        if frozen_head
        else None
    )
    for start, stop in _vocab_chunks(num_rows, vocab, plan):
        tile = _raw_logits(rows, weight, bias, start, stop, plan.compute_dtype)  # [M, C]
        probs = _fold(tile, labels, stats, start, plan, frozen_head)
        if probs is not None:
            # E = Σ_v softmax·s·W_v accumulates online, rescaled like flash attention's output
            scaled, rescale = probs
            w_chunk = weight[start:stop].to(scaled.dtype)
            expected.mul_(rescale[:, None]).add_(_mm_acc(scaled, w_chunk, acc))
    out, log_z = _finish(stats, vocab, plan)
    if expected is not None:
        expected /= stats.sum_exp[:, None]
    return out, log_z, expected


def _grad_tile(tile, labels, log_z, entropy, g_logp, g_ent, start, plan: _HeadPlan):
    """``∂L/∂u`` of one recomputed chunk ``[M, C]`` (in place on the Triton backend)."""
    if plan.backend == "triton":
        from .kernels import token_stats

        token_stats.grad(tile, labels, log_z, entropy, g_logp, g_ent, start, plan.kernel_transform)
        return tile
    z, slope = _transform(tile, plan, log_z.dtype)
    log_p = z - log_z[:, None]
    p = torch.exp(log_p)
    dz = torch.zeros_like(z)
    if g_logp is not None:
        dz -= g_logp[:, None] * p
        local = labels - start
        here = (local >= 0) & (local < z.shape[1])
        dz.scatter_add_(1, local.clamp(0, z.shape[1] - 1)[:, None], (g_logp * here)[:, None])
    if g_ent is not None:
        dz -= g_ent[:, None] * p * (log_p + entropy[:, None])
    return (dz * slope).to(tile.dtype)


def _backward_recompute(plan: _HeadPlan, saved, g_logp, g_ent, needs: Sequence[bool]):
    """Gradients ``(rows [M, H], weight [V, H], bias [V])`` recomputing each vocab chunk.

    Vocab chunks are the outer loop over all rows, so ``grad_W[c] = dzᵀ·h`` is finished in one
    GEMM per chunk and written in the weight's dtype: no fp32 ``[V, H]`` accumulator.
    """
    rows, weight, bias, labels, log_z, entropy = saved
    acc = log_z.dtype
    grad_rows = torch.zeros(rows.shape, device=rows.device, dtype=acc) if needs[0] else None
    grad_weight = torch.empty_like(weight) if needs[1] else None
    grad_bias = torch.empty_like(bias) if needs[2] else None
    for start, stop in _vocab_chunks(rows.shape[0], weight.shape[0], plan):
        tile = _raw_logits(rows, weight, bias, start, stop, plan.compute_dtype)
        dz = _grad_tile(tile, labels, log_z, entropy, g_logp, g_ent, start, plan)  # [M, C]
        if grad_rows is not None:
            grad_rows += _mm_acc(dz, weight[start:stop].to(dz.dtype), acc)
        if grad_weight is not None:
            grad_weight[start:stop] = _mm_acc(dz.t(), rows, acc)
        if grad_bias is not None:
            grad_bias[start:stop] = dz.sum(0, dtype=acc)
    return grad_rows, grad_weight, grad_bias


def _backward_frozen(plan: _HeadPlan, weight, labels, log_probs, log_z, expected, g_logp):
    """Frozen head: ``∂L/∂h_t = g_t·(s_y·W[y_t] − E_t)`` from the forward's ``E``; no GEMM."""
    target_z = (log_probs + log_z)[:, None]  # [M, 1]
    if plan.softcap is None:
        slope = plan.logit_scale / plan.temperature
    else:
        t = target_z * plan.temperature / plan.softcap  # tanh of the capped target logit
        slope = plan.logit_scale * (1 - t * t) / plan.temperature
    target_rows = weight.index_select(0, labels).to(expected.dtype)  # [M, H]
    return g_logp[:, None] * (slope * target_rows - expected)


class _TokenHead(torch.autograd.Function):
    """Forward: one pass over vocab chunks; backward: recompute, or the frozen head's ``E``."""

    @staticmethod
    def forward(ctx, plan: _HeadPlan, hidden, weight, bias, labels):
        # Entropy is usually logged only: leave its gradient None rather than zeros
        ctx.set_materialize_grads(False)
        frozen_head = ctx.needs_input_grad[1] and not any(ctx.needs_input_grad[2:4])
        with torch.autocast(hidden.device.type, enabled=False), plan.gathered(weight, bias):
            rows = hidden.to(plan.compute_dtype)
            out, log_z, expected = _forward(plan, rows, weight, bias, labels, frozen_head)
        ctx.plan = plan
        ctx.save_for_backward(hidden, weight, bias, labels, log_z, out.log_probs, out.entropy,
                              expected)  # fmt: skip
        ctx.mark_non_differentiable(*(x for x in out[2:] if x is not None))
        return tuple(out)

    @staticmethod
    @once_differentiable  # the gradients are formed by kernels: no double backward
    def backward(ctx, grad_logp, grad_entropy, *_):
        plan: _HeadPlan = ctx.plan
        hidden, weight, bias, labels, log_z, log_probs, entropy, expected = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:4]
        grad_logp = None if grad_logp is None else grad_logp.to(log_z.dtype)
        grad_entropy = None if grad_entropy is None else grad_entropy.to(log_z.dtype)
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        no_autocast = torch.autocast(hidden.device.type, enabled=False)
        with no_autocast, plan.gathered(weight, bias):
            if expected is not None and grad_entropy is None:
                grad_rows = _backward_frozen(plan, weight, labels, log_probs, log_z, expected,
                                             grad_logp)  # fmt: skip
                grad_weight = grad_bias = None
            else:
                rows = hidden.to(plan.compute_dtype)
                saved = (rows, weight, bias, labels, log_z, entropy)
                grad_rows, grad_weight, grad_bias = _backward_recompute(
                    plan, saved, grad_logp, grad_entropy, needs
                )
        grad_hidden = None if grad_rows is None or not needs[0] else grad_rows.to(hidden.dtype)
        return None, grad_hidden, grad_weight, grad_bias, None


def check_inputs(
    hidden, weight, labels, *, bias, temperature, logit_softcap, logit_scale, outputs, backend
) -> None:
    """``token_logps``'s named errors for bad arguments, raised before any work starts."""
    checks.check_float(hidden, "hidden")
    checks.check_float(weight, "weight")
    checks.check_int(labels, "labels")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [M, H] and weight [V, H] with the same H, got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be [M] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if bias is not None:
        checks.check_float(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, value in (("weight", weight), ("labels", labels), ("bias", bias)):
        if value is not None:
            checks.check_same_device(value, name, hidden.device)
    checks.check_number(temperature, "temperature", low=0, low_open=True)
    checks.check_number(logit_softcap, "logit_softcap", low=0, low_open=True, allow_none=True)
    checks.check_number(logit_scale, "logit_scale", nonzero=True)
    if isinstance(outputs, str) or not set(outputs) <= set(TOKEN_OUTPUTS):
        raise ValueError(
            f"outputs must be a sequence of names among {TOKEN_OUTPUTS}, got {outputs!r}"
        )
    checks.check_choice(backend, "backend", checks.BACKENDS)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= weight.shape[0]):
        raise ValueError(
            f"labels must lie in [0, {weight.shape[0]}) (compacted rows: no ignore_index)"
        )


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """``"auto"``: Triton on CUDA, chunked torch elsewhere; ``"triton"`` checked usable."""
    if backend == "auto":
        usable = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        return "triton" if usable else "torch"
    if backend == "triton":
        if dtype == torch.float64:
            raise TypeError("backend='triton' takes bfloat16, float16 or float32, not float64")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                f"imported to run on {device.type} tensors; use backend='torch' or 'auto'"
            )
    return backend


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    logit_scale: float = 1.0,
    outputs: Sequence[str] = ("log_probs",),
    backend: str = "auto",
    gather_weight: Callable | None = None,
) -> TokenLogpsOutput:
    """Per-token log-probs of compacted rows, and on request entropy, mean logit, top-1 hit
    and ``log Σ p²``, all from one online pass over vocab chunks (no ``[M, V]`` logits).

    Logits: ``z = softcap(logit_scale·(h·Wᵀ + b)) / temperature`` (TRL's order: the model's
    cap, then the sampling temperature). Chunks are computed in the autocast dtype when
    autocast is on (as TRL does with fp32 weights under bf16 autocast), else in ``hidden``'s
    dtype; statistics in fp32 (fp64 for fp64 inputs on the torch backend).

    Args:
        hidden: ``[M, H]`` scored rows (bf16/fp16/fp32/fp64); ``M = 0`` gives empty outputs
            that still backpropagate (zeros).
        weight: lm_head ``[V, H]``; ``bias``: optional ``[V]``.
        labels: int ``[M]`` in ``[0, V)`` (already compacted: no ignore index).
        temperature, logit_softcap, logit_scale: the logit transform above.
        outputs: names among ``TOKEN_OUTPUTS``; ``log_probs`` is always computed.
        backend: ``"auto"`` (Triton fold kernels on CUDA, chunked torch elsewhere),
            ``"triton"`` (CUDA, or CPU with ``TRITON_INTERPRET=1``) or ``"torch"``.
        gather_weight: optional context factory entered with ``(weight, bias)`` around every
            read of them, forward and backward (DeepSpeed ZeRO-3's ``GatheredParameters``).

    Returns:
        ``TokenLogpsOutput``: fp32 ``[M]`` fields (``is_top1`` bool); ``log_probs`` and
        ``entropy`` are differentiable w.r.t. ``hidden``, ``weight`` and ``bias``. With a
        frozen head (only ``hidden`` needs a gradient) the forward also accumulates
        ``E = softmax·W`` so the backward is one gather, no recompute.

    Example:
        >>> h, w = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8)
        >>> out = token_logps(h, w, torch.tensor([1, 2, 3, 4, 5]), outputs=("entropy",))
        >>> out.log_probs.shape, out.entropy.shape
        (torch.Size([5]), torch.Size([5]))
    """
    check_inputs(
        hidden, weight, labels, bias=bias, temperature=temperature, logit_softcap=logit_softcap,
        logit_scale=logit_scale, outputs=outputs, backend=backend,
    )  # fmt: skip
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    plan = _HeadPlan(
        logit_scale=logit_scale,
        softcap=logit_softcap,
        temperature=temperature,
        outputs=frozenset(outputs),
        backend=_resolve_backend(backend, hidden.device, compute_dtype),
        compute_dtype=compute_dtype,
        gather_weight=gather_weight,
    )
    return TokenLogpsOutput(*_TokenHead.apply(plan, hidden, weight, bias, labels.long()))
