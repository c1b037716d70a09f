"""What a run is given, checked before any model loads: the flags, the data file (errors name
the file and line), the ``--model`` path and the checkpoint to resume from. Every failure is
a ``ValueError`` naming the flag; the CLI prints it as ``error: ...`` and exits with status 2."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
from pathlib import Path

import torch

from .. import checks
from . import checkpoint as C
from . import data as D
from .config import TrainConfig
from .loss_table import LOSSES, loss_spec

REFERENCES = ("copy", "peft", "precomputed")

# field: (accepts the value, what is expected). None passes for the fields that default to it.
_RULES = {
    "batch_size": (lambda v: v >= 1, "an integer ≥ 1"),
    "grad_accum": (lambda v: v >= 1, "an integer ≥ 1"),
    "max_steps": (lambda v: v >= 1, "an integer ≥ 1"),
    "logging_steps": (lambda v: v >= 1, "an integer ≥ 1"),
    "save_steps": (lambda v: v >= 0, "an integer ≥ 0 (0: only at the end)"),
    "save_total_limit": (lambda v: v >= 0, "an integer ≥ 0 (0: keep every checkpoint)"),
    "sft_warmup_steps": (lambda v: v >= 0, "an integer ≥ 0"),
    "lora_rank": (lambda v: v >= 0, "an integer ≥ 0 (0: train all weights)"),
    "max_prompt_length": (lambda v: v >= 1, "an integer ≥ 1"),
    "max_completion_length": (lambda v: v >= 1, "an integer ≥ 1"),
    "beta": (lambda v: v > 0, "a number > 0"),
    "learning_rate": (lambda v: v > 0, "a number > 0"),
    "weight_decay": (lambda v: v >= 0, "a number ≥ 0"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "max_grad_norm": (lambda v: v > 0, "a number > 0"),
    "lam": (lambda v: v >= 0, "a number ≥ 0"),
    "label_smoothing": (lambda v: 0 <= v <= 0.5, "a number in [0, 0.5]"),
    "desirable_weight": (lambda v: v > 0, "a number > 0 (or unset: class balancing)"),
    "undesirable_weight": (lambda v: v > 0, "a number > 0 (or unset: class balancing)"),
    "eval_steps": (lambda v: v >= 0, "an integer ≥ 0 (0: before and after training only)"),
    "router_aux_loss_coef": (lambda v: v >= 0, "a number ≥ 0 (or unset: the model's own)"),
    "lora_alpha": (lambda v: v > 0, "a number > 0 (or unset: 2 × --lora-rank)"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "seed": (lambda v: 0 <= v <= 2**32 - 1, "an integer in [0, 2**32 - 1]"),
}
# Fields whose None means "derive it" (class balancing, the model's coefficient, 2 × rank).
_NULLABLE = {"desirable_weight", "undesirable_weight", "router_aux_loss_coef", "lora_alpha"}
# Settings a resumed run may change; every other one must equal the checkpoint's.
RESUME_MAY_CHANGE = {
    "output_dir",
    "resume_from",
    "progress",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "max_steps",
    "backend",
    "extra",
    "eval_dataset",
    "eval_steps",
    "report_to",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def flag(name: str) -> str:
    """The CLI flag of a TrainConfig field.

    Example:
        >>> flag("batch_size")
        '--batch-size'
    """
    return "--" + name.replace("_", "-")


def check_config(config) -> None:
    """Every flag on its own and in combination; raises ``ValueError`` naming the flag.

    Example:
        >>> from fastalign.trainer.config import TrainConfig
        >>> check_config(TrainConfig(grad_accum=0))
        Traceback (most recent call last):
        ValueError: --grad-accum must be an integer ≥ 1, got 0
    """
    if config.loss not in LOSSES:
        raise ValueError(f"unknown loss {config.loss!r}; choose one of {', '.join(LOSSES)}")
    if config.reference not in REFERENCES:
        raise ValueError(f"unknown reference {config.reference!r}; choose {REFERENCES}")
    for name, (accepts, expected) in _RULES.items():
        value = getattr(config, name)
        if value is None and name in _NULLABLE:
            continue
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        if isinstance(value, bool) or not finite or not accepts(value):
            raise ValueError(f"{flag(name)} must be {expected}, got {value!r}")
    spec = loss_spec(config.loss)
    if config.reference == "precomputed" and spec.data == "unpaired":
        raise ValueError(
            "KTO's mismatched pairs change with every microbatch: use --reference copy or "
            "peft (precomputed reference log-probs are for dpo/ipo)"
        )
    if not spec.reference(config):
        _check_no_reference(config)
    if config.reference == "peft" and config.lora_rank == 0:
        raise ValueError("--reference peft needs a LoRA adapter: pass --lora-rank > 0")
    if spec.mismatched_rows(config) and config.batch_size < 2:
        raise ValueError(
            "--loss kto needs --batch-size ≥ 2: its reference point z0 comes from mismatched "
            f"pairs within each microbatch (got --batch-size {config.batch_size})"
        )
    if config.kto_kl_offset not in (1, -1):
        raise ValueError(f"--kto-kl-offset must be 1 or -1, got {config.kto_kl_offset!r}")
    from .report import check_report_to

    check_report_to(config.report_to)
    if config.fsdp and "WORLD_SIZE" not in os.environ:
        raise ValueError("--fsdp shards over a process group: launch with torchrun")
    loss_spec(config.loss).check(config)
    _check_applies(config)
    _check_backend(config.backend)
    _check_output_path(config.output_dir)
    for name in ("model", "ref_model"):
        if getattr(config, name) is not None:
            check_model_path(getattr(config, name), flag(name))
    _check_router(config)
    evaluation = config.eval_dataset
    if evaluation is not None and evaluation.endswith((".json", ".jsonl")):  # before any work
        check_file(Path(evaluation), spec.data, text_columns(config), "--eval-dataset")


# Flags that only take effect with another one: (field, needs, why). A field at its default is
# not "given" (argparse fills every default), so only a changed one is refused.
_NEEDS = (
    ("lora_alpha", lambda c: c.lora_rank > 0, "it scales a LoRA adapter: pass --lora-rank > 0"),
    ("lora_dropout", lambda c: c.lora_rank > 0, "it is a LoRA adapter's: pass --lora-rank > 0"),
    ("lora_target_modules", lambda c: c.lora_rank > 0, "adapters need --lora-rank > 0"),
    ("router_aux_loss_coef", lambda c: c.router_aux_loss, "--no-router-aux-loss turns it off"),
    (
        "sft_warmup_steps",
        lambda c: c.model is None,
        "it warms up the embedded default model only, not --model",
    ),
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _check_applies(config) -> None:
    """A flag set (to other than its default) where it would be ignored is refused."""
    for name, applies, why in _NEEDS:
        value = getattr(config, name)
        if value != _DEFAULTS[name] and not applies(config):
            raise ValueError(f"{flag(name)} {value} does not apply here: {why}")


def _check_router(config) -> None:
    """``--router-aux-loss-coef`` on a dense model (the embedded one, or a local ``--model``
    whose config declares no router logits) is refused from the config alone, before any
    weights load; a Hub id is judged when it loads."""
    coef = config.router_aux_loss_coef
    if not coef or not config.router_aux_loss:
        return
    name = "the embedded default model"
    if config.model is not None:
        name = f"--model {config.model}"
        path = Path(config.model).expanduser()
        if not (path / "config.json").is_file():
            return
        from transformers import AutoConfig

        try:  # no remote code: a config that needs it is judged when the model loads
            model_config = AutoConfig.from_pretrained(path).get_text_config()
        except Exception:
            return
        if hasattr(model_config, "output_router_logits"):
            return
    raise ValueError(
        f"--router-aux-loss-coef {coef} does not apply: {name} is not a Mixture-of-Experts "
        "model (its config declares no router logits)"
    )


def _check_backend(backend: str) -> None:
    """``--backend triton`` needs triton and CUDA (or ``TRITON_INTERPRET=1``), checked before
    the model loads rather than at its first step."""
    if backend not in checks.BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(checks.BACKENDS)}, got {backend!r}")
    if backend != "triton":
        return
    if importlib.util.find_spec("triton") is None:
        raise ValueError("--backend triton needs the triton package: install it or use auto")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "--backend triton needs a CUDA GPU (none is visible), or TRITON_INTERPRET=1 for the "
            "slow interpreter: use --backend auto or torch here"
        )


def _check_output_path(output_dir: str | None) -> None:
    """``--output-dir`` (or one of its parents) must not be an existing file."""
    if output_dir is None:
        return
    path = Path(output_dir).expanduser()
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            where = "" if part == path else f" ({part} is a file)"
            raise ValueError(f"--output-dir {output_dir}: not a directory{where}")


def _check_no_reference(config) -> None:
    """A loss that reads no reference policy (simpo, orpo, cpo, typo; dpo with only
    reference-free terms) refuses the flags that would choose one, instead of ignoring them."""
    given = [f"--ref-model {config.ref_model}"] if config.ref_model is not None else []
    given += [f"--reference {config.reference}"] if config.reference != "copy" else []
    if given:
        raise ValueError(
            f"{given[0]} does not apply to --loss {config.loss} here: it reads no reference "
            "policy (drop the flag)"
        )


def check_model_path(name: str, flag_name: str) -> None:
    """A local-looking path must exist (no Hub request is made for it); a Hub id is left to
    ``from_pretrained``.

    Example:
        >>> check_model_path("./no-such-model", "--model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: --model ./no-such-model: no such directory ...
    """
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{flag_name} {name}: no config.json there (not a model directory)")
        return
    if name.startswith((".", "~", "/")) or name.endswith("/") or not _HUB_ID.fullmatch(name):
        raise ValueError(
            f"{flag_name} {name}: no such directory (a local path, so the Hugging Face Hub "
            "was not asked)"
        )


# ------------------------------------------------------------------ the data set
def text_columns(config) -> tuple[str, ...]:
    """The data columns this loss reads as text (a string or chat messages per row)."""
    spec = loss_spec(config.loss)
    if spec.data == "unpaired":
        return ("prompt", "completion")
    sample = (config.sample_column,) if spec.samples and config.lam > 0 else ()
    return ("prompt", "chosen", "rejected", *sample)


def load_dataset(
    source: str | None,
    kind: str,
    seed: int,
    text_columns: tuple[str, ...],
    splits: tuple[str, ...] = ("train",),
):
    """``data.load`` after checking a local file row by row; raises ``ValueError`` naming
    ``--dataset``, the file and the line of the first bad row, or a data set with none of
    ``splits``."""
    if source is not None and source.endswith((".json", ".jsonl")):
        check_file(Path(source), kind, text_columns)
    elif source is not None and source.startswith((".", "/", "~")):
        if not Path(source).expanduser().exists():  # a local path: no Hub lookup for it
            raise ValueError(f"--dataset {source}: no such file or directory")
    try:
        dataset = D.load(source, kind, seed=seed)
    except ValueError:
        raise
    except Exception as err:  # datasets' own errors: not found, offline, unreadable
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"--dataset {source}: could not be loaded ({first})") from None
    name = "the embedded dataset" if source is None else f"--dataset {source}"
    if not any(split in dataset for split in splits):
        raise ValueError(
            f"{name} has no {' or '.join(map(repr, splits))} split (it has "
            f"{', '.join(map(repr, dataset)) or 'none'}): name the file of the "
            f"{splits[0]} rows, or a directory or data set with a {splits[0]} split"
        )
    for split in dataset:
        D.check_columns(dataset[split], kind, name=f"{name} [{split}]")
        if len(dataset[split]) == 0:
            raise ValueError(f"{name}: split {split!r} has no rows")
    return dataset


def load_eval_dataset(config, kind: str):
    """``--eval-dataset``: its ``test`` split, else its ``train`` split, checked as the
    training data is (errors name ``--eval-dataset``)."""
    try:
        evaluation = load_dataset(
            config.eval_dataset, kind, config.seed, text_columns(config), ("test", "train")
        )
    except ValueError as err:
        raise ValueError(str(err).replace("--dataset", "--eval-dataset", 1)) from None
    return evaluation["test" if "test" in evaluation else "train"]


def check_file(
    path: Path, kind: str, text_columns: tuple[str, ...], flag_name: str = "--dataset"
) -> None:
    """A local ``.json``/``.jsonl`` data file: it exists, is UTF-8, parses, has rows, every
    row's text columns are strings (or chat messages), all in one format, and a KTO ``label``
    is a boolean. Errors name ``flag_name``, the file and the line."""
    where = f"{flag_name} {path}"
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{where}, line {line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset "
            f"{err.start}); save the file as UTF-8"
        ) from None
    if not text.strip():
        raise ValueError(f"{where}: the file is empty")
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(text, where)
    else:
        rows = _json_rows(text, where)
    if not rows:
        raise ValueError(f"{where}: no rows")
    present = {name for _, row in rows for name in row}
    for line, row in rows:
        _check_row(row, present, kind, text_columns, f"{where}, {line}")
    _check_one_format(rows, text_columns, where)


def _check_one_format(rows: list[tuple[str, dict]], text_columns: tuple, where: str) -> None:
    """Every text value of the file is plain text, or every one is chat messages: the datasets
    library reads a column mixing both as JSON (``"11"`` becomes 11), and a prompt in one
    format cannot be continued in the other."""
    first = None  # (format, line, column) of the first text value
    for line, row in rows:
        for column in text_columns:
            if column not in row:
                continue
            form = "plain text" if isinstance(row[column], str) else "chat messages"
            if first is None:
                first = (form, line, column)
            elif form != first[0]:
                raise ValueError(
                    f"{where}, {line}: column {column!r} is {form}, but {first[1]}'s "
                    f"{first[2]!r} is {first[0]}: use one format (all plain text or all chat "
                    "messages) in every row and column"
                )


def jsonl_objects(text: str, where: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of JSON Lines ``text``; a line that is
    not a JSON object is a ``ValueError`` naming ``where`` (the file) and the line."""
    objects = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}, line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}, line {number}: expected a JSON object, got {row!r:.60}")
        objects.append((number, row))
    return objects


