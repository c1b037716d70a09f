"""The trainer on ten tiny architectures built from configs: the first DPO and KTO losses
(MoE router term included) equal TRL 1.16's trainers on the same rows, one step trains, and
LoRA's default targets adapt every linear layer (fused qkv, GPT-2's Conv1D) but the head."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

import transformers  # noqa: E402

from fastalign.trainer.default import default_tokenizer  # noqa: E402
from fastalign.trainer.loop import TrainConfig, Trainer  # noqa: E402
from tests.trainer_helpers import child_env, one_thread  # noqa: E402, F401

SIZE = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
IDS = dict(vocab_size=24, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GQA = dict(**SIZE, head_dim=8, num_key_value_heads=1)
MOE = dict(num_experts_per_tok=2, num_key_value_heads=1)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(**SIZE, num_key_value_heads=1)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(**SIZE, num_key_value_heads=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", GQA),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(**SIZE, num_key_value_heads=1)),
    "gemma2-softcap": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(**GQA, final_logit_softcapping=2.0, query_pre_attn_scalar=8),
    ),
    "gpt2-tied": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(**SIZE, num_key_value_heads=2)),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(**GQA, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(**SIZE, **MOE, num_local_experts=4)),
    "phi-head-bias": ("PhiConfig", "PhiForCausalLM", dict(**SIZE, resid_pdrop=0.0)),
}
PAIRS = [("1+2=", "3", "4"), ("2+2=", "4", "7"), ("5+3=", "8", "9"), ("4+0=", "4", "40")]


def _model(arch: str, seed: int):
    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(**IDS, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Per architecture: a policy and a different reference checkpoint (so the first loss
    is not the trivial log 2), plus paired and unpaired data files."""
    root = tmp_path_factory.mktemp("archs")
    tokenizer = default_tokenizer()
    paths = {}
    for arch in ARCHS:
        for name, seed in (("policy", 0), ("ref", 1)):
            _model(arch, seed).save_pretrained(root / arch / name)
            tokenizer.save_pretrained(root / arch / name)
        paths[arch] = root / arch
    paired, unpaired = root / "paired.jsonl", root / "unpaired.jsonl"
    paired.write_text("".join(json.dumps(dict(zip(("prompt", "chosen", "rejected"), p))) + "\n"
                              for p in PAIRS))  # fmt: skip
    rows = [(p, c if i % 2 == 0 else r, i % 2 == 0) for i, (p, c, r) in enumerate(PAIRS)]
    unpaired.write_text("".join(json.dumps(dict(zip(("prompt", "completion", "label"), r))) + "\n"
                                for r in rows))  # fmt: skip
    return {"root": root, "models": paths, "paired": paired, "unpaired": unpaired}


def _trainer(files, arch, loss, tmp_path, **kwargs):
    config = TrainConfig(
        loss=loss,
        model=str(files["models"][arch] / "policy"),
        dataset=str(files["paired" if loss == "dpo" else "unpaired"]),
        output_dir=str(tmp_path),
        batch_size=4,
        max_steps=1,
        logging_steps=1,
        progress=False,
        **kwargs,
    )
    return Trainer(config)


def _trl(files, arch, loss, tokenizer):
    """TRL's own trainer on the same policy, reference and data file."""
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    policy = transformers.AutoModelForCausalLM.from_pretrained(files["models"][arch] / "policy")
    ref = transformers.AutoModelForCausalLM.from_pretrained(files["models"][arch] / "ref")
    common = dict(
        output_dir=str(files["root"] / "trl"), report_to="none", use_cpu=True, bf16=False, beta=0.1
    )
    common.update(per_device_train_batch_size=4, disable_tqdm=True, max_length=None)
    if loss == "dpo":
        args, cls, data = DPOConfig(**common), DPOTrainer, files["paired"]
    else:
        args, cls, data = KTOConfig(**common), KTOTrainer, files["unpaired"]
    dataset = load_dataset("json", data_files=str(data))["train"]
    return cls(model=policy, ref_model=ref, args=args, train_dataset=dataset,
               processing_class=tokenizer)  # fmt: skip


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_first_loss_equals_trl_and_one_step_trains(files, arch, loss, tmp_path):
    kto = dict(kto_kl_offset=-1, desirable_weight=1.0, undesirable_weight=1.0)
    ours = _trainer(
        files, arch, loss, tmp_path, ref_model=str(files["models"][arch] / "ref"),
        **(kto if loss == "kto" else {}),
    )  # fmt: skip
    rows = [ours.train_set[i] for i in range(4)]
    out = ours.compute(ours.collator(rows))
    trl = _trl(files, arch, loss, ours.tokenizer)
    batch = trl.data_collator([trl.train_dataset[i] for i in range(4)])
    trl.model.train()  # as TRL's training_step does (metrics under "train")
    want = trl.compute_loss(trl.model, batch)
    trl_metrics = {k: v[-1] for k, v in trl._metrics["train"].items()}
    torch.testing.assert_close(out.loss.detach(), want.detach(), rtol=1e-5, atol=2e-6)
    metrics = out.metrics()
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-5), name
    if ours.body.router_loss is not None:  # MoE: the router term is in both, and logged
        assert metrics["aux_loss"] == pytest.approx(trl_metrics["aux_loss"], rel=1e-5)
        assert float(out.loss - out.inner.loss) == pytest.approx(
            0.001 * metrics["aux_loss"], rel=1e-4
        )
    before = [p.detach().clone() for p in ours.model.parameters()]
    ours.train()
    assert any(not torch.equal(a, p) for a, p in zip(before, ours.model.parameters()))


