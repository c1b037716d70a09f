"""The policy model of a run: loaded with errors that name the flag, the embedded default's
SFT warm-up, its LoRA adapter (new, or restored as trainable from a checkpoint) and the base
weights a LoRA checkpoint of the embedded default keeps."""

from __future__ import annotations

from pathlib import Path
from pickle import UnpicklingError

import torch

from ..ops import sequence_logps
from ..options import LogpOptions
from . import data as D
from .model import HiddenStates, head_params


def from_pretrained(loader, source, flag: str):
    """``loader.from_pretrained(source)``, its failure a ``ValueError`` naming ``flag``."""
    return load_or_explain(lambda: loader.from_pretrained(source), source, flag)


def _weight_files(source) -> str:
    """The weight files in a local directory ``source`` (``""`` otherwise), for messages."""
    path = Path(str(source))
    names = sorted(p.name for p in path.glob("*") if p.suffix in (".safetensors", ".bin"))
    return f" ({', '.join(names)})" if path.is_dir() and names else ""


def load_or_explain(load, source, flag: str):
    """``load()``; a missing, truncated, corrupt or refused file (a pickle that is not plain
    tensors: transformers loads ``.bin`` with ``weights_only=True``) becomes a ``ValueError``
    naming ``flag``, ``source`` and its weight files, instead of a traceback."""
    from safetensors import SafetensorError

    try:
        return load()
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError, UnpicklingError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        first = first.split(". ")[0]  # not torch's advice to load with weights_only=False
        raise ValueError(
            f"{flag} {source}: could not be loaded{_weight_files(source)} "
            f"({type(err).__name__}: {first})"
        ) from None


def lora_config(config):
    """The LoRA adapter a ``--lora-rank R`` run trains (see ``model.lora_config``)."""
    from .model import lora_config as adapter

    return adapter(
        config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target_modules
    )


def with_lora(model, config, resume: Path | None):
    """``model`` with a fresh LoRA adapter, or with the one saved in ``resume/model``
    restored as trainable (no second ``get_peft_model``)."""
    from peft import PeftModel, get_peft_model

    if resume is not None:
        adapter = Path(resume) / "model"
        return load_or_explain(
            lambda: PeftModel.from_pretrained(model, adapter, is_trainable=True),
            adapter,
            "--resume-from",
        )
    try:
        return get_peft_model(model, lora_config(config))
    except ValueError as err:  # peft: no module of the model matches a target name
        targets = config.lora_target_modules
        raise ValueError(f"--lora-target-modules {targets}: {err}") from None


_DROPOUTS = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


def disable_dropout(model: torch.nn.Module) -> int:
    """Dropout off in ``model``, as TRL's ``disable_dropout=True`` (its default) turns it off:
    every dropout module's ``p`` set to 0; also the ``attention_dropout`` rate that Hugging
    Face attention modules read in training mode (TRL's helper leaves that one on). Returns
    how many dropout sites were on.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
        >>> disable_dropout(net), net[1].p
        (1, 0.0)
    """
    turned_off = 0
    for module in model.modules():
        if isinstance(module, _DROPOUTS) and module.p > 0:
            module.p, turned_off = 0.0, turned_off + 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout, turned_off = 0.0, turned_off + 1
    return turned_off


def save_base(peft_model, directory: Path, model_state: dict | None) -> None:
    """The base weights under a LoRA adapter (the embedded default's are SFT-warmed at the
    start, so they cannot be rebuilt from a name), with PEFT's key changes undone."""
    source = model_state if model_state is not None else peft_model.state_dict()
    state = {
        key.removeprefix("base_model.model.").replace(".base_layer.", "."): value
        for key, value in source.items()
        if "lora_" not in key
    }
    peft_model.get_base_model().save_pretrained(directory, state_dict=state)


def sft_warmup(
    model, pairs: list[tuple], tokenizer, pad_id: int, *, steps: int, seed: int, backend: str
) -> None:
    """Embedded default only: teach the tiny random model the task format with SFT on the
    (prompt, good completion) ``pairs``, so the reference policy is a sensible start."""
    encoded = [D.encode(p, c, tokenizer, 16, 8) for p, c in pairs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    body = HiddenStates(model)
    device = next(model.parameters()).device
    options = LogpOptions(shift=True, backend=backend)
    for _ in range(steps):
        idx = torch.randint(len(encoded), (16,), generator=generator).tolist()
        batch = D.rows_to_batch([encoded[i] for i in idx], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        weight, bias = head_params(model)
        hidden = body(batch["input_ids"], batch["attention_mask"])
        out = sequence_logps(hidden, weight, batch["labels"], bias=bias, options=options)
        loss = -out.logps.sum() / out.num_tokens.sum().clamp_min(1)  # plain NLL, fused op
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def default_samples(model, tokenizer, split, config, device):
    """TYPO on the embedded default: ``split`` with one reference sample per prompt in
    ``config.sample_column``, drawn from ``model`` (None: the initial random model, rebuilt
    from the seed, so a resumed run gets the same samples). None stays None."""
    from .default import default_model
    from .sample import sample_completions

    if split is None:
        return None
    if model is None:
        model = default_model(tokenizer, seed=config.seed).to(device)
    samples = sample_completions(
        model, tokenizer, split["prompt"], max_new_tokens=3, seed=config.seed
    )
    return split.add_column(config.sample_column, samples)
