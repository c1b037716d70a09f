"""Per-GPU memory model of one preference-training step: eager full-logits loss vs fastalign.

``estimate(...)`` counts parameters from a model config and turns them, with the batch shape,
into a byte breakdown (weights, gradients, optimizer, activations, loss-side buffers, the
reference forward) and a peak over the phases of a step; ``fastalign memory`` prints it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1 << 30
PATHS = ("eager", "fused")
LOSSES = ("dpo", "ipo", "kto", "typo")
SHARDINGS = ("none", "fsdp")
_DTYPE_BYTES = {
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "float32": 4,
    "fp32": 4,
    "float": 4,
}
# Mirrors of the loss kernels' tile-size rules (``torch_backend.CHUNK_ELEMENTS``,
# ``kernels.logprob.CHUNK_ELEMENTS``/``VOCAB_ALIGN``), copied so that this module imports
# neither torch nor triton.
TORCH_CHUNK_ELEMENTS = 1 << 22
TRITON_CHUNK_ELEMENTS = 1 << 26
TRITON_VOCAB_ALIGN = 256
# PyTorch's default cuBLAS (and cuBLASLt) workspace per handle on Hopper-class GPUs.
CUBLAS_WORKSPACE_BYTES = 32 << 20

# Architectures by hub name (from each model's config.json), so no download is needed.
PRESETS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-30B-A3B": dict(
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        attention_bias=False,
    ),
    "Qwen/Qwen2.5-32B": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "meta-llama/Llama-3.1-8B": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    ),
}


# ----------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory depends on.

    MoE fields are zero for dense models. ``dense_layers`` of the ``num_layers`` use the dense
    MLP (``intermediate_size``); the others route to ``num_experts`` experts of width
    ``moe_intermediate_size`` (all experts are stored, ``num_experts_per_tok`` run per token),
    plus a shared expert where ``shared_expert_size > 0``.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_size: int = 0
    shared_expert_gate: bool = False
    dense_layers: int = 0
    model_type: str = "llama"

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.dense_layers

    def attention_params(self) -> int:
        """One layer's attention: q/k/v/o projections (GQA), biases, q/k RMSNorms."""
        h, q, kv = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        count = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            count += q + 2 * kv
        if self.o_bias:
            count += h
        if self.qk_norm:
            count += 2 * self.head_dim
        return count

    def dense_mlp_params(self, width: int | None = None) -> int:
        """A gated (SwiGLU) MLP: gate, up ``[I, H]`` and down ``[H, I]``."""
        width = self.intermediate_size if width is None else width
        count = 3 * self.hidden_size * width
        if self.mlp_bias:
            count += 2 * width + self.hidden_size
        return count

    def moe_mlp_params(self) -> int:
        """All experts (stored, whether or not active), the router, the shared expert."""
        h = self.hidden_size
        count = self.num_experts * self.dense_mlp_params(self.moe_intermediate_size)
        count += self.num_experts * h  # router
        if self.shared_expert_size:
            count += self.dense_mlp_params(self.shared_expert_size)
        if self.shared_expert_gate:
            count += h
        return count

    def layer_params(self, moe: bool) -> int:
        norms = 2 * self.hidden_size
        mlp = self.moe_mlp_params() if moe else self.dense_mlp_params()
        return self.attention_params() + mlp + norms

    def max_layer_params(self) -> int:
        return max(
            self.layer_params(moe=True) if self.moe_layers else 0,
            self.layer_params(moe=False) if self.dense_layers else 0,
        )

    def param_counts(self) -> dict[str, int]:
        """Parameters by part; ``total`` equals ``sum(p.numel())`` of the HF model."""
        v, h = self.vocab_size, self.hidden_size
        parts = {
            "embedding": v * h,
            "lm_head": 0 if self.tie_word_embeddings else v * h,
            "attention": self.num_layers * self.attention_params(),
            "mlp": self.dense_layers * self.dense_mlp_params()
            + self.moe_layers * self.moe_mlp_params(),
            "norms": (2 * self.num_layers + 1) * h,
        }
        parts["total"] = sum(parts.values())
        # Parameters a token touches (the "A3B" of a MoE name).
        active_mlp = self.dense_layers * self.dense_mlp_params() + self.moe_layers * (
            self.num_experts_per_tok * self.dense_mlp_params(self.moe_intermediate_size)
            + self.num_experts * h
            + (self.dense_mlp_params(self.shared_expert_size) if self.shared_expert_size else 0)
        )
        parts["active"] = parts["total"] - parts["mlp"] + active_mlp
        return parts

    def lora_params(self, rank: int) -> int:
        """LoRA ``A [r, in]``, ``B [out, r]`` on every attention projection and dense/shared MLP
        projection (routed experts are 3-D parameters that ``target_modules`` does not match)."""
        h, q, kv = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        attention = rank * ((h + q) + 2 * (h + kv) + (q + h))
        dense = 3 * rank * (h + self.intermediate_size)
        shared = 3 * rank * (h + self.shared_expert_size) if self.shared_expert_size else 0
        per_layer_mlp = self.dense_layers * dense + self.moe_layers * shared
        return self.num_layers * attention + per_layer_mlp


