"""What a run reads back from disk: its precomputed reference (never a stale cache left by
another run, keyed per split so a new eval set is named), and corrupt, truncated or crafted
checkpoint files and a diverged run reported as one ``error:`` line, never a traceback."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from fastalign.trainer import checkpoint as C  # noqa: E402
from fastalign.trainer import reference as R  # noqa: E402
from fastalign.trainer.loop import TrainConfig, Trainer  # noqa: E402
from tests.test_cli_errors import assert_clean_error, run_cli  # noqa: E402
from tests.trainer_helpers import _Payload, one_thread, records  # noqa: E402, F401

FAST = dict(batch_size=4, logging_steps=1, progress=False, max_steps=1)
PRE = dict(loss="dpo", reference="precomputed", **FAST)


def test_a_fresh_run_never_reads_a_stale_reference_cache(tmp_path, monkeypatch):
    """A run that stopped before its first step leaves ``reference/`` only; the next run into
    that directory with another initial policy scores its own reference (step 1: policy =
    reference, loss ln 2), equal to the same run in a new directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stale = Trainer(TrainConfig(output_dir=str(tmp_path / "run"), sft_warmup_steps=5, **PRE))
    assert (tmp_path / "run" / "reference").is_dir()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    again = Trainer(TrainConfig(output_dir=str(tmp_path / "run"), sft_warmup_steps=1, **PRE))
    fresh = Trainer(TrainConfig(output_dir=str(tmp_path / "new"), sft_warmup_steps=1, **PRE))
    for split in ("train", "test"):
        torch.testing.assert_close(again.ref_logps[split], fresh.ref_logps[split])
        assert not torch.allclose(again.ref_logps[split], stale.ref_logps[split])
    cached = C.load_tensors(tmp_path / "run" / "reference" / R.LOGPS_FILE, "cache")
    torch.testing.assert_close(cached["train"], fresh.ref_logps["train"])
    again.train()
    first = records(tmp_path / "run")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


