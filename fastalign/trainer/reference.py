"""The reference policy of a run, made once and found again on resume: a frozen copy saved
under ``reference/``, or reference log-probs precomputed there and keyed by a fingerprint
of the data they score. A checkpoint records where that directory is and its run id, so a
run resumed into any output directory scores against the same reference or is refused."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..ops import sequence_logps
from ..options import LogpOptions
from . import checkpoint as C
from .model import HiddenStates, head_params

LOGPS_FILE = "ref_logps.pt"


@dataclass
class Reference:
    """What the loop scores against: a frozen ``model``, precomputed ``logps`` (split →
    ``[n, 2]`` float32, columns chosen/rejected), or neither (the PEFT adapter disabled);
    ``record`` is what a checkpoint keeps to find it again."""

    model: torch.nn.Module | None = None
    logps: dict[str, torch.Tensor] | None = None
    record: dict = field(default_factory=dict)


# Settings besides the rows that change a split's reference log-probs: the initial policy
# (weights source, seed, SFT warm-up, precision, attention layout) and the tokenization.
_SCORE_SETTINGS = (
    "model",
    "seed",
    "sft_warmup_steps",
    "bf16",
    "packing",
    "max_prompt_length",
    "max_completion_length",
)


def fingerprint(split, config) -> str:
    """SHA-256 over one split's rows and every setting that changes their reference log-probs
    (``_SCORE_SETTINGS``): the train split's key never depends on the eval split."""
    digest = hashlib.sha256()
    settings = [getattr(config, name) for name in _SCORE_SETTINGS]
    digest.update(json.dumps(settings, default=str).encode())
    _digest_rows(digest, split)
    return digest.hexdigest()


def _digest_rows(digest, split) -> None:
    """Feed ``digest`` a split's rows, column by column in name order (``index`` left out)."""
    for column in sorted(c for c in split.column_names if c != "index"):
        digest.update(json.dumps([column, split[column]], default=str).encode())


def fingerprints(splits: dict, config) -> dict[str, str]:
    """:func:`fingerprint` of each split, by split name."""
    return {name: fingerprint(split, config) for name, split in splits.items()}


def for_run(config, model, splits: dict, output_dir: Path, rank: int, record, score):
    """The run's reference: ``--ref-model``, or made now under ``output_dir/reference`` (a
    frozen copy of ``model``; or ``score(split)`` → ``[n, 2]`` log-probs of each split), or
    the one ``record`` (from the resumed checkpoint) points to."""
    from transformers import AutoModelForCausalLM

    from .policy import from_pretrained

    reference_dir = Path(output_dir) / "reference"
    if config.reference == "copy" and config.ref_model:
        return Reference(
            model=from_pretrained(AutoModelForCausalLM, config.ref_model, "--ref-model")
        )
    if config.reference == "copy":
        if record:
            return load_copy(record, Path(config.resume_from))
        return frozen_copy(model, reference_dir, output_dir, rank)
    if config.reference == "precomputed":
        keys = fingerprints(splits, config)
        if record:
            return load_precomputed(record, Path(config.resume_from), splits, keys, config)
        return precomputed(score, splits, keys, reference_dir, output_dir, rank)
    return Reference()  # peft: the policy with its adapter disabled


def _record(directory: Path, output_dir: Path, run_id: str) -> dict:
    directory = directory.resolve()
    relative = os.path.relpath(directory, output_dir.resolve())
    return {"path": str(directory), "relative": relative, "run_id": run_id}


def locate(record: dict, resume_from: Path) -> Path:
    """The reference directory a checkpoint recorded: relative to the resumed run's directory
    first (a moved run still resumes), then by absolute path; its run id must match."""
    candidates = [Path(resume_from).parent / record["relative"], Path(record["path"])]
    for directory in candidates:
        if C.read_marker(directory).get("run_id") == record["run_id"]:
            return directory
    raise ValueError(
        f"--resume-from {resume_from}: the run's reference (run id {record['run_id']}) is not "
        f"at {candidates[0]} or {candidates[1]} any more; it is needed to continue exactly"
    )


def frozen_copy(model, reference_dir: Path, output_dir: Path, rank: int) -> Reference:
    """A frozen copy of the initial policy (LoRA merged in), saved once under
    ``reference_dir`` for resumed runs."""
    import copy

    ref_model = copy.deepcopy(model)
    if hasattr(ref_model, "merge_and_unload"):
        ref_model = ref_model.merge_and_unload()
    run_id = uuid.uuid4().hex
    if rank == 0:
        C.write_atomic(reference_dir, ref_model.save_pretrained, {"run_id": run_id})
    return Reference(model=ref_model, record=_record(reference_dir, output_dir, run_id))


def load_copy(record: dict, resume_from: Path) -> Reference:
    """The frozen copy a resumed run's checkpoint recorded."""
    from transformers import AutoModelForCausalLM

    from .policy import from_pretrained

    directory = locate(record, resume_from)
    flag = f"--resume-from {resume_from}: the reference copy"
    return Reference(model=from_pretrained(AutoModelForCausalLM, directory, flag), record=record)