def _as_dict(config_or_name: Any) -> dict[str, Any]:
    if isinstance(config_or_name, dict):
        return dict(config_or_name)
    if isinstance(config_or_name, (str, Path)):
        name = str(config_or_name)
        if name in PRESETS:
            return dict(PRESETS[name])
        path = Path(name)
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            return json.loads(path.read_text())
        raise ValueError(
            f"config_or_name {name!r} is neither a preset ({', '.join(PRESETS)}) nor a "
            "config.json / model directory"
        )
    if hasattr(config_or_name, "to_dict"):  # transformers.PretrainedConfig
        return config_or_name.to_dict()
    raise TypeError(
        "config_or_name must be a transformers.PretrainedConfig, a dict, a path or a preset "
        f"name, got {type(config_or_name).__name__}"
    )


def model_shape(config_or_name: Any) -> ModelShape:
    """Read a :class:`ModelShape` from a config, a dict, a ``config.json`` path or a preset."""
    cfg = _as_dict(config_or_name)
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers: the language model
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", "")}
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if not cfg.get(k)]
    if missing:
        raise ValueError(f"config_or_name lacks {', '.join(missing)}")
    model_type = str(cfg.get("model_type") or "llama")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if num_experts:
        step = int(cfg.get("decoder_sparse_step") or 1)
        only_dense = set(cfg.get("mlp_only_layers") or [])
        moe = [i not in only_dense and (i + 1) % step == 0 for i in range(layers)]
        dense_layers = layers - sum(moe)
    else:
        dense_layers = layers
    qkv_bias = bool(cfg.get("attention_bias", False) or cfg.get("qkv_bias", False))
    if model_type in ("qwen2", "qwen2_moe") and "qkv_bias" not in cfg:
        qkv_bias = True  # Qwen2's q/k/v projections always carry a bias
    return ModelShape(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        # Llama-style attention_bias covers o_proj too; Qwen2's qkv bias does not.
        o_bias=bool(cfg.get("attention_bias", False)) and model_type not in ("qwen2", "qwen2_moe"),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type.startswith("qwen3"),
        num_experts=num_experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0) if num_experts else 0,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0) if num_experts else 0,
        shared_expert_size=int(cfg.get("shared_expert_intermediate_size") or 0)
        if num_experts
        else 0,
        shared_expert_gate=bool(cfg.get("shared_expert_intermediate_size")) and num_experts > 0,
        dense_layers=dense_layers,
        model_type=model_type,
    )


def count_parameters(config_or_name: Any) -> dict[str, int]:
    """Parameter counts by part (``embedding``, ``lm_head``, ``attention``, ``mlp``, ``norms``,
    ``total``, ``active``) of a config, a ``config.json`` path or a preset name.

    Example:
        >>> round(count_parameters("Qwen/Qwen3-30B-A3B")["total"] / 1e9, 1)
        30.5
    """
    return model_shape(config_or_name).param_counts()


# ----------------------------------------------------------------------------- result types
@dataclass
class PathBreakdown:
    """Bytes per GPU for one loss path. ``parts`` are the live sizes of each kind of tensor;
    ``phases`` the live total at each phase of the step; ``peak`` the largest phase.

    Parts do not all coexist (activations are freed as gradients appear), so ``peak`` is
    smaller than ``sum(parts.values())``.
    """

    parts: dict[str, int]
    phases: dict[str, int]

    @property
    def peak(self) -> int:
        return max(self.phases.values())


