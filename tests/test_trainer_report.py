"""What a run reports: TensorBoard / W&B (offline) records with metrics.jsonl's names,
periodic evaluation on a separate file, the bar's figures, and conversational sampling."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("transformers")

from fastalign.trainer import report  # noqa: E402
from fastalign.trainer.loop import TrainConfig, Trainer  # noqa: E402

FAST = dict(sft_warmup_steps=2, batch_size=4, logging_steps=2, progress=False)


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_eval_file_every_eval_steps_and_tensorboard_get_the_same_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    held_out = tmp_path / "held_out.jsonl"
    rows = [("1+1=", "2", "3"), ("2+3=", "5", "6"), ("4+4=", "8", "9"), ("0+7=", "7", "1")]
    held_out.write_text("".join(
        json.dumps({"chosen": p + c, "rejected": p + r}) + "\n" for p, c, r in rows
    ))  # implicit prompts  # fmt: skip
    run = tmp_path / "run"
    config = TrainConfig(
        loss="dpo", max_steps=4, eval_steps=2, eval_dataset=str(held_out), output_dir=str(run),
        report_to="tensorboard", **FAST,
    )  # fmt: skip
    trainer = Trainer(config)
    assert len(trainer.test_set) == 4
    trainer.train()
    records = _records(run)
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"eval/rewards/accuracies", "eval/rewards/margins"} <= evals[0].keys()
    train = [r for r in records if "loss" in r]
    assert {"tokens_per_second", "scored_tokens_per_second", "eta_seconds"} <= set(train[0])
    assert train[-1]["eta_seconds"] == 0 < train[0]["eta_seconds"]
    assert train[0]["tokens_per_second"] > train[0]["scored_tokens_per_second"] > 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss", "rewards/accuracies", "eval/loss", "tokens_per_second"} <= set(scalars)
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"])) for r in train]


def test_wandb_runs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    reporter = report.Reporter("wandb", tmp_path / "run", {"loss": "kto"})
    reporter.log({"loss": 0.5, "kl": 0.1, "step": 3, "bad": float("nan")}, step=3)
    reporter.close()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_unknown_or_missing_reporter_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="report_to must be one of"):
        Trainer(TrainConfig(loss="dpo", report_to="mlflow", output_dir=str(tmp_path), **FAST))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"pip install 'fastalign\[wandb\]'"):
        report.check_report_to("wandb")


def test_bar_shows_the_losss_own_figure():
    paired = report.bar_figures({"loss": 0.69, "rewards/accuracies": 0.75, "kl": 0.0})
    assert paired == {"loss": "0.6900", "acc": "0.75"}
    kto = report.bar_figures({"loss": 0.5, "rewards/margins": 0.25, "kl": 0.125, "aux_loss": 2})
    assert kto == {"loss": "0.5000", "margin": "0.250", "kl": "0.125", "aux": "2.000"}


def test_kto_offset_flag_picks_trls_pairing(tmp_path):
    trainer = Trainer(TrainConfig(loss="kto", kto_kl_offset=-1, output_dir=str(tmp_path), **FAST))
    rows = [trainer.train_set[i] for i in range(3)]
    batch = trainer.collator(rows)
    completions = [trainer.collator.encode_row(r, ("completion",))[0].completion for r in rows]
    row0 = batch["kl"]["labels"][0]
    assert row0[row0 != -100].tolist() == completions[-1]  # x_0 with y_(m-1), as TRL
    with pytest.raises(ValueError, match="kto.kl.offset must be 1 or -1"):
        Trainer(TrainConfig(loss="kto", kto_kl_offset=2, output_dir=str(tmp_path / "b"), **FAST))


def test_sample_handles_conversational_prompts():
    from fastalign.trainer.default import default_model, default_tokenizer
    from fastalign.trainer.sample import prompt_ids, sample_completions

    tokenizer = default_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.chat_template += "{% if add_generation_prompt %}={% endif %}"
    model = default_model(tokenizer)
    prompts = ["1+1=", [{"role": "user", "content": "2+2"}]]
    assert (
        prompt_ids(tokenizer, prompts[1])
        == tokenizer("2+2=", add_special_tokens=False)["input_ids"]
    )
    out = sample_completions(model, tokenizer, prompts, max_new_tokens=3, seed=0)
    assert isinstance(out[0], str)
    assert out[1][0]["role"] == "assistant" and isinstance(out[1][0]["content"], str)
    again = sample_completions(model, tokenizer, prompts, max_new_tokens=3, seed=0)
    assert again == out and model.training  # same draws with the same seed; mode restored


def test_every_train_flag_has_help_with_its_default():
    import argparse

    from fastalign.cli import _train_parser

    sub = argparse.ArgumentParser().add_subparsers()
    _train_parser(sub)
    parser = sub.choices["train"]
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 40
    for action in flags:
        assert action.help, action.option_strings
        assert action.dest == "loss" or "default" in action.help, action.option_strings
    text = parser.format_help()
    assert "TRL's default is 1.0" in text and "-1 as TRL" in text  # KTO λ and pairing