def test_the_fingerprint_is_per_split_and_covers_the_initial_policy():
    from datasets import Dataset

    split = Dataset.from_dict({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z"] * 2})
    other = Dataset.from_dict({"prompt": ["c"], "chosen": ["x"], "rejected": ["z"]})
    base = TrainConfig()
    keys = R.fingerprints({"train": split}, base)
    assert R.fingerprints({"train": split, "test": other}, base)["train"] == keys["train"]
    for change in (
        dict(seed=1),
        dict(sft_warmup_steps=299),
        dict(model="some/model"),
        dict(bf16=True),
        dict(max_prompt_length=8),
        dict(max_completion_length=8),
    ):
        assert R.fingerprint(split, TrainConfig(**change)) != keys["train"], change
    assert R.fingerprint(other, base) != keys["train"]


def test_resuming_with_a_new_eval_set_names_the_eval_set(tmp_path, monkeypatch):
    """The training split's cache still matches; the new eval rows have no reference scores
    (the initial policy is gone), which the refusal says instead of "the data set differs"."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    Trainer(TrainConfig(output_dir=str(run), sft_warmup_steps=1, **PRE)).train()
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 4
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    resume = dict(resume_from=str(run / "final"), sft_warmup_steps=1, **{**PRE, "max_steps": 2})
    with pytest.raises(ValueError, match="holds no log-probs of this --eval-dataset"):
        Trainer(TrainConfig(output_dir=str(tmp_path / "b"), eval_dataset=str(eval_file), **resume))
    assert len(Trainer(TrainConfig(output_dir=str(tmp_path / "c"), **resume)).train_set) > 0


def test_a_cache_keyed_over_all_splits_still_resumes(tmp_path):
    """Caches written before per-split keys: the same data resumes, other data is refused."""
    from datasets import Dataset

    config = TrainConfig(max_prompt_length=8)
    splits = {"train": Dataset.from_dict({"prompt": ["a", "b"], "chosen": ["x", "y"]})}
    logps = {"train": torch.arange(4.0).reshape(2, 2)}
    marker = {"run_id": "r1", "fingerprint": R._joint_fingerprint(splits, config)}
    C.write_atomic(tmp_path / "reference", lambda d: torch.save(logps, d / R.LOGPS_FILE), marker)
    record = {"path": str(tmp_path / "reference"), "relative": "reference", "run_id": "r1"}
    keys = R.fingerprints(splits, config)
    ref = R.load_precomputed(record, tmp_path / "checkpoint-1", splits, keys, config)
    torch.testing.assert_close(ref.logps["train"], logps["train"])
    changed = {"train": Dataset.from_dict({"prompt": ["a", "c"], "chosen": ["x", "y"]})}
    with pytest.raises(ValueError, match="--eval-dataset or --max-prompt-length"):
        keys = R.fingerprints(changed, config)
        R.load_precomputed(record, tmp_path / "checkpoint-1", changed, keys, config)


# ------------------------------------------------------------------ corrupt checkpoints
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full-copy and a LoRA run of one step each, their ``final`` checkpoints resumable."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("copy", {}), ("lora", dict(reference="peft", lora_rank=4))):
        config = TrainConfig(loss="dpo", output_dir=str(root / name), sft_warmup_steps=1, **FAST)
        for key, value in extra.items():
            setattr(config, key, value)
        Trainer(config).train()
    return root


def _resume_flags(run: Path, output: Path, *extra: str) -> list[str]:
    flags = ["train", "--loss", "dpo", "--batch-size", "4", "--max-steps", "2", "--no-progress"]
    return [*flags, "--sft-warmup-steps", "1", "--logging-steps", "1", *extra] + [
        "--resume-from",
        str(run / "final"),
        "--output-dir",
        str(output),
    ]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt(case: str, run: Path, tmp_path: Path) -> tuple[Path, list[str], str]:
    """A copy of ``run`` with one file broken; the flags and the file the error names."""
    copy = tmp_path / case
    shutil.copytree(run, copy)
    model = copy / "final" / "model"
    if case == "truncated model":
        _truncate(model / "model.safetensors")
        return copy, [], "model.safetensors"
    if case == "pickled model":
        (model / "model.safetensors").unlink()
        torch.save({"w": _Payload(tmp_path / "pwned.txt")}, model / "pytorch_model.bin")
        return copy, [], "pytorch_model.bin"
    if case == "corrupt reference copy":
        (copy / "reference" / "model.safetensors").write_bytes(b"\x00" * 100)
        return copy, [], "reference"
    _truncate(model / "adapter_model.safetensors")  # "corrupt LoRA adapter"
    return copy, ["--reference", "peft", "--lora-rank", "4"], "adapter_model.safetensors"


@pytest.mark.parametrize(
    "case",
    ["truncated model", "pickled model", "corrupt reference copy", "corrupt LoRA adapter"],
)
def test_a_corrupt_checkpoint_is_an_error_naming_the_file(runs, tmp_path, case):
    source = runs / ("lora" if "LoRA" in case else "copy")
    broken, extra, named = _corrupt(case, source, tmp_path)
    proc = run_cli(*_resume_flags(broken, tmp_path / "out", *extra))
    assert_clean_error(proc, named)
    assert str(broken) in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "pwned.txt").exists()  # nothing was unpickled unsafely


def test_a_state_whose_config_is_not_a_table_is_refused(runs, tmp_path):
    broken = tmp_path / "copy"
    shutil.copytree(runs / "copy", broken)
    state_file = broken / "final" / C.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    C.save_state({**state, "config": "dpo"}, state_file.parent)
    with pytest.raises(ValueError, match="its 'config' is str, expected dict"):
        C.read_state(broken / "final")
    C.save_state({**state, "step": "2"}, state_file.parent)
    with pytest.raises(ValueError, match="its 'step' is str, expected int"):
        C.read_state(broken / "final")
    C.save_state({**state, "config": "dpo"}, state_file.parent)
    proc = run_cli(*_resume_flags(broken, tmp_path / "out"))
    assert_clean_error(proc, "is not a trainer state")


def test_a_diverged_run_prints_one_error_line(tmp_path):
    out = tmp_path / "run"
    flags = ["--learning-rate", "1e8", "--max-grad-norm", "1e30", "--warmup-ratio", "0"]
    proc = run_cli(
        "train", "--loss", "dpo", "--batch-size", "4", "--max-steps", "6", "--no-progress",
        "--sft-warmup-steps", "5", "--output-dir", str(out), *flags,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss") and "at step " in last, proc.stderr[-2000:]
    assert "--learning-rate" in last and "Traceback" not in proc.stderr
