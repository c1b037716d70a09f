"""The embedded default: a character tokenizer, a tiny Llama-style config and a small
preference data set (one-digit addition) built in code, so training runs offline on CPU."""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict

CHARS = list("0123456789+=? ")
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


def default_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: no download, deterministic ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def tiny_config(
    tokenizer=None,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    config_class=None,
    **extra,
):
    """A small decoder config: 2 layers, MLP width ``2·hidden_size``, 64 positions.

    ``vocab_size`` defaults to ``len(tokenizer)``, and the tokenizer's pad/bos/eos ids go into
    the config; ``config_class`` (default ``LlamaConfig``) picks the family, ``extra`` any
    family-specific field. Shared by the default model, the tests and the TRL harness.

    Example:
        >>> from fastalign.trainer.default import default_tokenizer, tiny_config
        >>> tiny_config(default_tokenizer()).vocab_size
        18
    """
    if config_class is None:
        from transformers import LlamaConfig as config_class
    if tokenizer is not None:
        ids = ("pad_token_id", "bos_token_id", "eos_token_id")
        extra = {**{name: getattr(tokenizer, name) for name in ids}, **extra}
    return config_class(
        vocab_size=len(tokenizer) if vocab_size is None else vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        max_position_embeddings=64,
        **extra,
    )


def default_model(tokenizer, seed: int = 0, tie_word_embeddings: bool = False):
    """A tiny randomly initialised Llama (2 layers, hidden 64): ~0.1 M parameters.

    ``tie_word_embeddings=True`` makes lm_head.weight the embedding (tests of tied heads).
    """
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_config(tokenizer, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def default_dataset(kind: str = "paired", seed: int = 0, held_out: float = 0.2) -> DatasetDict:
    """One-digit addition: chosen answers are right, rejected ones wrong.

    ``kind="paired"``: TRL's ``prompt/chosen/rejected``; ``"unpaired"``: ``prompt/
    completion/label`` (KTO), each prompt once with its right and once with a wrong answer.
    The test split holds prompts never seen in training.
    """
    rng = random.Random(seed)
    prompts = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(prompts)
    cut = int(len(prompts) * (1 - held_out))
    splits = {}
    for name, items in (("train", prompts[:cut]), ("test", prompts[cut:])):
        rows = []
        for a, b in items:
            wrong = rng.choice([s for s in range(19) if s != a + b])
            if kind == "paired":
                rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong)})
            else:
                rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b), "label": True})
                rows.append({"prompt": f"{a}+{b}=", "completion": str(wrong), "label": False})
        splits[name] = Dataset.from_list(rows)
    return DatasetDict(splits)
