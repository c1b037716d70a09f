"""Parameter terms: weights, gradients, optimizer states, FSDP's unsharded copies, workspaces."""

from __future__ import annotations

from dataclasses import dataclass

from .step import Step

# PyTorch's default cuBLAS (and cuBLASLt) workspace per handle on Hopper-class GPUs.
CUBLAS_WORKSPACE_BYTES = 32 << 20


@dataclass(frozen=True)
class ParameterBytes:
    """Bytes per GPU that scale with the parameter count, not with the batch.

    ``weights``: the policy (fp32 master weights or the compute dtype; without FSDP plus
    autocast's half copies); ``reference_weights``: the frozen reference copy; ``gradients``
    and ``optimizer`` (AdamW states) of the trainable parameters; ``optimizer_temp``: the
    AdamW step's temporaries; ``gathered``/``gathered_grads``: FSDP's unsharded parameters
    and one layer's unsharded gradient; ``workspaces``: cuBLAS's (CUDA only).
    """

    weights: int
    reference_weights: int
    gradients: int
    optimizer: int
    optimizer_temp: int
    gathered: int
    gathered_grads: int
    workspaces: int

    @property
    def resident(self) -> int:
        """What stays allocated through forward and backward."""
        return (
            self.weights + self.reference_weights + self.optimizer + self.gathered + self.workspaces
        )


def trainable_params(step: Step) -> int:
    """Adapters only with LoRA, every parameter otherwise."""
    return step.shape.lora_params(step.lora) if step.lora else step.shape.param_counts()["total"]


def _fsdp_unsharded(step: Step) -> tuple[int, int]:
    """``(gathered, gathered_grads)``: FSDP2's unsharded parameters and layer gradient."""
    if step.sharding != "fsdp":
        return 0, 0
    shape, act = step.shape, step.act
    params = shape.param_counts()
    # Unsharded in the compute dtype: each model's root group (embedding, final norm,
    # lm_head — the loss reads both lm_heads directly), and two decoder layers of the
    # model running (the current one and the prefetched next; FSDP2 reshards after
    # forward, so the policy's layers and the reference's are not gathered together).
    root = (params["embedding"] + params["lm_head"] + shape.hidden_size) * act
    models = 2 if step.separate_reference else 1
    gathered = models * root + 2 * shape.max_layer_params() * act
    # one layer's unsharded gradient (compute dtype) and its fp32 reduce-scatter copy
    gathered_grads = shape.max_layer_params() * (act + 4) if not step.lora else 0
    return gathered, gathered_grads


def _optimizer_temp(step: Step, trainable: int) -> int:
    """AdamW temporaries: fused (CUDA default here) none; foreach one trainable-size fp32
    buffer (the denominator); single-tensor (CPU default) one largest-parameter buffer."""
    if step.adamw == "fused":
        return 0
    if step.adamw == "foreach":
        return trainable * 4 // step.shard
    largest = trainable if step.lora else max(step.head_params, step.shape.max_layer_params())
    return min(largest, trainable) * 4 // step.shard


def parameter_bytes(step: Step) -> ParameterBytes:
    """The parameter terms of one step (see :class:`ParameterBytes`)."""
    act, shard = step.act, step.shard
    total = step.shape.param_counts()["total"]
    trainable = trainable_params(step)
    frozen = total - trainable if step.lora else 0
    master = 4 if step.master_weights else act  # bytes of a trainable weight and its gradient
    weights = (trainable * master + frozen * act) // shard
    if step.master_weights and step.sharding == "none":
        weights += trainable * act  # autocast's half copies of the fp32 parameters
    gathered, gathered_grads = _fsdp_unsharded(step)
    return ParameterBytes(
        weights=weights,
        reference_weights=total * act // shard if step.separate_reference else 0,
        gradients=trainable * master // shard,
        optimizer=trainable * step.optimizer_state_bytes // shard,
        optimizer_temp=_optimizer_temp(step, trainable),
        gathered=gathered,
        gathered_grads=gathered_grads,
        workspaces=2 * CUBLAS_WORKSPACE_BYTES if step.device == "cuda" else 0,
    )
