"""Activation terms: what the transformer body keeps from forward to backward, per token."""

from __future__ import annotations

from dataclasses import dataclass

from .shapes import ModelShape
from .step import Step


def layer_activation_bytes(shape: ModelShape, act: int, moe: bool, lora: int | None = None) -> int:
    """Bytes per token that one decoder layer saves for backward (HF implementation, SDPA).

    Counted from what autograd keeps: the layer input; each RMSNorm's fp32 upcast (half
    dtypes only; in fp32 it is the input itself), normalised and scaled outputs; q/k after
    RoPE and v (RoPE's products save only cos/sin); SDPA's output and fp32 logsumexp
    (flash/memory-efficient kernel: no ``T x T`` scores, which needs no padding mask);
    the residual sum; the gated MLP's gate, SiLU, up and product. q/k RMSNorms (Qwen3) add
    an fp32 upcast and a normalised copy of q and k. MoE: router logits, their fp32 softmax,
    and per active expert the dispatched input, gate/up, SiLU, product and weighted output.
    """
    h = shape.hidden_size
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    upcast = 4 if act < 4 else 0
    norm = upcast + 2 * act  # per element of the normalised tensor
    total = act * h  # layer input
    total += norm * h  # input_layernorm
    if shape.qk_norm:
        total += (4 + act) * (q + kv)  # fp32 input (or the projection itself) + normalised
    total += act * (q + 2 * kv)  # q, k after RoPE; v
    total += act * q + 4 * shape.num_heads  # SDPA output + logsumexp
    total += act * h  # residual after attention
    total += norm * h  # post_attention_layernorm
    if moe:
        k, width, experts = (
            shape.num_experts_per_tok,
            shape.moe_intermediate_size,
            shape.num_experts,
        )
        total += act * experts + 4 * experts  # router logits, fp32 softmax
        total += k * (act * h + 4 * act * width + act * h + 4)  # dispatch, MLP, weighted out
        if shape.shared_expert_size:
            total += 4 * act * shape.shared_expert_size + act * h + 2 * act
    else:
        total += 4 * act * shape.intermediate_size  # gate, silu(gate), up, silu·up
    if lora:
        adapted = 7 if not moe else (4 + (3 if shape.shared_expert_size else 0))
        total += adapted * act * lora  # each adapter's [N, r] intermediate
    return total


def router_loss_bytes(shape: ModelShape, tokens: int) -> int:
    """Bytes the MoE router's load-balancing loss keeps for backward (0 for dense models).

    The trainer adds it on MoE models by default, as TRL does: transformers'
    ``load_balancing_loss_func`` softmaxes every MoE layer's router logits once more in fp32
    (``[N, E]``, saved) and its top-k saves the int64 indices (``[N, k]``); the padding mask
    it weights them with is one fp32 per token; the per-expert mean ``[E]`` and the token count
    are fp32 too. Measured exactly on CPU in ``tests/test_trainer_models.py``.
    """
    if not shape.num_experts:
        return 0
    moe_layers = shape.num_layers - shape.dense_layers
    per_layer = 4 * shape.num_experts + 8 * shape.num_experts_per_tok
    return tokens * (moe_layers * per_layer + 4) + 4 * shape.num_experts + 4


def body_activation_bytes(
    shape: ModelShape, tokens: int, act: int, checkpointing: bool, lora: int | None = None
) -> tuple[int, int]:
    """``(saved, recompute)``: bytes the body keeps from forward to backward for ``tokens``
    tokens, and the extra bytes live while one layer is recomputed in backward (0 without
    activation checkpointing). The final norm's output is the hidden states the loss reads.
    """
    per_layer = [
        layer_activation_bytes(shape, act, moe=i >= shape.dense_layers, lora=lora)
        for i in range(shape.num_layers)
    ]
    upcast = 4 if act < 4 else 0
    final_norm = (upcast + 2 * act) * shape.hidden_size
    router = router_loss_bytes(shape, tokens)  # outside the layers: kept either way
    if not checkpointing:
        return tokens * (sum(per_layer) + final_norm) + router, 0
    # Non-reentrant checkpointing keeps each layer's input; backward re-runs one layer.
    saved = tokens * (shape.num_layers * act * shape.hidden_size + final_norm) + router
    return saved, tokens * (max(per_layer) - act * shape.hidden_size)


def _mlp_width(shape: ModelShape) -> int:
    """Width of the widest MLP activations of a token: the dense MLP, or its active experts."""
    if shape.dense_layers:
        return shape.intermediate_size
    return shape.num_experts_per_tok * shape.moe_intermediate_size


def backward_workspace_bytes(shape: ModelShape, tokens: int, act: int) -> int:
    """Gradient tensors live inside one layer's backward: the incoming and residual gradient
    of the hidden states and the MLP's gradients w.r.t. product, gate and up (``[N, I]``)."""
    width = _mlp_width(shape)
    return tokens * act * (2 * shape.hidden_size + 3 * width)


def no_grad_forward_bytes(shape: ModelShape, tokens: int, act: int) -> int:
    """Peak of a forward under ``torch.no_grad``: nothing is kept between layers, so one
    layer's largest concurrent tensors: residual, its input, and the MLP's gate, up and product."""
    width = _mlp_width(shape)
    return tokens * act * (3 * shape.hidden_size + 3 * width)


@dataclass(frozen=True)
class BodyBytes:
    """The transformer body's terms: ``saved`` activations (forward to backward),
    ``recompute`` (one checkpointed layer re-run), ``workspace`` (gradients inside one layer's
    backward), ``nograd_forward`` (the no-grad forwards: reference, KTO's KL rows)."""

    saved: int
    recompute: int
    workspace: int
    nograd_forward: int


def body_bytes(step: Step) -> BodyBytes:
    """The body terms of one step: the policy's scored tokens with grad, and (when the loss
    has a reference or KL rows) no-grad forwards of as many tokens at once."""
    shape, act, rows = step.shape, step.act, step.rows
    tokens = rows.tokens
    saved, recompute = body_activation_bytes(
        shape, tokens, act, step.activation_checkpointing, step.lora
    )
    return BodyBytes(
        saved=saved,
        recompute=recompute,
        workspace=backward_workspace_bytes(shape, tokens, act),
        nograd_forward=no_grad_forward_bytes(shape, tokens, act) if rows.has_nograd else 0,
    )