def _jsonl_rows(text: str, where: str) -> list[tuple[str, dict]]:
    return [(f"line {number}", row) for number, row in jsonl_objects(text, where)]


def _json_rows(text: str, where: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if isinstance(data, dict):  # columnar {"prompt": [...], ...}: read as one row by datasets
        raise ValueError(
            f'{where}: expected a list of row objects ([{{"prompt": ..., "chosen": ...}}, '
            "...]) or JSON Lines (one object per line), got one JSON object; columnar data "
            '({"prompt": [...], ...}) is not read'
        )
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a list of row objects")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{where}, row {index}: expected a JSON object, got {row!r:.60}")
    return [(f"row {index}", row) for index, row in enumerate(data)]


def _check_row(row: dict, present: set, kind: str, text_columns: tuple, where: str) -> None:
    for column in text_columns:
        if column not in present:
            continue  # absent from every row: check_columns names it with what the loss needs
        value = row.get(column)
        if value is None:
            raise ValueError(f"{where}: column {column!r} is missing or null")
        if not (isinstance(value, str) or _is_messages(value)):
            raise ValueError(
                f"{where}: column {column!r} must be a string or a list of chat messages "
                f"({{'role': ..., 'content': ...}}), got {type(value).__name__} {value!r:.40}"
            )
    if kind == "unpaired" and "label" in present and not isinstance(row.get("label"), bool):
        raise ValueError(
            f"{where}: column 'label' must be true or false (desirable or not), got "
            f"{row.get('label')!r}"
        )


