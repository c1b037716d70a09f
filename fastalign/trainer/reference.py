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


def fingerprint(splits: dict, config) -> str:
    """SHA-256 over the rows of every split and the settings that change their log-probs."""
    digest = hashlib.sha256()
    settings = [config.model, config.max_prompt_length, config.max_completion_length]
    digest.update(json.dumps(settings).encode())
    for name, split in sorted(splits.items()):
        digest.update(name.encode())
        for column in sorted(c for c in split.column_names if c != "index"):
            digest.update(json.dumps([column, split[column]], default=str).encode())
    return digest.hexdigest()


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
        key = fingerprint(splits, config)
        if record:
            return load_precomputed(record, Path(config.resume_from), splits, key)
        return precomputed(score, splits, key, reference_dir, output_dir, rank)
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

    directory = locate(record, resume_from)
    return Reference(model=AutoModelForCausalLM.from_pretrained(directory), record=record)


def precomputed(score, splits: dict, key: str, reference_dir: Path, output_dir: Path, rank: int):
    """Reference log-probs of every split (``score(split)`` → ``[n, 2]``), computed once with
    the initial policy; an existing cache in ``reference_dir`` is reused only when its
    fingerprint ``key`` matches (the data or tokenization changed otherwise)."""
    marker = C.read_marker(reference_dir)
    if marker.get("fingerprint") == key:
        cached = C.load_tensors(reference_dir / LOGPS_FILE, "the reference log-prob cache")
        if _sizes_match(cached, splits):
            return Reference(
                logps=cached, record=_record(reference_dir, output_dir, marker["run_id"])
            )
    logps = {name: score(split) for name, split in splits.items()}
    run_id = uuid.uuid4().hex
    if rank == 0:
        C.write_atomic(
            reference_dir,
            lambda tmp: torch.save(logps, tmp / LOGPS_FILE),
            {"run_id": run_id, "fingerprint": key},
        )
    return Reference(logps=logps, record=_record(reference_dir, output_dir, run_id))


def load_precomputed(record: dict, resume_from: Path, splits: dict, key: str) -> Reference:
    """The cached log-probs a resumed run's checkpoint recorded, refused when the data set
    they were computed on is not this one."""
    directory = locate(record, resume_from)
    if C.read_marker(directory).get("fingerprint") != key:
        raise ValueError(
            f"--resume-from {resume_from}: the data set (or --max-prompt-length / "
            "--max-completion-length) differs from the one the precomputed reference "
            f"log-probs in {directory} were computed on"
        )
    cached = C.load_tensors(directory / LOGPS_FILE, "the reference log-prob cache")
    if not _sizes_match(cached, splits):
        raise ValueError(f"the reference log-prob cache {directory} does not match the data size")
    return Reference(logps=cached, record=record)


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
