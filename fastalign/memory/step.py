"""One training step's setup, checked once: the model shape, the scored rows, the options.

Every term function of the memory model reads a :class:`Step`; ``resolve_step`` builds it from
``estimate``'s arguments and raises ``ValueError``/``TypeError`` naming a bad one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import tiles
from ..tiles import GRAD_MODES
from .shapes import ModelShape, model_shape
from .units import dtype_bytes, positive_int

# Losses that stream a reference policy; the others score the policy rows alone (SimPO,
# ORPO and CPO read the chosen rows' NLL from the same launch).
REFERENCE_LOSSES = ("dpo", "ipo", "kto")
LOSSES = (*REFERENCE_LOSSES, "typo", "simpo", "orpo", "cpo")
SHARDINGS = ("none", "fsdp")
DEVICES = ("cuda", "cpu")
ADAMWS = ("fused", "foreach", "single")


@dataclass(frozen=True)
class ScoredRows:
    """Sequences the loss scores per micro-batch: policy rows with grad, policy rows without
    (KTO's mismatched KL rows), reference rows; ``unit_rows`` rows make one gradient unit."""

    grad_rows: int
    nograd_rows: int
    ref_rows: int
    unit_rows: int
    seq_len: int

    @property
    def tokens(self) -> int:
        return self.grad_rows * self.seq_len

    @property
    def ref_tokens(self) -> int:
        return self.ref_rows * self.seq_len

    @property
    def nograd_tokens(self) -> int:
        return self.nograd_rows * self.seq_len

    @property
    def has_nograd(self) -> bool:
        """Whether the step runs no-grad forwards (a reference, KTO's KL rows)."""
        return self.ref_rows > 0 or self.nograd_rows > 0


def scored_rows(loss: str, batch_size: int, seq_len: int, typo_samples: bool) -> ScoredRows:
    """The rows of TRL's concatenated layout: ``batch_size`` pairs (every loss but KTO; the
    gradient unit is a pair), or ``batch_size`` KTO examples (unit: one row) with a
    mismatched KL batch of the same size scored without grad. Reference-free losses score
    no reference rows; TYPO's samples add ``batch_size`` rows with grad."""
    if loss == "kto":
        return ScoredRows(batch_size, batch_size, 2 * batch_size, 1, seq_len)
    grad_rows = (3 if loss == "typo" and typo_samples else 2) * batch_size
    ref_rows = 2 * batch_size if loss in REFERENCE_LOSSES else 0
    return ScoredRows(grad_rows, 0, ref_rows, 2, seq_len)


@dataclass(frozen=True)
class Step:
    """The checked arguments of :func:`fastalign.memory.estimate`, and what follows from them."""

    name: str
    shape: ModelShape
    rows: ScoredRows
    batch_size: int
    loss: str
    world_size: int
    sharding: str
    lora: int | None
    activation_checkpointing: bool
    dtype: str
    act: int  # bytes per element of weights and activations
    master_weights: bool
    optimizer_state_bytes: int
    device: str
    adamw: str
    grad_mode: str
    cuda_kernel: str = "gemm_fold"

    @property
    def shard(self) -> int:
        """What FSDP divides weights, gradients and optimizer states by (1 without it)."""
        return self.world_size if self.sharding == "fsdp" else 1

    @property
    def head_trainable(self) -> bool:
        """Full fine-tuning trains the lm_head; LoRA freezes it (the frozen-head path)."""
        return self.lora is None

    @property
    def separate_reference(self) -> bool:
        """A frozen copy of the policy (LoRA's reference is the adapter-disabled policy)."""
        return self.rows.ref_rows > 0 and self.lora is None

    @property
    def fused_kernels(self) -> bool:
        """Whether the CUDA fused-epilogue kernels take the differentiable group: selected,
        16-bit weights and a trainable lm_head (a frozen head keeps GEMM+fold)."""
        return (
            self.device == "cuda"
            and self.cuda_kernel == "fused"
            and self.act < 4
            and self.head_trainable
        )

    @property
    def head_params(self) -> int:
        """The lm_head weight ``[V, H]`` (the embedding when tied)."""
        return self.shape.vocab_size * self.shape.hidden_size


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def resolve_step(config_or_name: Any, batch_size: int, seq_len: int, **options: Any) -> Step:
    """Check ``estimate``'s arguments (``options``: its keyword arguments) into a Step."""
    shape = model_shape(config_or_name)
    batch_size = positive_int(batch_size, "batch_size")
    seq_len = positive_int(seq_len, "seq_len")
    world_size = positive_int(options["world_size"], "world_size")
    loss = _choice(options["loss"], "loss", LOSSES)
    sharding = _choice(options["sharding"], "sharding", SHARDINGS)
    lora = options["lora"]
    if lora is not None:
        lora = positive_int(lora, "lora")
    checkpointing = _flag(options["activation_checkpointing"], "activation_checkpointing")
    device = options["device"]
    if device not in DEVICES:
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    state_bytes = positive_int(options["optimizer_state_bytes"], "optimizer_state_bytes", 0)
    adamw = options["adamw"]
    if adamw is None:
        adamw = "fused" if device == "cuda" else "single"
    if adamw not in ADAMWS:
        raise ValueError(f"adamw must be 'fused', 'foreach' or 'single', got {adamw!r}")
    grad_mode = _choice(options["grad_mode"], "grad_mode", GRAD_MODES)
    cuda_kernel = options.get("cuda_kernel")
    cuda_kernel = _choice(
        tiles.cuda_kernel() if cuda_kernel is None else cuda_kernel,
        "cuda_kernel",
        tiles.CUDA_KERNELS,
    )
    act = dtype_bytes(options["dtype"])
    master_weights = options["master_weights"]
    master_weights = _flag(act < 4 if master_weights is None else master_weights, "master_weights")
    return Step(
        name=str(config_or_name if isinstance(config_or_name, str) else shape.model_type),
        shape=shape,
        rows=scored_rows(loss, batch_size, seq_len, bool(options["typo_samples"])),
        batch_size=batch_size,
        loss=loss,
        world_size=world_size,
        sharding=sharding,
        lora=lora,
        activation_checkpointing=checkpointing,
        dtype=str(options["dtype"]).removeprefix("torch."),
        act=act,
        master_weights=master_weights,
        optimizer_state_bytes=state_bytes,
        device=device,
        adamw=adamw,
        grad_mode=grad_mode,
        cuda_kernel=cuda_kernel,
    )