def _is_messages(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value)
    )


def check_rows_for_batch(num_rows: int, config, world: int) -> None:
    """Enough training rows for one batch on every rank (else the data order loops forever)."""
    need = config.batch_size * world
    if num_rows < need:
        ranks = f" × {world} processes" if world > 1 else ""
        raise ValueError(
            f"--batch-size {config.batch_size}{ranks} needs at least {need} training rows; the "
            f"data set has {num_rows} (after dropping rows with nothing to score)"
        )


# ------------------------------------------------------------------ resuming
def check_output_dir(output_dir: Path, resume_from: str | None) -> None:
    """A run's ``metrics.jsonl`` is only continued by resuming that run: a fresh run (or one
    resumed from elsewhere) in a directory holding another run's metrics is refused."""
    metrics = Path(output_dir) / "metrics.jsonl"
    if not metrics.exists():
        return
    if resume_from and Path(resume_from).resolve().parent == Path(output_dir).resolve():
        return
    raise ValueError(
        f"--output-dir {output_dir} already holds another run (metrics.jsonl): continue it "
        f"with --resume-from {output_dir}/checkpoint-N (or final), or choose a new directory"
    )


def check_resume(config) -> dict:
    """The trainer state of ``--resume-from`` (read with ``weights_only=True``), refused when
    the checkpoint is missing, incomplete, unsafe, already at ``--max-steps`` or was trained
    with other settings."""
    state = C.read_state(Path(config.resume_from))
    saved = state["config"]
    differ = [
        f"{flag(name)} {saved[name]!r} (now {getattr(config, name)!r})"
        for name in saved
        if name not in RESUME_MAY_CHANGE
        and hasattr(config, name)
        and saved[name] != getattr(config, name)
    ]
    if differ:
        raise ValueError(
            f"--resume-from {config.resume_from} was trained with "
            + ", ".join(differ)
            + ": resume with the same settings (an exact resume continues the same run)"
        )
    if state["step"] >= config.max_steps:
        raise ValueError(
            f"--resume-from {config.resume_from} is at step {state['step']}, which --max-steps "
            f"{config.max_steps} has reached: raise --max-steps to train on"
        )
    return state
