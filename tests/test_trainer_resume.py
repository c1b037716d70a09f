"""Exact resume into a new output directory (full fine-tuning, LoRA, precomputed reference,
KTO), what a checkpoint records about its reference, and refusing unsafe checkpoints."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from fastalign.trainer import checkpoint as C  # noqa: E402
from fastalign.trainer import reference as R  # noqa: E402
from fastalign.trainer.loop import TrainConfig, Trainer  # noqa: E402
from tests.trainer_helpers import malicious_checkpoint, one_thread, records  # noqa: E402, F401

FAST = dict(sft_warmup_steps=5, batch_size=4, logging_steps=1, progress=False, max_steps=4)
CASES = {
    "full": dict(loss="dpo"),
    "lora": dict(loss="dpo", reference="peft", lora_rank=4),
    "precomputed": dict(loss="dpo", reference="precomputed"),
    "kto": dict(loss="kto"),
}


def lora_b_norm(trainer: Trainer) -> float:
    return sum(
        float(p.detach().norm()) for n, p in trainer.model.named_parameters() if "lora_B" in n
    )


@pytest.mark.parametrize("case", list(CASES))
def test_resume_into_a_new_directory_equals_the_uninterrupted_run(tmp_path, case, monkeypatch):
    """4 steps straight (checkpoint at 2) vs resumed from step 2 into a fresh directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = CASES[case]
    first = tmp_path / "first"
    straight = Trainer(TrainConfig(output_dir=str(first), save_steps=2, **settings, **FAST))
    straight.train()
    assert C.is_complete(first / "checkpoint-2") and C.is_complete(first / "final")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = Trainer(
            TrainConfig(
                output_dir=str(tmp_path / "second"),
                resume_from=str(first / "checkpoint-2"),
                **settings,
                **FAST,
            )
        )
    assert not [w for w in caught if "modify" in str(w.message).lower()]  # no PEFT double wrap
    if settings.get("lora_rank"):
        assert lora_b_norm(resumed) > 0  # the trained adapter, not a fresh one
        assert all(p.requires_grad for n, p in resumed.model.named_parameters() if "lora_" in n)
        assert not any(
            p.requires_grad for n, p in resumed.model.named_parameters() if "lora_" not in n
        )
    resumed.train()
    after_straight, after_resumed = straight.model.state_dict(), resumed.model.state_dict()
    assert after_straight.keys() == after_resumed.keys()
    for name, value in after_straight.items():
        torch.testing.assert_close(after_resumed[name], value, rtol=0, atol=0, msg=name)
    # The new directory starts with the first run's steps 1-2, then logs 3-4 itself.
    assert records(tmp_path / "second") == records(first)
    assert [r["step"] for r in records(first)] == [1, 2, 3, 4]
    assert not (tmp_path / "second" / "reference").exists()  # the first run's is used


def test_resume_from_final_trains_on_and_replaces_it_whole(tmp_path):
    run = tmp_path / "run"
    Trainer(TrainConfig(loss="dpo", output_dir=str(run), **FAST)).train()
    more = {**FAST, "max_steps": 5}
    Trainer(
        TrainConfig(loss="dpo", output_dir=str(run), resume_from=str(run / "final"), **more)
    ).train()
    assert C.read_marker(run / "final") == {"step": 5}
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 5]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporaries left
    with pytest.raises(ValueError, match="already holds another run"):  # would mix metrics
        Trainer(TrainConfig(loss="dpo", output_dir=str(run), **FAST))


def test_a_resume_without_its_reference_or_with_other_settings_is_refused(tmp_path):
    run = tmp_path / "run"
    Trainer(TrainConfig(loss="dpo", output_dir=str(run), save_steps=2, **FAST)).train()
    resume = dict(resume_from=str(run / "checkpoint-2"), output_dir=str(tmp_path / "new"))
    with pytest.raises(ValueError, match=r"--beta 0\.1 \(now 0\.2\)"):
        Trainer(TrainConfig(loss="dpo", beta=0.2, **resume, **FAST))
    with pytest.raises(ValueError, match="which --max-steps 2 has reached"):
        Trainer(TrainConfig(loss="dpo", **resume, **{**FAST, "max_steps": 2}))
    (run / "reference").rename(tmp_path / "moved")
    with pytest.raises(ValueError, match="reference .* is not at"):
        Trainer(TrainConfig(loss="dpo", **resume, **FAST))
    assert not (tmp_path / "new").exists()  # no run directory left behind


def test_precomputed_cache_is_keyed_by_the_data(tmp_path):
    """Computed by every fresh run (never read back from disk), refused on resume when the
    training data changed."""
    from datasets import Dataset

    calls = []

    def score(split):
        calls.append(len(split))
        return torch.arange(2.0 * len(split)).reshape(-1, 2)

    config = TrainConfig(max_prompt_length=8)
    splits = {"train": Dataset.from_dict({"prompt": ["a", "b"], "chosen": ["x", "y"]})}
    keys = R.fingerprints(splits, config)
    made = R.precomputed(score, splits, keys, tmp_path / "reference", tmp_path, rank=0)
    again = R.precomputed(score, splits, keys, tmp_path / "reference", tmp_path, rank=0)
    assert calls == [2, 2] and again.record["run_id"] != made.record["run_id"]
    loaded = R.load_precomputed(again.record, tmp_path / "checkpoint-1", splits, keys)
    torch.testing.assert_close(loaded.logps["train"], made.logps["train"])
    changed = {"train": Dataset.from_dict({"prompt": ["a", "c"], "chosen": ["x", "y"]})}
    assert R.fingerprints(changed, config) != keys
    assert R.fingerprints(splits, TrainConfig(max_prompt_length=9)) != keys
    with pytest.raises(ValueError, match="differs from the one the precomputed reference"):
        R.load_precomputed(
            again.record, tmp_path / "checkpoint-1", changed, R.fingerprints(changed, config)
        )


def test_a_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned.txt"
    bad = malicious_checkpoint(tmp_path / "bad", target)
    with pytest.raises(ValueError, match="refused without running it"):
        Trainer(
            TrainConfig(loss="dpo", resume_from=str(bad), output_dir=str(tmp_path / "r"), **FAST)
        )
    with pytest.raises(ValueError, match="refused without running it"):
        C.load_tensors(bad / C.STATE_FILE, "the reference log-prob cache")
    assert not target.exists()
    assert not (tmp_path / "r").exists()
    # The payload is real: an unrestricted load would have run it.
    torch.load(bad / C.STATE_FILE, weights_only=False)
    assert target.read_text() == "pwned"


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    torch.save(C.rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    C.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand())
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert got[1:] == want[1:]


def test_no_unrestricted_torch_load_in_the_package():
    root = Path(__file__).resolve().parents[1] / "fastalign"
    for path in root.rglob("*.py"):
        if "kernels" in path.parts:
            continue
        text = path.read_text()
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
    assert "weights_only=True" in (root / "trainer" / "checkpoint.py").read_text()
