"""Checkpoints that survive faults: written to a temporary directory, completed by a marker,
swapped in by rename, rotated, and read back with ``torch.load(weights_only=True)`` only.

A directory counts as a checkpoint only when its ``COMPLETE`` marker exists; the marker is the
last file written, so a kill or a full disk mid-save leaves at most a ``.tmp-*`` directory,
never a half-written checkpoint under a real name, and the previous checkpoint stays intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and why."""


# ------------------------------------------------------------------ RNG state as plain data
def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and lists (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


# ------------------------------------------------------------------ writing
def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_marker(path: Path) -> dict:
    """The JSON a complete directory's marker holds (``{}`` if it has none)."""
    try:
        return json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def write_atomic(path: Path, write: Callable[[Path], None], marker: dict) -> Path:
    """Run ``write(tmp_dir)``, write ``marker`` (JSON) as its completion marker, then swap
    the directory in at ``path``.

    An existing ``path`` (e.g. ``final`` when a resumed run trains on) is replaced only after
    the new one is complete. On any failure the temporary directory is removed and a
    :class:`CheckpointError` says what failed; ``path`` is left as it was.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> done = write_atomic(root / "final", lambda d: (d / "a").write_text("1"), {"step": 3})
        >>> read_marker(done), sorted(p.name for p in root.iterdir())
        ({'step': 3}, ['final'])
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            old.rename(path)  # put the previous checkpoint back
        if not isinstance(err, Exception):
            raise
        what = getattr(err, "filename", None) or path
        reason = getattr(err, "strerror", None) or err
        raise CheckpointError(
            f"saving checkpoint {path} failed writing {what}: {reason}; nothing was left "
            "behind and earlier checkpoints are intact"
        ) from err
    shutil.rmtree(old, ignore_errors=True)
    return path


def save_state(state: dict, directory: Path) -> None:
    """``trainer_state.pt``: tensors, numbers, strings, lists and dicts only."""
    torch.save(state, Path(directory) / STATE_FILE)


def step_checkpoints(output_dir: Path) -> list[Path]:
    """Complete ``checkpoint-N`` directories of a run, oldest first."""
    found = []
    for child in Path(output_dir).glob("checkpoint-*"):
        match = _STEP_DIR.match(child.name)
        if match and is_complete(child):
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def rotate(output_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Delete the oldest complete ``checkpoint-N`` beyond the newest ``keep`` (0: keep all),
    never ``protect`` (the checkpoint this run resumed from)."""
    if keep <= 0:
        return
    old = step_checkpoints(output_dir)[:-keep]
    for path in old:
        if protect is None or path.resolve() != Path(protect).resolve():
            shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(output_dir: Path) -> None:
    """``.NAME.tmp-PID`` directories left by a process killed mid-save."""
    for child in Path(output_dir).glob(".*.tmp-*"):
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


# ------------------------------------------------------------------ reading
def load_tensors(path: Path, what: str) -> object:
    """``torch.load(path, weights_only=True)``: a pickle that would build any other object
    (and so could run code) is refused with a :class:`ValueError` naming ``what``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{what}: {path} does not exist") from None
    except Exception as err:  # UnpicklingError for foreign globals, RuntimeError if truncated
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{what}: {path} is not a plain-tensor trainer file and was refused without "
            f"running it ({type(err).__name__}: {first})"
        ) from None


def read_state(checkpoint: Path) -> dict:
    """The trainer state of a complete checkpoint directory (``--resume-from``); a missing,
    incomplete (interrupted save) or unsafe one is a :class:`ValueError`."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"--resume-from {checkpoint}: no such checkpoint directory")
    if not is_complete(checkpoint):
        raise ValueError(
            f"--resume-from {checkpoint}: no {MARKER} marker, so its save did not finish (or it "
            "is not a fastalign checkpoint); resume from an earlier checkpoint-N"
        )
    state = load_tensors(checkpoint / STATE_FILE, f"--resume-from {checkpoint}")
    if not isinstance(state, dict) or not {"step", "config", "optimizer"} <= set(state):
        raise ValueError(f"--resume-from {checkpoint}: {STATE_FILE} is not a trainer state")
    types = {"config": dict, "step": int, "optimizer": dict}
    wrong = [k for k, kind in types.items() if not isinstance(state[k], kind)]
    if wrong or isinstance(state["step"], bool):
        name = (wrong or ["step"])[0]
        raise ValueError(
            f"--resume-from {checkpoint}: {STATE_FILE} is not a trainer state (its {name!r} is "
            f"{type(state[name]).__name__}, expected {types[name].__name__})"
        )
    return state


# ------------------------------------------------------------------ a trainer's checkpoint
def save_run(trainer, path: Path) -> Path | None:
    """Write ``trainer``'s checkpoint atomically (:func:`write_atomic`): the policy (LoRA:
    the adapter, plus the embedded default's base), tokenizer and trainer state. Under
    FSDP a collective; rank 0 writes. Returns the directory (None on other ranks)."""
    model_state, optimizer_state = None, trainer.optimizer.state_dict()
    if trainer.fsdp_root is not None:  # a collective: all ranks gather, rank 0 writes
        from .fsdp import full_state

        model_state, optimizer_state = full_state(trainer.model, trainer.optimizer)
    if trainer.rank != 0:
        return None
    state = {
        "optimizer": optimizer_state,
        "scheduler": trainer.scheduler.state_dict(),
        "rng": rng_state(),
        "step": trainer.step,
        "world": trainer.world,
        "window": trainer.window,
        "before": trainer.before or {},
        "reference": trainer.reference.record,
        "config": asdict(trainer.config),
    }

    def write(directory: Path) -> None:
        extra = {} if model_state is None else {"state_dict": model_state}
        trainer.model.save_pretrained(directory / "model", **extra)
        trainer.tokenizer.save_pretrained(directory / "model")
        if trainer.config.lora_rank and trainer.is_default:
            from .policy import save_base

            save_base(trainer.model, directory / "base", model_state)
        save_state(state, directory)

    return write_atomic(path, write, {"step": trainer.step})


def restore_run(trainer, state: dict) -> None:
    """Into ``trainer``: optimizer, schedule, RNG, step and logging window of ``--resume-from``; the
    metrics file keeps the steps up to the checkpoint's (copied over in a new directory)."""
    if trainer.fsdp_root is not None:  # full, parameter-name keyed (fsdp.full_state)
        from .fsdp import load_optimizer

        load_optimizer(trainer.model, trainer.optimizer, state["optimizer"])
    else:
        trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    trainer.step, trainer.window, trainer.before = state["step"], state["window"], state["before"]
    if trainer.rank == 0:
        source = Path(trainer.config.resume_from).parent / "metrics.jsonl"
        truncate_metrics(trainer.output_dir / "metrics.jsonl", trainer.step, source)


# ------------------------------------------------------------------ metrics.jsonl
def truncate_metrics(metrics: Path, step: int, source: Path | None = None) -> None:
    """Keep the records of steps ``≤ step`` in ``metrics`` (a resumed run logs the later ones
    again). A fresh ``metrics`` starts from ``source`` (the resumed run's file) if it exists."""
    origin = metrics if metrics.exists() else source
    if origin is None or not origin.exists():
        return
    kept = []
    for line in origin.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # blank, or cut short by a kill mid-write: after the checkpoint
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = metrics.with_name(metrics.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(metrics)