def precomputed(score, splits: dict, keys: dict, reference_dir: Path, output_dir: Path, rank: int):
    """Reference log-probs of every split (``score(split)`` → ``[n, 2]``), computed with the
    initial policy at the start of every fresh run, as TRL's ``precompute_ref_log_probs``
    does, and saved in ``reference_dir`` with the split ``keys`` (:func:`fingerprints`).

    A fresh run never reads an existing ``reference_dir`` (one left by a run that failed
    before logging a step may belong to another seed, model or warm-up): it is replaced.
    Only a resumed run reads a cache back, through its checkpoint's record
    (:func:`load_precomputed`)."""
    logps = {name: score(split) for name, split in splits.items()}
    run_id = uuid.uuid4().hex
    if rank == 0:
        C.write_atomic(
            reference_dir,
            lambda tmp: torch.save(logps, tmp / LOGPS_FILE),
            {"run_id": run_id, "fingerprints": keys},
        )
    return Reference(logps=logps, record=_record(reference_dir, output_dir, run_id))


def load_precomputed(
    record: dict, resume_from: Path, splits: dict, keys: dict, config=None
) -> Reference:
    """The cached log-probs a resumed run's checkpoint recorded, refused when a split they
    were computed on is not this run's (``keys``: :func:`fingerprints` of ``splits``)."""
    directory = locate(record, resume_from)
    marker = C.read_marker(directory)
    saved = marker.get("fingerprints")
    saved = saved if isinstance(saved, dict) else {}
    if "fingerprint" in marker:  # one key over all splits (fastalign before per-split keys)
        if marker["fingerprint"] != _joint_fingerprint(splits, config):
            raise ValueError(
                f"--resume-from {resume_from}: the data set, --eval-dataset or --max-prompt-"
                "length / --max-completion-length differ from those the precomputed reference "
                f"log-probs in {directory} were computed on"
            )
        saved = keys
    if saved.get("train") != keys["train"]:
        raise ValueError(
            f"--resume-from {resume_from}: the training data set (or --max-prompt-length / "
            "--max-completion-length) differs from the one the precomputed reference "
            f"log-probs in {directory} were computed on"
        )
    if "test" in keys and saved.get("test") != keys["test"]:
        raise ValueError(
            f"--resume-from {resume_from}: the precomputed reference in {directory} holds no "
            "log-probs of this --eval-dataset's rows, and the initial policy that would score "
            "them is not kept: resume with the eval data the run started with (or start a "
            "new run, or use --reference copy)"
        )
    cached = C.load_tensors(directory / LOGPS_FILE, "the reference log-prob cache")
    if not _sizes_match(cached, splits):
        raise ValueError(f"the reference log-prob cache {directory} does not match the data size")
    return Reference(logps={name: cached[name] for name in splits}, record=record)


def _joint_fingerprint(splits: dict, config) -> str | None:
    """The one key over all splits that caches written before per-split keys carry."""
    if config is None:
        return None
    digest = hashlib.sha256()
    settings = [config.model, config.max_prompt_length, config.max_completion_length]
    digest.update(json.dumps(settings).encode())
    for name, split in sorted(splits.items()):
        digest.update(name.encode())
        _digest_rows(digest, split)
    return digest.hexdigest()


def _sizes_match(cached, splits: dict) -> bool:
    return isinstance(cached, dict) and all(
        name in cached and tuple(cached[name].shape) == (len(split), 2)
        for name, split in splits.items()
    )


def body_hidden(body: HiddenStates, part: dict) -> torch.Tensor:
    """Hidden states of one collated part: padded ``[B, T, H]``, or packed ``[N, H]``."""
    if "cu_seqlens" in part:
        return body(
            part["input_ids"], position_ids=part["position_ids"], cu_seqlens=part["cu_seqlens"]
        )
    return body(part["input_ids"], part["attention_mask"])


@torch.no_grad()
def score_dataset(
    model, dataset, collator, *, batch_size: int, packed_attention, options: LogpOptions
) -> torch.Tensor:
    """Summed completion log-probs ``[n, 2]`` (chosen, rejected) of every row of ``dataset``
    under ``model``, float32 on the CPU."""
    body = HiddenStates(model, packed_attention).eval()
    weight, bias = head_params(model)
    device = weight.device  # the CPU for a real model still to be sharded by FSDP
    out = torch.zeros(len(dataset), 2)
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collator(rows)["policy"].items()}
        hidden = body_hidden(body, batch)
        logps = sequence_logps(
            hidden,
            weight,
            batch["labels"],
            bias=bias,
            cu_seqlens=batch.get("cu_seqlens"),
            options=options,
        ).logps.cpu()  # [2n]: chosen rows, then rejected rows
        n = len(rows)
        out[start : start + n, 0], out[start : start + n, 1] = logps[:n], logps[n:]
    body.train()
    return out
