"""Data for the trainer: TRL's dataset formats → token rows with the prompt masked.

Paired (``prompt/chosen/rejected``) batches are laid out as the fused losses expect: rows
``[0, B)`` chosen, ``[B, 2B)`` rejected. Unpaired (``prompt/completion/label``, KTO) batches
carry a ``desirable`` mask and their mismatched-pair KL rows. With ``packing`` every part
of a batch is one row with no padding (see :func:`pack`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import mismatched_pairs

PAIRED = ("prompt", "chosen", "rejected")
UNPAIRED = ("prompt", "completion", "label")


def load(source: str | None, kind: str, seed: int = 0):
    """A ``DatasetDict`` with ``train`` (and ``test`` if present): the embedded default when
    ``source`` is None, a local ``.json``/``.jsonl`` file, or any ``load_dataset`` name."""
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
    return data


def check_columns(dataset, kind: str, name: str = "dataset") -> None:
    need = PAIRED if kind == "paired" else UNPAIRED
    missing = [c for c in need if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{name} lacks column(s) {missing}; this loss needs {list(need)} "
            f"({'TRL preference' if kind == 'paired' else 'TRL unpaired/KTO'} format); "
            f"it has {dataset.column_names}"
        )
    if kind == "unpaired":
        bad = [v for v in dataset["label"] if not isinstance(v, bool)]
        if bad:
            raise ValueError(
                f"{name} column 'label' must be booleans (True = desirable), got e.g. {bad[0]!r}"
            )


def _text(value, tokenizer) -> str:
    """Plain text, or conversational messages rendered with the tokenizer's chat template."""
    if isinstance(value, str):
        return value
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational data needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(value, tokenize=False)


@dataclass
class Tokenized:
    prompt: list[int]
    completion: list[int]


def encode(prompt, completion, tokenizer, max_prompt: int, max_completion: int) -> Tokenized:
    """Prompt ids (left-truncated, BOS first) and completion ids (right-truncated, EOS last)."""
    prompt_ids = tokenizer(_text(prompt, tokenizer), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(_text(completion, tokenizer), add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return Tokenized(prompt_ids[-max_prompt:], completion_ids[:max_completion])


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
    ``packing=True``: each part of the batch one row, see :func:`pack`)."""

    def __init__(
        self,
        tokenizer,
        kind: str,
        max_prompt: int = 256,
        max_completion: int = 256,
        sample_column: str | None = None,
        packing: bool = False,
    ):
        self.tokenizer, self.kind = tokenizer, kind
        self.packing = packing
        self.max_prompt, self.max_completion = max_prompt, max_completion
        self.sample_column = sample_column
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _enc(self, prompt, completion):
        return encode(prompt, completion, self.tokenizer, self.max_prompt, self.max_completion)

    def __call__(self, rows: list[dict]) -> dict:
        batch = self._padded(rows)
        if self.packing:
            for part in ("policy", "sample", "kl"):
                if part in batch:
                    batch[part] = pack(batch[part])
        return batch

    def _padded(self, rows: list[dict]) -> dict:
        if self.kind == "paired":
            chosen = [self._enc(r["prompt"], r["chosen"]) for r in rows]
            rejected = [self._enc(r["prompt"], r["rejected"]) for r in rows]
            batch = {"policy": rows_to_batch(chosen + rejected, self.pad_id)}
            if self.sample_column:
                samples = [self._enc(r["prompt"], r[self.sample_column]) for r in rows]
                batch["sample"] = rows_to_batch(samples, self.pad_id)
            return batch
        encoded = [self._enc(r["prompt"], r["completion"]) for r in rows]
        batch = {
            "policy": rows_to_batch(encoded, self.pad_id),
            "desirable": torch.tensor([bool(r["label"]) for r in rows]),
        }
        if len(rows) >= 2:  # KTO's mismatched pairs (x_i, y_(i+1) mod m), paper/HALOs order
            batch["kl"] = mismatched_pairs(
                [e.prompt for e in encoded],
                [e.completion for e in encoded],
                offset=1,
                pad_token_id=self.pad_id,
            )
        return batch


def drop_empty(dataset, collator: Collator, kind: str):
    """Rows whose completion is empty after truncation cannot be scored: drop them, and
    raise if nothing is left."""
    column = "chosen" if kind == "paired" else "completion"

    def keep(row):
        return len(collator._enc(row["prompt"], row[column]).completion) > 0

    kept = dataset.filter(keep)
    if len(kept) == 0:
        raise ValueError(
            "the dataset is empty after truncation; raise --max-completion-length / "
            "--max-prompt-length or check the data"
        )
    return kept
