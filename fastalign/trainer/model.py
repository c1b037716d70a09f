"""Hugging Face causal LMs as the fused losses see them: body hidden states (padded or
packed), lm_head, and the logit transform each family's own ``forward`` applies."""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from torch import nn

# How a packed row ``[1, N]`` is kept from attending across sequences (see prepare_packing):
#   "varlen":    flash-attn varlen kernels, given cu_seqlens directly;
#   "positions": transformers' own detection of restarting position_ids (masking_utils builds
#                the block-diagonal causal mask when attention_mask is None);
#   "mask":      a 4-D block-diagonal causal mask built here (sdpa: bool, eager: additive).
PACKED_ATTENTION = ("varlen", "positions", "mask")


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


def block_causal_mask(
    cu_seqlens: torch.Tensor, *, additive_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The ``[1, 1, N, N]`` causal mask of a packed row, block-diagonal over its sequences.

    ``cu_seqlens`` int ``[B + 1]``. Bool (True = attend, what SDPA takes) by default; with
    ``additive_dtype``, 0 where attending and that dtype's minimum elsewhere (eager attention).

    Example:
        >>> block_causal_mask(torch.tensor([0, 2, 3]))[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    cu = cu_seqlens.long()
    num_total = int(cu[-1])
    positions = torch.arange(num_total, device=cu.device)
    seq_ids = torch.searchsorted(cu[1:], positions, right=True)  # [N]
    allowed = (seq_ids[:, None] == seq_ids[None, :]) & (positions[:, None] >= positions[None, :])
    allowed = allowed[None, None]  # [1, 1, N, N]
    if additive_dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=additive_dtype, device=cu.device)
    return mask.masked_fill_(~allowed, torch.finfo(additive_dtype).min)


class HiddenStates(nn.Module):
    """Final hidden states of the body: padded ``[B, T, H]`` or packed ``[N, H]``.

    Padded: ``forward(input_ids [B, T], attention_mask [B, T])``. Packed (``packed_attention``
    set, see :func:`prepare_packing`): ``forward(input_ids [1, N], position_ids=[1, N],
    cu_seqlens=int32 [B + 1])`` with position_ids restarting at 0 for each sequence; every
    token attends only within its own sequence. Wrapping the model this way lets DDP/FSDP
    see a forward, while the lm_head weight is read directly by the fused loss — never the
    full logits.
    """

    def __init__(self, model: nn.Module, packed_attention: str | None = None):
        super().__init__()
        if packed_attention is not None and packed_attention not in PACKED_ATTENTION:
            raise ValueError(
                f"packed_attention must be one of {PACKED_ATTENTION} or None, got "
                f"{packed_attention!r}"
            )
        self.model = model
        self.packed_attention = packed_attention

    def forward(self, input_ids, attention_mask=None, position_ids=None, cu_seqlens=None):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if cu_seqlens is not None:
            if self.packed_attention is None:
                raise ValueError(
                    "cu_seqlens was given but this HiddenStates has packed_attention=None; "
                    "build it with the mode prepare_packing(model) returns"
                )
            if attention_mask is not None or position_ids is None:
                raise ValueError(
                    "packed input takes position_ids (restarting at 0 per sequence) and no "
                    "attention_mask"
                )
            kwargs["position_ids"] = position_ids
            kwargs.update(_packed_attention_kwargs(self.packed_attention, cu_seqlens, self.model))
        out = body(self.model)(**kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden if cu_seqlens is None else hidden[0]  # [B, T, H] or [N, H]


def _packed_attention_kwargs(mode: str, cu_seqlens: torch.Tensor, model) -> dict:
    if mode == "varlen":
        # transformers' flash path takes cu_seqlens as-is (no inference from position_ids).
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu = cu_seqlens.to(torch.int32)
        return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    if mode == "mask":
        eager = _attn_implementation(model) == "eager"
        dtype = next(model.parameters()).dtype if eager else None
        return {"attention_mask": block_causal_mask(cu_seqlens, additive_dtype=dtype)}
    return {}  # "positions": transformers derives the block-diagonal mask itself


def _attn_implementation(model) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@torch.no_grad()
def _packing_is_exact(model, mode: str) -> bool:
    """Whether a packed row of two short sequences gives each sequence's own hidden states."""
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    lengths = (3, 2)
    ids = (torch.arange(sum(lengths), device=device) * 7 + 3) % vocab
    hidden_states = HiddenStates(model, mode)
    was_training = model.training
    model.eval()  # no dropout in the probe
    try:
        packed = hidden_states(
            ids[None],
            position_ids=torch.cat([torch.arange(n, device=device) for n in lengths])[None],
            cu_seqlens=torch.tensor(
                [0, lengths[0], sum(lengths)], dtype=torch.int32, device=device
            ),
        )  # [N, H]
        alone = torch.cat(
            [
                hidden_states(
                    part[None], torch.ones(1, part.numel(), dtype=torch.long, device=device)
                )[0]
                for part in ids.split(lengths)
            ]
        )  # [N, H]
    finally:
        model.train(was_training)
    tol = 1e-4 if packed.dtype == torch.float32 else 3e-2
    return torch.allclose(packed.float(), alone.float(), rtol=tol, atol=tol)


def prepare_packing(model, *, prefer_flash: bool = True) -> str:
    """Make ``model`` attend only within each sequence of a packed row; return the mode.

    On CUDA with ``flash_attn`` importable (and ``prefer_flash``) the model is switched to
    ``attn_implementation="flash_attention_2"`` and gets cu_seqlens directly ("varlen").
    Otherwise (SDPA, eager) transformers' detection of restarting ``position_ids`` is used
    when a two-sequence probe shows it gives a block-diagonal mask ("positions"), else a
    4-D block-diagonal causal mask built here ("mask"). Raises ValueError naming
    ``packing`` when neither keeps the sequences apart.
    """
    device = next(model.parameters()).device
    implementation = _attn_implementation(model)
    if device.type == "cuda" and implementation in ("flash_attention_2", "flash_attention_3"):
        return "varlen"
    if device.type == "cuda" and prefer_flash and _flash_attn_available():
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        target.set_attn_implementation("flash_attention_2")
        if _attn_implementation(model) == "flash_attention_2":
            return "varlen"
        implementation = _attn_implementation(model)
    modes = ("positions", "mask") if implementation in ("sdpa", "eager") else ("positions",)
    for mode in modes:
        if _packing_is_exact(model, mode):
            return mode
    raise ValueError(
        f"packing=True: {type(model).__name__} with attn_implementation={implementation!r} "
        "lets packed sequences attend to each other (neither restarting position_ids nor a 4-D "
        "block-diagonal mask separates them); load it with attn_implementation='sdpa', "
        "'eager' or 'flash_attention_2', or train without --packing"
    )


def head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = lm_head(model)
    return head.weight, getattr(head, "bias", None)


@contextlib.contextmanager
def adapters_disabled(model):
    """The PEFT model with its adapter switched off: the reference policy for free."""
    with model.disable_adapter():
        yield model
