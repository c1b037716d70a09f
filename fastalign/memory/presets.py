"""Architectures by hub name (from each model's ``config.json``), so no download is needed."""

from __future__ import annotations

from typing import Any


def _decoder(model_type: str, vocab: int, hidden: int, mlp: int, layers: int, heads: int, kv: int):
    """The config fields every decoder preset has; the rest are given per model."""
    return dict(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=False,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-30B-A3B": {
        **_decoder("qwen3_moe", 151936, 2048, 6144, 48, 32, 4),
        **dict(head_dim=128, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8),
        **dict(decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False),
    },
    "Qwen/Qwen2.5-32B": _decoder("qwen2", 152064, 5120, 27648, 64, 40, 8),
    "meta-llama/Llama-3.1-8B": {
        **_decoder("llama", 128256, 4096, 14336, 32, 32, 8),
        **dict(attention_bias=False, mlp_bias=False),
    },
}
