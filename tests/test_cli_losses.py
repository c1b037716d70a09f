"""``fastalign train`` with the new losses and DPO options, through the real CLI in a
subprocess (embedded model and data, two steps): runs, logs finite TRL-named metrics, and a
flag of another loss fails early with ``error: ...`` and exit status 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]


def _train(args: list[str], output_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "fastalign.cli", "train", *args]
    argv += ["--max-steps", "2", "--sft-warmup-steps", "2", "--batch-size", "4"]
    argv += ["--logging-steps", "1", "--output-dir", str(output_dir), "--no-progress"]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args",
    [
        ["--loss", "simpo", "--gamma", "0.3", "--nll-weight", "0.1"],
        ["--loss", "dpo", "--loss-type", "sigmoid,sft", "--loss-weights", "1,0.5"]
        + ["--ld-alpha", "0.5", "--use-weighting"],
    ],
    ids=["simpo", "dpo-rpo-ld-wpo"],
)
def test_train_runs_and_logs_metrics(args, tmp_path):
    proc = _train(args, tmp_path / "run")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if "loss" in r and "rewards/accuracies" in r]
    assert train, lines[:3]
    for record in train:
        assert all(math.isfinite(record[k]) for k in ("loss", "rewards/margins", "logps/chosen"))


def test_flag_of_another_loss_is_an_error(tmp_path):
    proc = _train(["--loss", "dpo", "--gamma", "0.3"], tmp_path / "run")
    assert proc.returncode == 2
    assert "error: --gamma does not apply to --loss dpo" in proc.stderr
    assert not (tmp_path / "run").exists()