@dataclass
class MemoryEstimate:
    """Result of :func:`estimate`: both paths, the setup and the assumptions made."""

    model: str
    params: dict[str, int]
    trainable_params: int
    setup: dict[str, Any]
    eager: PathBreakdown
    fused: PathBreakdown
    assumptions: list[str] = field(default_factory=list)

    def path(self, path: str) -> PathBreakdown:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        return getattr(self, path)

    def total(self, path: str = "fused") -> int:
        """Peak bytes per GPU of one training step on ``path`` ("eager" or "fused")."""
        return self.path(path).peak

    def fits(self, gpu_bytes: int | float | str, path: str = "fused") -> bool:
        """Whether ``path``'s peak fits in ``gpu_bytes`` (an int or a size like ``"80GB"``)."""
        return self.total(path) <= parse_bytes(gpu_bytes, "gpu_bytes")

    def format_table(self, gpu_bytes: int | float | str | None = None) -> str:
        """An aligned table in GiB: every part and phase, eager beside fused, and their ratio."""
        s = self.setup
        title = (
            f"{self.model}: {self.params['total'] / 1e9:.2f} B params "
            f"({self.trainable_params / 1e9:.3g} B trainable), loss={s['loss']}, "
            f"micro-batch {s['batch_size']} x seq {s['seq_len']}, "
            f"{s['world_size']} GPU(s) sharding={s['sharding']}, dtype={s['dtype']}, "
            f"activation checkpointing={'on' if s['activation_checkpointing'] else 'off'}"
            + (f", LoRA r={s['lora']}" if s["lora"] else "")
        )
        rows: list[tuple[str, str, str, str]] = [("per GPU [GiB]", "eager", "fused", "eager/fused")]

        def add(label: str, eager: int, fused: int) -> None:
            ratio = f"{eager / fused:.2f}x" if fused else ("-" if not eager else "inf")
            rows.append((label, f"{eager / GIB:.2f}", f"{fused / GIB:.2f}", ratio))

        for key in self.eager.parts:
            add(key.replace("_", " "), self.eager.parts[key], self.fused.parts[key])
        rows.append(("", "", "", ""))
        for key in self.eager.phases:
            add(f"phase: {key}", self.eager.phases[key], self.fused.phases[key])
        rows.append(("", "", "", ""))
        add("PEAK", self.eager.peak, self.fused.peak)
        if gpu_bytes is not None:
            limit = parse_bytes(gpu_bytes, "gpu_bytes")
            verdict = ["fits" if self.fits(limit, p) else "OUT OF MEMORY" for p in PATHS]
            rows.append((f"fits in {limit / GIB:.1f} GiB", *verdict, ""))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [title]
        for i, r in enumerate(rows):
            line = r[0].ljust(widths[0]) + "".join(
                "  " + c.rjust(w) for c, w in zip(r[1:], widths[1:])
            )
            lines.append(line.rstrip())
            if i == 0:
                lines.append("-" * len(line))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "setup": self.setup,
            "eager": {
                "parts": self.eager.parts,
                "phases": self.eager.phases,
                "peak": self.eager.peak,
            },
            "fused": {
                "parts": self.fused.parts,
                "phases": self.fused.phases,
                "peak": self.fused.peak,
            },
            "assumptions": self.assumptions,
        }


# ----------------------------------------------------------------------------- arguments
def parse_bytes(value: int | float | str, name: str = "gpu_memory") -> int:
    """``80GB``/``80GiB``/``80G`` → 80·2³⁰ (GPU "GB" are GiB), ``512MB`` → 512·2²⁰, ints as is."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a byte count or a size string, got bool")
    if isinstance(value, (int, float)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
        return int(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a byte count or a size string, got {type(value).__name__}")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", value, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{name} must look like '80GB' or '81920MiB', got {value!r}")
    scale = 1 << (10 * " KMGT".index(match.group(2).upper() or " "))
    return int(float(match.group(1)) * scale)


def dtype_bytes(dtype: Any, name: str = "dtype") -> int:
    """Bytes per element of ``"bfloat16"``/``"bf16"``/``"float32"``/... or a ``torch.dtype``."""
    key = str(dtype).removeprefix("torch.").lower() if not isinstance(dtype, str) else dtype.lower()
    if not isinstance(dtype, str) and not hasattr(dtype, "is_floating_point"):
        raise TypeError(f"{name} must be a dtype name or torch.dtype, got {type(dtype).__name__}")
    if key not in _DTYPE_BYTES:
        raise ValueError(f"{name} must be one of bfloat16, float16, float32, got {dtype!r}")
    return _DTYPE_BYTES[key]


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# ----------------------------------------------------------------------------- activations
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
    if not checkpointing:
        return tokens * (sum(per_layer) + final_norm), 0
    # Non-reentrant checkpointing keeps each layer's input; backward re-runs one layer.
    saved = tokens * (shape.num_layers * act * shape.hidden_size + final_norm)
    return saved, tokens * (max(per_layer) - act * shape.hidden_size)


def backward_workspace_bytes(shape: ModelShape, tokens: int, act: int) -> int:
    """Gradient tensors live inside one layer's backward: the incoming and residual gradient
    of the hidden states and the MLP's gradients w.r.t. product, gate and up (``[N, I]``)."""
    width = (
        shape.intermediate_size
        if shape.dense_layers
        else shape.num_experts_per_tok * shape.moe_intermediate_size
    )
    return tokens * act * (2 * shape.hidden_size + 3 * width)


