"""The trainer on the embedded default: every loss runs, resumes exactly, references agree,
errors are clear, and each model family scores as its own forward does."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import fastalign  # noqa: E402
from fastalign import LogpOptions  # noqa: E402
from fastalign.trainer.default import tiny_config  # noqa: E402
from fastalign.trainer.loop import DivergedError, TrainConfig, Trainer  # noqa: E402
from fastalign.trainer.model import HiddenStates, head_params, lm_head  # noqa: E402
from tests.trainer_helpers import one_thread  # noqa: E402, F401

FAST = dict(sft_warmup_steps=5, batch_size=4, logging_steps=1, progress=False)


def losses_of(run_dir):
    return [
        json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize("loss", ["dpo", "ipo", "kto", "typo"])
def test_three_steps_of_each_loss(tmp_path, loss):
    trainer = Trainer(TrainConfig(loss=loss, max_steps=3, output_dir=str(tmp_path), **FAST))
    summary = trainer.train()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().split("\n") if x]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    expected = "kl" if loss == "kto" else "rewards/accuracies"
    assert expected in records[0] and "rewards/chosen" in records[0]
    assert (tmp_path / "final" / "model" / "config.json").exists()
    assert summary["steps"] == 3


def test_kto_microbatches_do_not_warn_about_the_class_ratio(tmp_path, recwarn):
    """The class weights are chosen on the data set; per-microbatch ratios are not flagged."""
    Trainer(TrainConfig(loss="kto", max_steps=4, output_dir=str(tmp_path), **FAST)).train()
    assert not [w for w in recwarn if "λ_D·n_D/" in str(w.message)]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    full = Trainer(TrainConfig(loss="dpo", max_steps=6, output_dir=str(tmp_path / "a"), **FAST))
    full.train()
    config = TrainConfig(
        loss="dpo", max_steps=6, save_steps=3, output_dir=str(tmp_path / "b"), **FAST
    )
    crashed = Trainer(config)
    compute = crashed.compute

    def crash_after_step_3(batch, train=True):
        if crashed.step == 3:
            raise KeyboardInterrupt
        return compute(batch, train)

    monkeypatch.setattr(crashed, "compute", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    config.resume_from = str(tmp_path / "b" / "checkpoint-3")
    Trainer(config).train()
    assert losses_of(tmp_path / "b") == losses_of(tmp_path / "a")
    assert len(losses_of(tmp_path / "a")) == 6


def _first_loss(tmp_path, **kwargs):
    config = TrainConfig(loss="dpo", max_steps=1, output_dir=str(tmp_path), **{**FAST, **kwargs})
    trainer = Trainer(config)
    batch = next(trainer._stream())
    return trainer, trainer.compute(batch)


def test_peft_disabled_reference_equals_frozen_copy(tmp_path):
    pytest.importorskip("peft")
    _, copy_out = _first_loss(tmp_path / "copy", lora_rank=4, reference="copy")
    trainer, peft_out = _first_loss(tmp_path / "peft", lora_rank=4, reference="peft")
    torch.testing.assert_close(peft_out.loss, copy_out.loss, rtol=1e-6, atol=1e-6)
    assert trainer.ref_model is None  # no second model in memory


def test_precomputed_reference_equals_streamed(tmp_path):
    streaming, streamed = _first_loss(tmp_path / "s", reference="copy")
    trainer, cached = _first_loss(tmp_path / "p", reference="precomputed")
    torch.testing.assert_close(cached.loss, streamed.loss, rtol=1e-5, atol=1e-6)
    # The held-out split is cached too, so after training evaluation still scores against
    # the initial policy, as the streamed frozen copy does.
    trainer.train()
    streaming.train()
    held_out, held_out_streamed = trainer.evaluate(), streaming.evaluate()
    assert held_out_streamed["eval/rewards/margins"] != 0.0
    assert held_out.keys() == held_out_streamed.keys() and held_out
    for name, value in held_out_streamed.items():
        assert held_out[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert (tmp_path / "p" / "reference" / "ref_logps.pt").exists()
    assert trainer.ref_model is None


@pytest.mark.parametrize("loss", ["simpo", "orpo", "cpo", "typo"])
def test_reference_free_losses_make_no_reference(loss, tmp_path, monkeypatch):
    """A loss that never reads a reference gets none: no copy made, saved or held (one model's
    parameters), and the run is the one a forced reference copy gives, step for step."""
    from fastalign.trainer import reference as R

    copies = []
    frozen_copy = R.frozen_copy
    monkeypatch.setattr(R, "frozen_copy", lambda *a: copies.append(1) or frozen_copy(*a))
    config = dict(loss=loss, max_steps=2, **FAST)
    lean = Trainer(TrainConfig(output_dir=str(tmp_path / "lean"), **config))
    assert lean.ref_model is None and lean.ref_logps is None and not copies
    assert not (tmp_path / "lean" / "reference").exists()
    lean.train()
    monkeypatch.setattr(Trainer, "_needs_reference", lambda self: True)  # the old behaviour
    forced = Trainer(TrainConfig(output_dir=str(tmp_path / "forced"), **config))
    assert copies == [1] and (tmp_path / "forced" / "reference").exists()
    size = sum(p.numel() for p in lean.model.parameters())
    assert sum(p.numel() for p in forced.ref_model.parameters()) == size
    forced.train()
    assert losses_of(tmp_path / "lean") == losses_of(tmp_path / "forced")


def test_nan_loss_stops_without_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(
        TrainConfig(loss="dpo", max_steps=5, save_steps=1, output_dir=str(tmp_path), **FAST)
    )
    compute = trainer.compute

    def poisoned(batch, train=True):
        out = compute(batch, train)
        if trainer.step == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer, "compute", poisoned)
    with pytest.raises(DivergedError, match="at step 3, microbatch 0"):
        trainer.train()
    assert (tmp_path / "checkpoint-2").exists()
    assert not (tmp_path / "checkpoint-3").exists() and not (tmp_path / "final").exists()


def test_data_errors_name_the_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2"}\n')
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['rejected'\]"):
        Trainer(TrainConfig(loss="dpo", dataset=str(bad), output_dir=str(tmp_path / "r"), **FAST))
    kto = tmp_path / "kto.jsonl"
    kto.write_text('{"prompt": "1+1=", "completion": "2", "label": 1}\n')
    with pytest.raises(ValueError, match="line 1: column 'label' must be true or false"):
        Trainer(TrainConfig(loss="kto", dataset=str(kto), output_dir=str(tmp_path / "k"), **FAST))
    with pytest.raises(ValueError, match="--max-completion-length must be an integer ≥ 1"):
        Trainer(
            TrainConfig(loss="dpo", max_completion_length=0, output_dir=str(tmp_path / "e"), **FAST)
        )
    with pytest.raises(ValueError, match="unknown loss 'rlhf'"):
        Trainer(TrainConfig(loss="rlhf", output_dir=str(tmp_path / "o")))


def test_model_without_lm_head_is_rejected():
    from transformers import LlamaConfig, LlamaModel

    bare = LlamaModel(
        LlamaConfig(
            vocab_size=20,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    with pytest.raises(ValueError, match="has no lm_head"):
        lm_head(bare)


def test_cli_help_and_errors(capsys):
    from fastalign.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0 and "--loss" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--loss", "rlhf"])
    assert exit_info.value.code == 2
    assert main(["plot", "/nonexistent-run"]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"final_logit_softcapping": 2.0, "head_dim": 8},
    ),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scores_match_the_models_own_logits(family):
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    config_class = getattr(transformers, config_name)
    config = tiny_config(
        vocab_size=61, hidden_size=16, num_attention_heads=2, config_class=config_class, **extra
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    ids = torch.randint(0, 61, (2, 9))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
        want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        want = (want * (labels[:, 1:] != -100)).sum(-1)
        hidden = HiddenStates(model)(ids, mask)
        weight, bias = head_params(model)
        got = fastalign.sequence_logps(
            hidden, weight, labels, bias=bias, options=LogpOptions.from_config(config, shift=True)
        ).logps
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def _two_forwards(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the same batch twice, in training mode (dropout, if on, differs)."""
    model.train()
    ids = torch.randint(4, 18, (2, 8))
    with torch.no_grad():
        return tuple(model(input_ids=ids).logits for _ in range(2))


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_off_by_default_as_trl(disable, tmp_path):
    """A model whose config has attention dropout 0.5: the trainer turns it off in the policy
    and the reference (TRL's disable_dropout=True), unless disable_dropout=False."""
    from transformers import LlamaForCausalLM

    from fastalign.trainer.default import default_tokenizer

    tokenizer = default_tokenizer()
    LlamaForCausalLM(tiny_config(tokenizer, attention_dropout=0.5)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    config = TrainConfig(
        loss="dpo", model=str(tmp_path / "m"), max_steps=1, output_dir=str(tmp_path / "run"),
        disable_dropout=disable, **{**FAST, "sft_warmup_steps": 300},  # (--model: no SFT)
    )  # fmt: skip
    trainer = Trainer(config)
    for model in (trainer.model, trainer.ref_model):
        first, second = _two_forwards(model)
        assert torch.equal(first, second) == disable


def test_disable_dropout_reaches_every_dropout_module():
    """GPT-2 keeps its dropout in nn.Dropout modules (embedding, attention, residual)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastalign.trainer.policy import disable_dropout

    config = GPT2Config(vocab_size=18, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)  # resid/embd/attn dropout 0.1 each
    first, second = _two_forwards(model)
    assert not torch.equal(first, second)
    assert disable_dropout(model) == 1 + 2 * 3  # embd; per layer attn, resid (attn), resid (mlp)
    first, second = _two_forwards(model)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert disable_dropout(model) == 0


def test_cli_no_disable_dropout_flag():
    import subprocess
    import sys

    from tests.trainer_helpers import child_env

    command = [sys.executable, "-m", "fastalign.cli", "train", "--help"]
    proc = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    help_text = " ".join(proc.stdout.split())
    assert "--disable-dropout, --no-disable-dropout" in help_text
    assert "as TRL's disable_dropout=True" in help_text
