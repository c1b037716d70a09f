"""Hugging Face causal LMs as the fused losses see them: body hidden states (padded or
packed), lm_head, the MoE router's load-balancing loss, and the LoRA adapter configuration
(the logit transform each family's ``forward`` applies: ``LogpOptions.from_config``)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# How a packed row ``[1, N]`` is kept from attending across sequences (see prepare_packing):
#   "varlen":    flash-attn varlen kernels, given cu_seqlens directly;
#   "positions": transformers' own detection of restarting position_ids (masking_utils builds
#                the block-diagonal causal mask when attention_mask is None);
#   "mask":      a 4-D block-diagonal causal mask built here (sdpa: bool, eager: additive).
PACKED_ATTENTION = ("varlen", "positions", "mask")


def lm_head(model) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(
            f"{type(model).__name__} has no lm_head (get_output_embeddings() is None); load it "
            "with AutoModelForCausalLM, not AutoModel"
        )
    return head


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on every decoder layer, through transformers'
    own switch: ``activation_checkpointing_enable`` (newer transformers: 5.24 has it, 5.17 not) or
    ``gradient_checkpointing_enable`` (its older name, deprecated where both exist)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(kwargs)
    else:
        raise ValueError(
            f"activation_checkpointing: {type(model).__name__} has neither "
            "activation_checkpointing_enable nor gradient_checkpointing_enable (not a "
            "transformers PreTrainedModel?)"
        )


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

    ``router_loss`` (see :func:`router_aux_loss`): while ``self.aux_loss`` is None, the next
    forward also asks the body for its router logits and leaves the load-balancing loss of
    its real tokens there (a scalar tensor with autograd). Set ``aux_loss = None`` before the
    policy forward whose router loss counts; later forwards (reference, KTO's mismatched
    pairs) then skip the router logits.
    """

    def __init__(
        self,
        model: nn.Module,
        packed_attention: str | None = None,
        router_loss: RouterAuxLoss | None = None,
    ):
        super().__init__()
        if packed_attention is not None and packed_attention not in PACKED_ATTENTION:
            raise ValueError(
                f"packed_attention must be one of {PACKED_ATTENTION} or None, got "
                f"{packed_attention!r}"
            )
        self.model = model
        self.packed_attention = packed_attention
        self.router_loss = router_loss
        self.aux_loss: torch.Tensor | None = None

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
        record = self.router_loss is not None and self.aux_loss is None
        if record:
            kwargs["output_router_logits"] = True
        out = body(self.model)(**kwargs)
        if record:
            # A packed row has no padding (and its mask, if any, is 4-D): every token counts.
            self.aux_loss = self.router_loss(
                out.router_logits, attention_mask if cu_seqlens is None else None
            )
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


@dataclass(frozen=True)
class RouterAuxLoss:
    """A Mixture-of-Experts family's load-balancing loss (Switch Transformer, Fedus et al.
    2021, eqs. 4-6) as its own ``ForCausalLM.forward`` computes it, and its coefficient.

    ``loss_fn`` is the family's transformers ``load_balancing_loss_func``; calling the object
    with the body's ``router_logits`` (one ``[B·T, E]`` tensor per layer) and the 2-D
    ``attention_mask`` ``[B, T]`` (None: every token is real) gives the scalar aux loss.
    """

    coef: float
    num_experts: int
    top_k: int
    loss_fn: Callable

    def __call__(self, router_logits, attention_mask: torch.Tensor | None = None):
        return self.loss_fn(router_logits, self.num_experts, self.top_k, attention_mask)


def router_aux_loss(model, coef: float | None = None) -> RouterAuxLoss | None:
    """The router loss TRL 1.16 adds for ``model``: None for a dense model or a zero coefficient.

    As TRL's trainers: a model whose config has ``output_router_logits`` is a MoE model;
    ``coef`` None takes the config's ``router_aux_loss_coef`` (0.0 when it declares none).
    Raises ValueError for a nonzero ``coef`` on a dense model, or a MoE family with no
    ``load_balancing_loss_func`` in its transformers module.

    Example:
        >>> from transformers import MixtralConfig, MixtralForCausalLM
        >>> tiny = MixtralConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        >>> router_aux_loss(MixtralForCausalLM(tiny)).coef
        0.001
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config.get_text_config()
    if not hasattr(config, "output_router_logits"):
        if coef:
            raise ValueError(
                f"router_aux_loss_coef={coef} but {type(inner).__name__} is not a "
                "Mixture-of-Experts model that returns router logits"
            )
        return None
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef)
    if coef == 0.0:
        return None
    loss_fn = getattr(sys.modules[type(inner).__module__], "load_balancing_loss_func", None)
    num_experts = getattr(inner, "num_experts", None) or getattr(
        config, "num_experts", getattr(config, "num_local_experts", None)
    )
    top_k = getattr(inner, "num_experts_per_tok", getattr(config, "num_experts_per_tok", None))
    if loss_fn is None or num_experts is None or top_k is None:
        raise ValueError(
            f"{type(inner).__name__} declares a router aux loss but fastalign cannot find its "
            "load_balancing_loss_func / num_experts / num_experts_per_tok; train with "
            "--no-router-aux-loss"
        )
    return RouterAuxLoss(coef, int(num_experts), int(top_k), loss_fn)


@dataclass
class WithRouterLoss:
    """A loss output with the router term added: ``loss = inner.loss + coef·aux_loss``; the
    metrics gain ``aux_loss`` (TRL's name); other attributes are the inner output's."""

    inner: object
    loss: torch.Tensor
    aux_loss: torch.Tensor

    def metrics(self) -> dict[str, float]:
        return {**self.inner.metrics(), "aux_loss": float(self.aux_loss.detach())}

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)


def add_router_loss(out, hidden_states: HiddenStates) -> object:
    """``out`` with ``hidden_states``' last router loss added (``out`` itself when none)."""
    router = hidden_states.router_loss
    if router is None or hidden_states.aux_loss is None:
        return out
    aux = hidden_states.aux_loss.to(out.loss.device)
    return WithRouterLoss(out, out.loss + router.coef * aux, aux)


def lora_config(
    rank: int, alpha: float | None = None, dropout: float = 0.0, targets: str = "all-linear"
):
    """A ``peft.LoraConfig``: ``targets`` "all-linear" (PEFT: every linear/Conv1D layer but
    the output head, so GPT-2's fused ``c_attn`` and Phi-3's ``qkv_proj`` are adapted) or
    comma-separated module names; ``alpha`` None → 2·rank.

    Example:
        >>> lora_config(8, targets="q_proj, v_proj").target_modules == {"q_proj", "v_proj"}
        True
    """
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"lora rank must be > 0, got {rank}")
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ValueError(f"lora target modules: expected 'all-linear' or names, got {targets!r}")
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules="all-linear" if names == ["all-linear"] else names,
    )