def no_grad_forward_bytes(shape: ModelShape, tokens: int, act: int) -> int:
    """Peak of a forward under ``torch.no_grad``: nothing is kept between layers, so one
    layer's largest concurrent tensors: residual, its input, and the MLP's gate, up and product."""
    width = (
        shape.intermediate_size
        if shape.dense_layers
        else shape.num_experts_per_tok * shape.moe_intermediate_size
    )
    return tokens * act * (3 * shape.hidden_size + 3 * width)


# ----------------------------------------------------------------------------- loss side
def eager_loss_bytes(rows_tokens: int, vocab: int, act: int) -> dict[str, int]:
    """The ``[N, V]`` tensors of TRL's ``concatenated_forward`` for N policy tokens.

    forward: lm_head logits in the model dtype, their fp32 upcast (half dtypes only; the
    ``.float()`` input of ``log_softmax``, freed after it), the fp32 ``log_softmax`` output
    (saved for backward). backward: ``gather``'s fp32 gradient (a zeroed ``[N, V]``), the
    fp32 ``log_softmax`` gradient, then the logits gradient in the model dtype.
    """
    nv = rows_tokens * vocab
    upcast = 4 if act < 4 else 0
    return {
        # while log_softmax runs: logits + fp32 upcast + fp32 output
        "forward": nv * (act + upcast + 4),
        # kept to backward: the fp32 log_softmax output
        "saved": nv * 4,
        # log_softmax backward: saved output + gather grad + its grad
        "backward": nv * 12,
        # after it: fp32 grad + its cast to the logits dtype (fp32: the same tensor)
        "backward_cast": nv * (4 + (act if act < 4 else 0)),
    }


