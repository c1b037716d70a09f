"""Data for the trainer: TRL's dataset formats → token rows with the prompt masked.

Paired (``prompt/chosen/rejected``) batches are laid out as the fused losses expect: rows
``[0, B)`` chosen, ``[B, 2B)`` rejected. Unpaired (``prompt/completion/label``, KTO) batches
carry a ``desirable`` mask and their mismatched-pair KL rows. With ``packing`` every part
of a batch is one row with no padding (see :func:`pack`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..losses import mismatched_pairs

PAIRED = ("prompt", "chosen", "rejected")
UNPAIRED = ("prompt", "completion", "label")


def load(source: str | None, kind: str, seed: int = 0):
    """A ``DatasetDict`` with ``train`` (and ``test`` if present) in ``kind``'s format.

    ``source``: None for the embedded default, a local ``.json``/``.jsonl`` file, or any
    ``load_dataset`` name. Every split goes through :func:`normalize` (implicit prompts
    extracted; paired data unpaired for the unpaired losses) as TRL's trainers do.
    """
    from datasets import DatasetDict, load_dataset

    if source is None:
        from .default import default_dataset

        return default_dataset(kind, seed=seed)
    if source.endswith((".json", ".jsonl")):
        data = load_dataset("json", data_files=source)
    else:
        data = load_dataset(source)
    if not isinstance(data, DatasetDict):
        data = DatasetDict({"train": data})
    return DatasetDict({name: normalize(split, kind) for name, split in data.items()})


def is_conversational(value) -> bool:
    """Whether a column value is a list of chat messages (dicts with a ``role``)."""
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], dict)
        and ("role" in value[0])
    )


def extract_prompt(row: dict) -> dict:
    """Split an implicit-prompt row (``chosen``/``rejected`` only) into prompt and answers.

    The prompt is the longest shared prefix of ``chosen`` and ``rejected`` — characters for
    plain text (a trailing space goes with the answers), whole messages for conversations;
    the rule TRL's ``extract_prompt`` applies (trl/data_utils.py, TRL 1.16).

    Example:
        >>> extract_prompt({"chosen": "Sky is blue", "rejected": "Sky is red"})
        {'prompt': 'Sky is', 'chosen': ' blue', 'rejected': ' red'}
    """
    chosen, rejected = row["chosen"], row["rejected"]
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    if shared < min(len(chosen), len(rejected)) and shared > 0 and chosen[shared - 1] == " ":
        shared -= 1
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _unpair(batch: dict[str, list]) -> dict[str, list]:
    """Paired rows → unpaired: each chosen answer desirable, each rejected one not."""
    n = len(batch["chosen"])
    out = {"completion": batch["chosen"] + batch["rejected"], "label": [True] * n + [False] * n}
    for name, values in batch.items():
        if name not in ("chosen", "rejected"):
            out[name] = values + values
    return out


def normalize(dataset, kind: str):
    """A split in TRL's explicit format for ``kind`` ("paired" or "unpaired").

    ``chosen``/``rejected`` rows without a ``prompt`` get it extracted
    (:func:`extract_prompt`); for ``kind="unpaired"`` (KTO) paired rows are unpaired as
    TRL's KTOTrainer does (chosen → ``label=True``, rejected → ``label=False``).
    Anything else is returned as it is, for :func:`check_columns` to judge.
    """
    columns = dataset.column_names
    if "chosen" in columns and "rejected" in columns:
        if "prompt" not in columns:
            dataset = dataset.map(extract_prompt)
        if kind == "unpaired":
            dataset = dataset.map(_unpair, batched=True, remove_columns=dataset.column_names)
    return dataset


def check_columns(dataset, kind: str, name: str = "dataset") -> None:
    """Raise ValueError naming what ``dataset`` lacks for ``kind`` ("paired"/"unpaired")."""
    need = PAIRED if kind == "paired" else UNPAIRED
    missing = [c for c in need if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{name} lacks column(s) {missing}; this loss needs {list(need)} "
            f"({'TRL preference' if kind == 'paired' else 'TRL unpaired/KTO'} format, or "
            f"chosen/rejected with an implicit prompt); it has {dataset.column_names}"
        )
    if kind == "unpaired":
        bad = [v for v in dataset["label"] if not isinstance(v, bool)]
        if bad:
            raise ValueError(
                f"{name} column 'label' must be booleans (True = desirable), got e.g. {bad[0]!r}"
            )


@dataclass
class Tokenized:
    """One scored sequence: ``prompt`` ids (masked) followed by ``completion`` ids (scored)."""

    prompt: list[int]
    completion: list[int]


def _template_kwargs(row: dict | None) -> dict:
    """Per-row chat-template extras TRL forwards: ``tools`` (list or JSON) and
    ``chat_template_kwargs``."""
    if not row:
        return {}
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **(row.get("chat_template_kwargs") or {})}


def _token_ids(tokenizer, value, **template_kwargs) -> list[int]:
    """Plain text through the tokenizer (its own special tokens, as TRL), messages through
    its chat template."""
    if isinstance(value, str):
        return tokenizer(text=value)["input_ids"]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "conversational data needs a tokenizer with a chat template; this one has none"
        )
    out = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **template_kwargs)
    return list(out["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def encode_many(
    prompt, completions: list, tokenizer, max_prompt: int, max_completion: int, row=None
) -> list[Tokenized]:
    """Token ids of one prompt with each of its completions, as TRL 1.16 tokenizes them.

    Conversational: the prompt rendered with ``add_generation_prompt=True``, each
    prompt+completion conversation rendered whole; plain text: the tokenizer's own special
    tokens (BOS only where it adds one), EOS text appended to a completion lacking it. The
    completion starts where the prompt and every prompt+completion first differ (TRL's
    ``common_prefix_length``), so template text and a second BOS are never scored. Then the
    prompt is left-truncated to ``max_prompt`` and each completion right-truncated to
    ``max_completion`` tokens. ``row`` supplies ``tools``/``chat_template_kwargs``.

    Example:
        >>> from fastalign.trainer.default import default_tokenizer
        >>> [t.completion for t in encode_many("1+1=", ["2", "3"], default_tokenizer(), 8, 8)]
        [[6, 2], [7, 2]]
    """
    conversational = is_conversational(prompt)
    if any(is_conversational(c) != conversational for c in completions):
        raise ValueError(
            "prompt and completion must both be text or both be conversational (lists of "
            f"messages); got prompt {type(prompt).__name__} with completions "
            f"{[type(c).__name__ for c in completions]}"
        )
    if conversational:
        kwargs = _template_kwargs(row)
        prompt_ids = _token_ids(tokenizer, prompt, add_generation_prompt=True, **kwargs)
        full = [_token_ids(tokenizer, prompt + c, **kwargs) for c in completions]
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = _token_ids(tokenizer, prompt)
        full = [
            _token_ids(tokenizer, prompt + (c if c.endswith(eos) else c + eos)) for c in completions
        ]
    prompt_len = min(_common_prefix(prompt_ids, ids) for ids in full)
    prompt_ids = prompt_ids[:prompt_len][-max_prompt:] if max_prompt > 0 else []
    return [Tokenized(prompt_ids, ids[prompt_len:][:max_completion]) for ids in full]


def encode(prompt, completion, tokenizer, max_prompt: int, max_completion: int) -> Tokenized:
    """One prompt and completion as token ids (see :func:`encode_many`)."""
    return encode_many(prompt, [completion], tokenizer, max_prompt, max_completion)[0]


def rows_to_batch(pairs: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` (prompt and pad = -100).

    ``labels[t]`` is the token at t; the loss applies the usual shift (hidden t scores t+1).
    """
    length = max(len(p.prompt) + len(p.completion) for p in pairs)
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), length), -100, dtype=torch.long)
    attention = torch.zeros(len(pairs), length, dtype=torch.long)
    for i, p in enumerate(pairs):
        ids = p.prompt + p.completion
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(p.prompt) : len(ids)] = torch.tensor(p.completion)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pack(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A right-padded batch as one packed row, rows kept in order, padding dropped.

    In: ``input_ids``/``attention_mask``/``labels`` ``[B, T]``. Out: ``input_ids``
    ``[1, N]``, ``position_ids`` ``[1, N]`` (restarting at 0 for each sequence), ``labels``
    ``[N]`` (prompt = -100) and ``cu_seqlens`` int32 ``[B + 1]``, N the sum of real lengths.
    The loss's ``shift=True`` then scores exactly the tokens the padded batch scores.

    Example:
        >>> out = pack(rows_to_batch([Tokenized([1, 5], [7]), Tokenized([1], [8, 9])], 0))
        >>> out["input_ids"].tolist(), out["position_ids"].tolist(), out["cu_seqlens"].tolist()
        ([[1, 5, 7, 1, 8, 9]], [[0, 1, 2, 0, 1, 2]], [0, 3, 6])
    """
    mask = batch["attention_mask"].bool()  # [B, T]
    lengths = mask.sum(1)
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    if not torch.equal(mask, positions < lengths[:, None]):
        raise ValueError("pack: attention_mask must be right-padded (each row's ones first)")
    cu_seqlens = torch.zeros(mask.shape[0] + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    return {
        "input_ids": batch["input_ids"][mask][None],
        "position_ids": positions[mask][None],
        "labels": batch["labels"][mask],
        "cu_seqlens": cu_seqlens,
    }


class Collator:
    """Turns dataset rows into model batches for one loss family (padded, or packed with
    ``packing=True``: each part of the batch one row, see :func:`pack`).

    ``kl_offset``: KTO's mismatched pairs ``(x_i, y_(i+offset) mod m)``; +1 is the paper's
    (and HALOs') pairing, -1 TRL's.
    """

    def __init__(
        self,
        tokenizer,
        kind: str,
        max_prompt: int = 256,
        max_completion: int = 256,
        sample_column: str | None = None,
        packing: bool = False,
        kl_offset: int = 1,
    ):
        self.tokenizer, self.kind = tokenizer, kind
        self.packing = packing
        self.max_prompt, self.max_completion = max_prompt, max_completion
        self.sample_column = sample_column
        self.kl_offset = kl_offset
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode_row(self, row: dict, columns: tuple[str, ...]) -> list[Tokenized]:
        """``row["prompt"]`` with each of ``row[c] for c in columns`` (one shared prompt)."""
        return encode_many(
            row["prompt"],
            [row[c] for c in columns],
            self.tokenizer,
            self.max_prompt,
            self.max_completion,
            row=row,
        )

    def __call__(self, rows: list[dict]) -> dict:
        batch = self._padded(rows)
        if self.packing:
            for part in ("policy", "sample", "kl"):
                if part in batch:
                    batch[part] = pack(batch[part])
        return batch

    def _padded(self, rows: list[dict]) -> dict:
        if self.kind == "paired":
            pairs = [self.encode_row(r, ("chosen", "rejected")) for r in rows]
            chosen, rejected = [p[0] for p in pairs], [p[1] for p in pairs]
            batch = {"policy": rows_to_batch(chosen + rejected, self.pad_id)}
            if self.sample_column:
                samples = [self.encode_row(r, (self.sample_column,))[0] for r in rows]
                batch["sample"] = rows_to_batch(samples, self.pad_id)
            return batch
        encoded = [self.encode_row(r, ("completion",))[0] for r in rows]
        batch = {
            "policy": rows_to_batch(encoded, self.pad_id),
            "desirable": torch.tensor([bool(r["label"]) for r in rows]),
        }
        if len(rows) >= 2:  # KTO's mismatched pairs (x_i, y_(i+offset) mod m)
            batch["kl"] = mismatched_pairs(
                [e.prompt for e in encoded],
                [e.completion for e in encoded],
                offset=self.kl_offset,
                pad_token_id=self.pad_id,
            )
        return batch


def drop_empty(dataset, collator: Collator, kind: str):
    """Rows with a completion that is empty after truncation cannot be scored: drop them,
    and raise if nothing is left."""
    columns = ("chosen", "rejected") if kind == "paired" else ("completion",)

    def keep(row):
        return all(len(t.completion) > 0 for t in collator.encode_row(row, columns))

    kept = dataset.filter(keep)
    if len(kept) == 0:
        raise ValueError(
            "the dataset is empty after truncation; raise --max-completion-length / "
            "--max-prompt-length or check the data"
        )
    return kept