def test_router_loss_can_be_switched_off_and_is_refused_on_dense_models(files, tmp_path):
    off = _trainer(files, "mixtral", "dpo", tmp_path / "off", router_aux_loss=False)
    assert off.body.router_loss is None
    batch = off.collator([off.train_set[i] for i in range(4)])
    assert "aux_loss" not in off.compute(batch).metrics()
    with pytest.raises(ValueError, match="not a Mixture-of-Experts model"):
        _trainer(files, "llama", "dpo", tmp_path / "dense", router_aux_loss_coef=0.01)


LORA_TARGET = {"gpt2-tied": "c_attn", "phi3": "qkv_proj", "phi-head-bias": "dense"}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_adapts_every_linear_layer_but_the_head(files, arch, tmp_path):
    trainer = _trainer(files, arch, "kto", tmp_path, lora_rank=2, reference="peft")
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any("lm_head" in n for n in names)
    assert any(f"{LORA_TARGET.get(arch, 'v_proj')}.lora_A" in n for n in names)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(base[n], p)]
    assert changed and all("lora_" in n for n in changed)


def test_lora_flags_choose_targets_alpha_and_dropout(files, tmp_path):
    trainer = _trainer(
        files, "llama", "dpo", tmp_path, lora_rank=2, reference="peft",
        lora_target_modules="q_proj,v_proj", lora_alpha=8.0, lora_dropout=0.1,
    )  # fmt: skip
    config = trainer.model.peft_config["default"]
    assert config.target_modules == {"q_proj", "v_proj"} and config.lora_alpha == 8.0
    assert config.lora_dropout == 0.1


def test_cli_prints_only_its_own_progress(files, tmp_path):
    """A run on a saved model (weights loaded, shards written, json data generated) shows
    the run directory first and no third-party progress bar."""
    cmd = [sys.executable, "-m", "fastalign.cli", "train", "--loss", "dpo", "--max-steps", "2"]
    cmd += ["--model", str(files["models"]["llama"] / "policy"), "--batch-size", "2"]
    cmd += ["--dataset", str(files["paired"]), "--output-dir", str(tmp_path / "run")]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**child_env(), "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"run directory: {tmp_path / 'run'}"
    lines = result.stderr.replace("\r", "\n").splitlines()
    bars = [line for line in lines if re.search(r"it/s|s/it|examples/s", line)]
    assert bars and all(line.startswith("dpo:") for line in bars), bars
    assert all(f in bars[-1] for f in ("tok_s=", "scored_s=", "acc=", "<00:00"))  # rates, ETA


@pytest.mark.parametrize("arch", ["qwen3-moe", "mixtral"])
def test_router_loss_memory_is_what_the_estimate_counts(arch):
    """Bytes autograd saves because of the router loss = memory.body.router_loss_bytes."""
    from fastalign.memory.body import router_loss_bytes
    from fastalign.memory.shapes import model_shape
    from fastalign.trainer.model import HiddenStates, router_aux_loss

    model = _model(arch, seed=0)
    ids = torch.randint(3, 24, (2, 11))

    def saved_bytes(router) -> int:
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        hidden_states = HiddenStates(model, router_loss=router)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden_states(ids, torch.ones_like(ids))
        return sum(storages.values())

    extra = saved_bytes(router_aux_loss(model)) - saved_bytes(None)
    assert extra == router_loss_bytes(model_shape(model.config), ids.numel())


def test_activation_checkpointing_turns_on_every_decoder_layer():
    """Through transformers' own switch, whichever name this transformers version has: the
    layers recompute in backward (non-reentrant) and the gradients do not change."""
    from fastalign.trainer.model import enable_activation_checkpointing

    model, plain = _model("llama", seed=0), _model("llama", seed=0)
    enable_activation_checkpointing(model)
    layers = model.model.layers
    assert all(getattr(layer, "gradient_checkpointing", False) for layer in layers)
    ids = torch.arange(2, 14).view(2, 6)
    for m in (model, plain):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("names", [("activation",), ("gradient",), ("activation", "gradient"), ()])
def test_activation_checkpointing_switch_by_transformers_version(names):
    """transformers 5.17 (the GPU image's) has only ``gradient_checkpointing_enable``; newer
    versions add ``activation_checkpointing_enable`` and deprecate the old name: the new one
    is preferred, the old one is the fall-back, a model with neither is a clear error."""
    from fastalign.trainer.model import enable_activation_checkpointing

    calls = []

    class Model:
        pass

    for name in names:
        setattr(
            Model, f"{name}_checkpointing_enable", lambda self, kw, n=name: calls.append((n, kw))
        )
    if not names:
        with pytest.raises(ValueError, match="activation_checkpointing: Model has neither"):
            enable_activation_checkpointing(Model())
        return
    enable_activation_checkpointing(Model())
    assert calls == [(names[0], {"use_reentrant": False})]
