"""Hugging Face causal LMs as the fused losses see them: body hidden states, lm_head, and
the logit transform each family's own ``forward`` applies."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def logit_transform(config) -> dict:
    """``logit_scale``/``logit_softcap`` kwargs reproducing the family's logits from its config.

    Gemma-2/3 ``final_logit_softcapping`` → softcap; Cohere ``logit_scale`` → multiplier;
    Granite ``logits_scaling`` → 1/logits_scaling; Falcon-H1 ``lm_head_multiplier`` and
    ``output_multiplier`` (where a family sets one) → multiplier.
    """
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale /= float(config.logits_scaling)
    for name in ("lm_head_multiplier", "output_multiplier"):
        if getattr(config, name, None) is not None:
            scale *= float(getattr(config, name))
    softcap = getattr(config, "final_logit_softcapping", None)
    return {"logit_scale": scale, "logit_softcap": None if softcap is None else float(softcap)}


def lm_head(model) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(
            f"{type(model).__name__} has no lm_head (get_output_embeddings() is None); load it "
            "with AutoModelForCausalLM, not AutoModel"
        )
    return head


def body(model) -> nn.Module:
    """The decoder stack without the lm_head (PEFT-wrapped models included)."""
    inner = model
    if hasattr(inner, "get_base_model"):  # peft.PeftModel
        inner = inner.get_base_model()
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if decoder is None:
        decoder = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    if decoder is None:
        raise ValueError(f"cannot find the decoder body of {type(inner).__name__}")
    return decoder


class HiddenStates(nn.Module):
    """``forward(input_ids, attention_mask) -> [B, T, H]`` final hidden states.

    Wrapping the model this way lets DDP/FSDP see a forward, while the lm_head weight is
    read directly by the fused loss — never the full logits.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = body(self.model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = lm_head(model)
    return head.weight, getattr(head, "bias", None)


@contextlib.contextmanager
def adapters_disabled(model):
    """The PEFT model with its adapter switched off: the reference policy for free."""
    with model.disable_adapter():
        yield model
