"""Model shapes: a decoder's numbers that memory depends on, read from a config or a preset."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .presets import PRESETS


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
            try:
                config = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"config_or_name {path}: not valid JSON ({err})") from None
            if not isinstance(config, dict):
                raise ValueError(
                    f"config_or_name {path}: not a model config (a JSON object expected, got "
                    f"{type(config).__name__})"
                )
            return config
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
