"""Shared by the trainer test files: one torch thread, the metrics of a run, a crafted
checkpoint whose pickle runs code, and the environment of a CLI subprocess."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny default model runs ~10x faster with one thread on a busy 2-core machine
    (threads spin while waiting for a core); the child processes get the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def child_env() -> dict[str, str]:
    """This checkout, offline (no Hub request can happen), one thread, interpreted Triton."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TRITON_INTERPRET": "1",
    }


# Wall-clock figures of a metrics.jsonl record: the only ones a resumed run cannot reproduce.
TIMING = {"tokens_per_second", "scored_tokens_per_second", "eta_seconds"}


def records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records without the wall-clock figures."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


class _Payload:
    """Unpickling this runs ``exec``: what a crafted checkpoint would do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').write('pwned')",))


def malicious_checkpoint(directory: Path, target: Path) -> Path:
    """A complete-looking checkpoint whose ``trainer_state.pt`` writes ``target`` when
    unpickled without ``weights_only``."""
    from fastalign.trainer import checkpoint as C

    directory.mkdir(parents=True)
    torch.save({"step": 1, "config": {}, "optimizer": _Payload(target)}, directory / C.STATE_FILE)
    (directory / C.MARKER).write_text('{"step": 1}\n')
    return directory