def fused_tile_bytes(vocab: int, hidden: int, act: int, num_rows: int) -> int:
    """The torch backend's bounded ``[chunk, V]`` working set: the matmul's ``[C, V]`` in the
    model dtype and its fp32 copy (dz formed in place), and the chunk's gathered rows."""
    rows = min(max(8, TORCH_CHUNK_ELEMENTS // vocab), num_rows)
    return rows * vocab * (4 + (act if act < 4 else 0)) + rows * hidden * (4 + act)


def triton_chunk_bytes(num_rows: int, vocab: int, act: int, half_copy: bool) -> int:
    """The Triton backend's ``[R, C]`` vocab chunk: the GEMM's fp32 logits, plus (when
    ``half_copy``) the ``dz`` or ``p`` the fold writes in a half model dtype."""
    width = TRITON_CHUNK_ELEMENTS // max(num_rows, 1) // TRITON_VOCAB_ALIGN * TRITON_VOCAB_ALIGN
    width = min(vocab, max(TRITON_VOCAB_ALIGN, width))
    return num_rows * width * (4 + (act if half_copy and act < 4 else 0))


# ----------------------------------------------------------------------------- the estimate
def estimate(
    config_or_name: Any,
    batch_size: int,
    seq_len: int,
    loss: str = "dpo",
    world_size: int = 1,
    sharding: str = "none",
    lora: int | None = None,
    activation_checkpointing: bool = False,
    dtype: Any = "bfloat16",
    *,
    master_weights: bool | None = None,
    optimizer_state_bytes: int = 8,
    typo_samples: bool = False,
    device: str = "cuda",
    adamw: str | None = None,
) -> MemoryEstimate:
    """Per-GPU memory of one preference-training step, eager full-logits loss vs fused.

    The step: policy forward (with autograd), reference forward (no grad, a frozen copy —
    or with ``lora`` the policy with its adapter disabled), the loss, backward, AdamW step.
    Every figure is bytes on one GPU.

    Args:
        config_or_name: a ``transformers.PretrainedConfig``, a config dict, a path to a
            ``config.json`` or model directory, or a preset name (``PRESETS``).
        batch_size: per-GPU micro-batch: preference pairs for ``dpo``/``ipo``/``typo``
            (``2·batch_size`` sequences, TRL's concatenated layout), examples for ``kto``
            (plus a mismatched KL batch of the same size, scored without grad).
        seq_len: tokens per sequence (prompt + completion, all counted as scored).
        loss: ``"dpo"``, ``"ipo"``, ``"kto"`` stream a reference; ``"typo"`` is
            reference-free (``typo_samples=True`` adds its ``batch_size`` sampled rows).
        world_size: GPUs; with ``sharding="fsdp"`` weights, gradients and optimizer states
            are divided by it.
        sharding: ``"none"`` (single GPU or DDP: everything replicated) or ``"fsdp"``
            (FSDP2 full shard: each decoder layer all-gathered for its forward and backward
            with the next one prefetched, i.e. two unsharded layers live; the root module —
            embedding, final norm, lm_head — stays unsharded through the step because the
            loss reads the lm_head weight directly; one layer's unsharded gradient and its
            fp32 reduce-scatter copy live in backward).
        lora: LoRA rank, or ``None`` for full fine-tuning. Only adapters get gradients and
            optimizer states; the base model (and the lm_head) is frozen, so the fused loss
            takes its frozen-head path with its fp32 ``[M, H]`` E buffer.
        activation_checkpointing: keep only each decoder layer's input; recompute one layer
            at a time in backward.
        dtype: weights/activations dtype (``"bfloat16"``, ``"float16"``, ``"float32"``).
        master_weights: keep trainable parameters and their gradients in fp32 (FSDP2
            ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` on fp32 shards;
            without FSDP, fp32 params plus their bf16 autocast copies). Default: True for
            half dtypes. False: parameters and gradients in ``dtype``.
        optimizer_state_bytes: AdamW bytes per trainable parameter (8: fp32 ``exp_avg`` and
            ``exp_avg_sq``; ``torch.optim.AdamW`` on bf16 parameters keeps them in bf16: 4).
        typo_samples: TYPO with reference samples (a third ``batch_size`` of rows with grad).
        device: ``"cuda"`` (Triton backend tiles) or ``"cpu"`` (chunked torch backend tiles).
        adamw: the AdamW implementation, for its step's temporaries: ``"fused"`` (none;
            default on CUDA: ``torch.optim.AdamW(fused=True)``), ``"foreach"`` (an fp32
            buffer the size of the trainable shard) or ``"single"`` (one largest-parameter
            buffer; torch's default on CPU).

    Returns:
        :class:`MemoryEstimate` with ``.eager`` and ``.fused`` :class:`PathBreakdown`,
        ``.total(path)``, ``.fits(gpu_bytes, path)`` and ``.format_table()``.

    Example:
        >>> est = estimate("Qwen/Qwen3-30B-A3B", batch_size=1, seq_len=4096, loss="dpo",
        ...                world_size=8, sharding="fsdp", activation_checkpointing=True)
        >>> est.total("fused") < est.total("eager")
        True
        >>> print(est.format_table("80GB"))  # doctest: +SKIP
    """
    shape = model_shape(config_or_name)
    name = config_or_name if isinstance(config_or_name, str) else shape.model_type
    batch_size = _positive_int(batch_size, "batch_size")
    seq_len = _positive_int(seq_len, "seq_len")
    world_size = _positive_int(world_size, "world_size")
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(sharding, str) or sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    if lora is not None:
        lora = _positive_int(lora, "lora")
    if not isinstance(activation_checkpointing, bool):
        raise TypeError(
            "activation_checkpointing must be a bool, got "
            f"{type(activation_checkpointing).__name__}"
        )
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    optimizer_state_bytes = _positive_int(optimizer_state_bytes, "optimizer_state_bytes", 0)
    if adamw is None:
        adamw = "fused" if device == "cuda" else "single"
    if adamw not in ("fused", "foreach", "single"):
        raise ValueError(f"adamw must be 'fused', 'foreach' or 'single', got {adamw!r}")
    act = dtype_bytes(dtype)
    if master_weights is None:
        master_weights = act < 4
    if not isinstance(master_weights, bool):
        raise TypeError(f"master_weights must be a bool, got {type(master_weights).__name__}")

    params = shape.param_counts()
    total_params = params["total"]
    trainable = shape.lora_params(lora) if lora else total_params
    frozen = total_params - trainable if lora else 0
    shard = world_size if sharding == "fsdp" else 1
    v, h = shape.vocab_size, shape.hidden_size
    head_params = v * h  # the lm_head weight (the embedding when tied)

    # ---- rows scored by the loss: policy rows with grad, no-grad rows, reference rows.
    if loss == "kto":
        grad_rows, policy_nograd_rows, ref_rows = batch_size, batch_size, 2 * batch_size
    elif loss == "typo":
        grad_rows = (3 if typo_samples else 2) * batch_size
        policy_nograd_rows, ref_rows = 0, 0
    else:
        grad_rows, policy_nograd_rows, ref_rows = 2 * batch_size, 0, 2 * batch_size
    tokens = grad_rows * seq_len
    ref_tokens = ref_rows * seq_len
    nograd_tokens = policy_nograd_rows * seq_len
    separate_reference = ref_rows > 0 and not lora

    # ---- static: parameters, gradients, optimizer states (sharded by FSDP).
    trainable_bytes = 4 if master_weights else act
    weights = (trainable * trainable_bytes + frozen * act) // shard
    if master_weights and sharding == "none":
        weights += trainable * act  # autocast's half copies of the fp32 parameters
    reference_weights = total_params * act // shard if separate_reference else 0
    grad_bytes = 4 if master_weights else act
    gradients = trainable * grad_bytes // shard
    optimizer = trainable * optimizer_state_bytes // shard
    gathered = gathered_grads = 0
    if sharding == "fsdp":
        # Unsharded in the compute dtype: each model's root group (embedding, final norm,
        # lm_head — the loss reads both lm_heads directly), and two decoder layers of the
        # model running (the current one and the prefetched next; FSDP2 reshards after
        # forward, so the policy's layers and the reference's are not gathered together).
        root = (params["embedding"] + params["lm_head"] + h) * act
        gathered = (2 if separate_reference else 1) * root + 2 * shape.max_layer_params() * act
        if not lora:
            # one layer's unsharded gradient (compute dtype) and its fp32 reduce-scatter copy
            gathered_grads = shape.max_layer_params() * (act + 4)
    # AdamW temporaries: fused (CUDA default here) none; foreach one trainable-size fp32
    # buffer (the denominator); single-tensor (CPU default) one largest-parameter buffer.
    largest_param = max(head_params, shape.max_layer_params()) if not lora else trainable
    optimizer_temp = {
        "fused": 0,
        "foreach": trainable * 4 // shard,
        "single": min(largest_param, trainable) * 4 // (shard if sharding == "fsdp" else 1),
    }[adamw]

    # ---- body activations (policy with grad), no-grad forwards (reference, KTO's KL rows).
    saved, recompute = body_activation_bytes(shape, tokens, act, activation_checkpointing, lora)
    workspace = backward_workspace_bytes(shape, tokens, act)
    # No-grad forwards (reference; KTO's policy KL rows) each cover `tokens` tokens at once.
    has_nograd = ref_rows > 0 or nograd_tokens > 0
    nograd_forward = no_grad_forward_bytes(shape, tokens, act) if has_nograd else 0

    # lm_head gradient: the full [V, H] (the loss reads the unsharded weight) while the
    # loss backward runs; full fine-tuning only.
    head_trainable = lora is None

    # CUDA: PyTorch's cuBLAS and cuBLASLt workspaces, 32 MiB each by default on Hopper and
    # newer, come from the caching allocator and stay allocated once the first GEMM ran.
    workspaces = 2 * CUBLAS_WORKSPACE_BYTES if device == "cuda" else 0

    def phases(loss_forward: int, loss_backward: int, after_loss: int) -> dict[str, int]:
        static = weights + reference_weights + optimizer + gathered + workspaces
        return {
            "forward + reference": static + saved + loss_forward,
            "loss backward": static + gathered_grads + saved + loss_backward,
            "body backward": static + gathered_grads + saved + recompute + workspace + after_loss,
            "optimizer step": weights
            + reference_weights
            + optimizer
            + gradients
            + optimizer_temp
            + workspaces,
        }

    # ---- eager: full [N, V] tensors for every scored row.
    eager_policy = eager_loss_bytes(tokens, v, act)
    # a no-grad stream's logits (the reference, KTO's KL rows), transient beside the
    # policy's saved log_softmax output
    no_grad_logits = eager_loss_bytes(tokens, v, act)["forward"] if has_nograd else 0
    head_grad_eager = head_params * act if head_trainable else 0
    grad_hidden = tokens * h * act
    eager_forward = max(
        eager_policy["forward"],
        eager_policy["saved"] + no_grad_logits + nograd_forward,
    )
    eager_backward = max(
        eager_policy["backward"], eager_policy["backward_cast"] + grad_hidden + head_grad_eager
    )
    eager_parts = {
        "weights": weights,
        "reference weights": reference_weights,
        "gradients": gradients,
        "optimizer states": optimizer,
        "fsdp unsharded": gathered + gathered_grads,
        "activations": saved + recompute,
        "loss buffers": max(eager_forward, eager_backward),
        "reference forward": nograd_forward,
        "cuBLAS workspaces": workspaces,
    }
    eager = PathBreakdown(
        parts=eager_parts,
        phases=phases(eager_forward, eager_backward, grad_hidden + head_grad_eager),
    )

    # ---- fused: O(N) scalars, bounded tiles, hidden-state inputs, [M, H] accumulators.
    all_tokens = tokens + ref_tokens + nograd_tokens
    # per scored token: logp, lse (fp32), targets, offsets, ids, positions (int64), and the
    # fp64 per-sequence grid; padded layout assumed (no index tensors for cu_seqlens).
    scalars = all_tokens * (2 * 4 + 4 * 8 + 8)
    # hidden states the loss reads besides the policy's own (saved activations): the
    # reference's and KTO's KL rows (policy and reference)
    extra_hidden = (ref_tokens + nograd_tokens) * h * act
    frozen_head = lora is not None
    head_grad = head_params * act if head_trainable else 0  # written once, in the weight dtype
    grad_rows_fp32 = tokens * h * 4
    grad_rows_cast = tokens * h * act if act < 4 else 0
    if device == "cuda":
        # Triton backend: streams sharing an lm_head are stacked (their rows gathered into
        # one [R, H] copy) and scored vocab chunk by vocab chunk; a frozen head's policy is
        # its own group and also keeps the fp32 [M, H] E plus one [M, H] fp32 GEMM product.
        if frozen_head:
            groups = [(tokens, True), (nograd_tokens + ref_tokens, False)]
        elif separate_reference:
            groups = [(tokens + nograd_tokens, False), (ref_tokens, False)]
        else:
            groups = [(tokens + nograd_tokens + ref_tokens, False)]
        fused_forward = scalars + extra_hidden + nograd_forward
        fused_forward += max(
            rows * h * act
            + rows * 3 * 4
            + triton_chunk_bytes(rows, v, act, half_copy=probs)
            + (2 * rows * h * 4 if probs else 0)
            for rows, probs in groups
            if rows
        )
        expectation = tokens * h * 4 if frozen_head else 0
        after_loop = grad_rows_fp32 + grad_rows_cast + grad_hidden
        if frozen_head:
            # backward from E: W[y_t] gathered in fp32 becomes grad_rows; no recompute
            fused_backward = scalars + expectation + after_loop
        else:
            # the vocab-chunk loop: gathered rows, the chunk (fp32 logits + dz), the fp32
            # grad_rows and one fp32 [M, H] GEMM product added into it, the lm_head gradient;
            # then ops writes grad_hidden (zeros, model dtype) from grad_rows' cast.
            in_loop = tokens * h * act + 2 * grad_rows_fp32 + head_grad
            in_loop += triton_chunk_bytes(tokens, v, act, half_copy=True)
            fused_backward = scalars + max(in_loop, after_loop + head_grad)
    else:
        # torch backend: one [chunk, V] tile per stream in turn; fp32 accumulators.
        tile = fused_tile_bytes(v, h, act, tokens)
        expectation = tokens * h * 4 if frozen_head else 0
        fused_forward = scalars + extra_hidden + tile + expectation + nograd_forward
        head_grad_fp32 = head_params * 4 if head_trainable else 0
        fused_backward = max(
            scalars + expectation + grad_rows_fp32 + head_grad_fp32 + (0 if frozen_head else tile),
            scalars + expectation + grad_rows_fp32 + grad_rows_cast + grad_hidden + head_grad_fp32,
        )
        # the cast [V, H] beside the fp32 accumulator at the end
        fused_backward += head_params * act if head_trainable and act < 4 else 0
    fused_parts = dict(eager_parts)
    fused_parts["loss buffers"] = max(fused_forward - nograd_forward, fused_backward)
    fused = PathBreakdown(
        parts=fused_parts,
        phases=phases(
            fused_forward, fused_backward, grad_hidden + head_params * act * head_trainable
        ),
    )

    assumptions = [
        "every token of every sequence is scored (prompt tokens cost the eager path the same)",
        "SDPA flash/memory-efficient attention (no padding mask): no T x T scores are kept",
        (
            "trainable params and grads in fp32 (master weights), AdamW states "
            f"{optimizer_state_bytes} B/param"
            if master_weights
            else f"params and grads in {dtype}, AdamW states {optimizer_state_bytes} B/param"
        ),
        "gradients are set to None before each step (zero_grad default) and appear during "
        "backward while activations are freed; the peak is the largest phase",
    ]
    assumptions.append(f"AdamW implementation: {adamw}")
    if sharding == "fsdp":
        assumptions.append(
            "FSDP2 full shard: 2 unsharded decoder layers (current + prefetched), the unsharded "
            "root (embedding, lm_head) of policy and reference, one unsharded layer gradient "
            "(+ its fp32 reduce-scatter copy)"
        )
    if device == "cuda":
        assumptions.append(
            "not counted: CUDA context, NCCL buffers and caching-allocator fragmentation "
            "(keep ~5-10% headroom)"
        )
    if lora:
        assumptions.append(
            f"LoRA r={lora} on attention and dense/shared MLP projections; reference = the "
            "policy with its adapter disabled (no second copy)"
        )
    if ref_rows and not lora:
        assumptions.append("reference: a frozen copy of the policy in the compute dtype")
    setup = dict(
        batch_size=batch_size,
        seq_len=seq_len,
        loss=loss,
        world_size=world_size,
        sharding=sharding,
        lora=lora,
        activation_checkpointing=activation_checkpointing,
        dtype=str(dtype).removeprefix("torch."),
        master_weights=master_weights,
        optimizer_state_bytes=optimizer_state_bytes,
        device=device,
        adamw=adamw,
        policy_tokens=tokens,
        reference_tokens=ref_tokens,
        nograd_policy_tokens=nograd_tokens,
    )
    return MemoryEstimate(
        model=str(name),
        params=params,
        trainable_params=trainable,
        setup=setup,
        eager=eager,
        fused=fused,
        assumptions=assumptions,
    )


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fastalign memory`` options (shared by this module's parser and ``fastalign.cli``)."""
    p.add_argument("model", help="preset name (" + ", ".join(PRESETS) + "), config.json or dir")
    p.add_argument("--batch-size", type=int, required=True, help="per-GPU micro-batch")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    p.add_argument("--loss", choices=LOSSES, default="dpo")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--sharding", choices=SHARDINGS, default="none")
    p.add_argument("--lora", type=int, default=None, metavar="RANK")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.add_argument(
        "--no-master-weights",
        action="store_true",
        help="params and grads in --dtype (default for half dtypes: fp32 master weights)",
    )
    p.add_argument("--gpu-memory", default="80GB", help="per-GPU memory, e.g. 80GB (GiB)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    """Estimate from parsed ``fastalign memory`` arguments and print the table."""
    try:
        est = estimate(
            args.model,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            loss=args.loss,
            world_size=args.world_size,
            sharding=args.sharding,
            lora=args.lora,
            activation_checkpointing=args.activation_checkpointing,
            dtype=args.dtype,
            master_weights=False if args.no_master_weights else None,
        )
        limit = parse_bytes(args.gpu_memory, "--gpu-memory")
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    print(est.format_table(limit))
    for path in PATHS:
        verdict = "fits" if est.fits(limit, path) else "does NOT fit"
        peak = est.total(path) / GIB
        print(f"{path}: peak {peak:.2f} GiB per GPU, {verdict} in {limit / GIB:.1f} GiB")
    print("assumptions:\n  " + "\n  ".join(est.assumptions))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``python -m fastalign.memory MODEL --batch-size B --seq-len T ...``."""
    parser = argparse.ArgumentParser(
        prog="fastalign memory",
        description="Per-GPU memory of a preference-training step: eager logits vs fused.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = [
    "PRESETS",
    "MemoryEstimate",
    "ModelShape",
    "PathBreakdown",
    "count_parameters",
    "estimate",
    "model_shape",
    "parse_bytes",
]

if __name__ == "__main__":
    raise SystemExit(cli())
