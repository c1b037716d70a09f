"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer: decoder layers sharded one
by one, and a root module whose forward runs the *whole* loss, so the lm_head weight the
fused loss reads directly is unsharded while it is read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .model import body


class RootForward(nn.Module):
    """The FSDP root: ``root(fn, *args)`` returns ``fn(*args)`` with the root group unsharded.

    Why a root whose forward is an arbitrary function: FSDP2 all-gathers a group's parameters
    in the forward pre-hook of the module it was applied to, and between forwards the module
    holds sharded ``DTensor`` s. The fused loss reads ``lm_head.weight`` (and bias) itself
    instead of calling ``lm_head``, so that read has to happen inside a forward of the group
    holding it. Everything that is not a decoder layer (embeddings, final norm, lm_head — tied
    or not, a shared parameter is one ``FSDPParam``) lands in this root group; running body
    *and* loss in this forward means the loss sees plain unsharded tensors, autograd
    accumulates the weight gradient on the unsharded parameter, and FSDP's own post-backward
    (fired from the final backward callback, since the root's inputs — token ids — need no
    gradient) reduce-scatters it with the rest of the group. A hand-made
    ``unshard()``/``reshard()`` around the loss would have to stay unsharded until after
    backward (the loss saves the weight for its backward recompute) and bypasses the root's
    pre-forward bookkeeping (lazy init, root detection), so it is not used.
    """

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.held = nn.ModuleList(m for m in modules if m is not None)

    def forward(self, fn: Callable[..., Any], *args, **kwargs):
        return fn(*args, **kwargs)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks (``model.model.layers`` for HF decoders, PEFT included)."""
    layers = getattr(body(model), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} for FSDP")
    return list(layers)


def mixed_precision(device: torch.device, bf16: bool) -> MixedPrecisionPolicy:
    """bf16 compute copies with fp32 gradient reduction on CUDA under ``--bf16``; fp32 else
    (the sharded master parameters and the optimizer state stay fp32 either way)."""
    if device.type == "cuda" and bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: nn.Module, ref_model: nn.Module | None, mp_policy) -> RootForward:
    """Apply ``fully_shard`` bottom-up and return the root that must run each loss; the
    policy's sharded parameters become fp32 masters, the reference is stored in the compute
    dtype.

    Each decoder layer of the policy and of the frozen reference is its own group, resharded
    after forward (``True``: the reference layers have no backward, the policy layers are
    gathered again for theirs). The root holds both models, so the reference's embeddings,
    norm and lm_head are in the root group too: gathered once per step, kept (the root's
    default ``reshard_after_forward=False``) until the post-backward reshard. Activation
    checkpointing must already be on (HF checkpoints ``forward``, leaving FSDP's hooks
    outside the recompute). The optimizer must be built afterwards: ``fully_shard`` replaces
    the parameters with ``DTensor`` ones.
    """
    if ref_model is not None:  # frozen: stored in the compute dtype, no master copy needed
        ref_model.to(mp_policy.param_dtype or torch.float32)
        for layer in decoder_layers(ref_model):
            fully_shard(layer, mp_policy=mp_policy, reshard_after_forward=True)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp_policy, reshard_after_forward=True)
        # fp32 master weights (and so fp32 AdamW state) for the trainable policy, whatever
        # dtype it was loaded in (hub checkpoints load bf16): bf16 weights would round away
        # updates of lr ~1e-6. Cast per layer after sharding (FSDPModule._apply re-registers
        # the cast shards), so the full model never exists in fp32 on one rank.
        layer.to(torch.float32)
    model.to(torch.float32)  # the rest: embeddings, norm, lm_head (root group, not yet sharded)
    root = RootForward(model, ref_model)
    fully_shard(root, mp_policy=mp_policy)
    return root


def total_norm(norm: torch.Tensor) -> torch.Tensor:
    """``clip_grad_norm_`` over ``DTensor`` gradients returns a ``DTensor``: make it a plain
    (replicated, already reduced across ranks) tensor for logging."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts, gathered to CPU on rank 0 (other
    ranks get empty dicts). Collective: every rank must call it."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(
        model, optimizer, options=_FULL
    )


def load_optimizer(model: nn.Module, optimizer, state: dict) -> None:
    """Load a full, FQN-keyed optimizer state dict (every rank read it from disk) into the
    sharded optimizer; each rank keeps its own shard."""
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
