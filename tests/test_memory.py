"""fastalign.memory: parameter counts vs HF models, estimates vs measured peaks, presets, CLI."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch
import transformers

from fastalign import cli, tiles
from fastalign.memory import count_parameters, estimate, model_shape, parse_bytes
from fastalign.memory.loss import store_group_tokens
from fastalign.memory.step import resolve_step
from fastalign.profiling import cpu_probe_available

TINY = {
    **dict(vocab_size=101, hidden_size=32, intermediate_size=72),
    **dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
}


def _configs():
    yield "llama", transformers.LlamaConfig(**TINY)
    yield (
        "llama-tied-bias",
        transformers.LlamaConfig(
            **TINY, tie_word_embeddings=True, attention_bias=True, mlp_bias=True
        ),
    )
    yield "llama-mha-headdim", transformers.LlamaConfig(**{**TINY, "num_key_value_heads": 4})
    yield "qwen2", transformers.Qwen2Config(**TINY)
    yield "qwen3", transformers.Qwen3Config(**TINY, head_dim=16)
    moe = dict(moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2)
    if hasattr(transformers, "Qwen3MoeConfig"):
        yield (
            "qwen3-moe",
            transformers.Qwen3MoeConfig(**TINY, **moe, head_dim=8, mlp_only_layers=[1]),
        )
    if hasattr(transformers, "Qwen2MoeConfig"):
        yield (
            "qwen2-moe",
            transformers.Qwen2MoeConfig(
                **TINY, **moe, shared_expert_intermediate_size=24, decoder_sparse_step=2
            ),
        )


CONFIGS = list(_configs())


@pytest.mark.parametrize("name,config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_parameter_count_matches_hf_model(name, config):
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    expected = sum(p.numel() for p in model.parameters())
    assert count_parameters(config)["total"] == expected
    # the same through a dict and a config.json-style mapping
    assert count_parameters(config.to_dict())["total"] == expected


def test_config_json_path(tmp_path):
    config = transformers.LlamaConfig(**TINY)
    config.save_pretrained(tmp_path)
    assert count_parameters(tmp_path)["total"] == count_parameters(config)["total"]
    assert count_parameters(tmp_path / "config.json") == count_parameters(config)


def test_presets_orders_of_magnitude():
    qwen3 = count_parameters("Qwen/Qwen3-30B-A3B")
    assert 30.4e9 < qwen3["total"] < 30.6e9  # "30.5B"
    assert 3.2e9 < qwen3["active"] < 3.4e9  # "A3B" (3.3B activated)
    assert 32.5e9 < count_parameters("Qwen/Qwen2.5-32B")["total"] < 32.9e9
    assert 8.0e9 < count_parameters("meta-llama/Llama-3.1-8B")["total"] < 8.1e9
    shape = model_shape("Qwen/Qwen3-30B-A3B")
    assert (shape.num_experts, shape.num_experts_per_tok, shape.dense_layers) == (128, 8, 0)


@pytest.mark.parametrize("model", ["Qwen/Qwen3-30B-A3B", "Qwen/Qwen2.5-32B"])
@pytest.mark.parametrize("loss", ["dpo", "kto", "typo"])
def test_presets_fused_below_eager(model, loss):
    est = estimate(
        model,
        batch_size=2,
        seq_len=4096,
        loss=loss,
        world_size=8,
        sharding="fsdp",
        activation_checkpointing=True,
    )
    gib = 1 << 30
    assert est.total("fused") < est.total("eager")
    # per-GPU shard of fp32 master weights: ~total·4/8 bytes, tens of GiB, not TiB
    assert 10 * gib < est.fused.parts["weights"] < 20 * gib
    # eager's loss buffers hold three fp32 [N, V] tensors at once (V ≈ 152k)
    tokens = est.setup["policy_tokens"]
    assert tokens == (2 if loss == "kto" else 4) * 4096
    assert est.eager.parts["loss buffers"] >= 3 * tokens * 151936 * 4
    assert est.fused.parts["loss buffers"] < est.eager.parts["loss buffers"] / 2
    assert est.fits("1000GB", "fused") and not est.fits("1GB", "fused")


@pytest.mark.parametrize("loss", ["simpo", "orpo", "cpo"])
@pytest.mark.parametrize("grad_mode", ["auto", "recompute"])
def test_reference_free_losses_score_the_policy_rows_alone(loss, grad_mode):
    """SimPO/ORPO/CPO: the pairs' policy rows, no reference (weights, rows or forward); the
    chosen rows' NLL comes from the same launch, so every term is TYPO's without samples."""
    args = dict(config_or_name="meta-llama/Llama-3.1-8B", batch_size=2, seq_len=128)
    est = estimate(**args, loss=loss, grad_mode=grad_mode)
    typo = estimate(**args, loss="typo", grad_mode=grad_mode)
    dpo = estimate(**args, loss="dpo", grad_mode=grad_mode)
    assert (est.eager, est.fused) == (typo.eager, typo.fused)
    assert est.setup["policy_tokens"] == dpo.setup["policy_tokens"] == 4 * 128
    assert est.setup["reference_tokens"] == 0 < dpo.setup["reference_tokens"]
    for path in ("eager", "fused"):
        parts = est.path(path).parts
        assert parts["reference weights"] == parts["reference forward"] == 0
        assert est.total(path) < dpo.total(path)
    assert not any("reference: a frozen copy" in note for note in est.assumptions)
    nll_note = [note for note in est.assumptions if "chosen rows' NLL" in note]
    assert len(nll_note) == (loss != "simpo")


def test_cli_reference_free_losses_subprocess():
    argv = [sys.executable, "-m", "fastalign.memory", "meta-llama/Llama-3.1-8B"]
    argv += ["--batch-size", "2", "--seq-len", "128", "--json", "--loss"]
    for loss in ("simpo", "orpo", "cpo"):
        run = subprocess.run(argv + [loss], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        expected = estimate("meta-llama/Llama-3.1-8B", 2, 128, loss=loss, dtype="bf16").to_dict()
        assert json.loads(run.stdout) == json.loads(json.dumps(expected))
        assert expected["setup"]["reference_tokens"] == 0


def test_lora_and_checkpointing_shrink():
    full = estimate("meta-llama/Llama-3.1-8B", 1, 2048)
    lora = estimate("meta-llama/Llama-3.1-8B", 1, 2048, lora=16)
    ckpt = estimate("meta-llama/Llama-3.1-8B", 1, 2048, activation_checkpointing=True)
    assert lora.trainable_params < full.trainable_params / 100
    assert lora.fused.parts["optimizer states"] < full.fused.parts["optimizer states"] / 100
    assert lora.eager.parts["reference weights"] == 0  # the adapter-disabled policy
    assert ckpt.fused.parts["activations"] < full.fused.parts["activations"] / 5
    typo = estimate("meta-llama/Llama-3.1-8B", 1, 2048, loss="typo")
    assert typo.fused.parts["reference weights"] == 0


# ----------------------------------------------------------------------------- store path
@pytest.mark.parametrize("loss", ["dpo", "kto"])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_store_path_holds_gradients_from_forward_to_backward(loss, device):
    args = ("meta-llama/Llama-3.1-8B", 4, 128)
    recompute = estimate(*args, loss=loss, device=device, grad_mode="recompute")
    store = estimate(*args, loss=loss, device=device, grad_mode="store")
    assert (recompute.setup["grad_mode"], store.setup["grad_mode"]) == ("recompute", "store")
    assert store.eager == recompute.eager
    # the default is the losses' default, "auto": the store path with a trainable head
    default = estimate(*args, loss=loss, device=device)
    assert (default.setup["grad_mode"], default.fused) == ("store", store.fused)
    v, h = 128256, 4096
    tokens = store.setup["policy_tokens"]
    held = v * h * 4 + tokens * h * 4  # fp32 lm_head accumulator, fp32 grad_hidden rows
    assert store.fused.parts["loss buffers"] >= held
    # held through the loss forward, unlike the recompute path
    forward = "forward + reference"
    assert store.fused.phases[forward] - recompute.fused.phases[forward] >= held / 2
    step = resolve_step(*args, **_options(loss=loss, device=device, grad_mode="store"))
    group = store_group_tokens(step)
    unit = (1 if loss == "kto" else 2) * 128
    assert 0 < group <= tokens and group % unit == 0
    assert group * v * 4 <= tiles.store_group_budget(device) < (group + unit) * v * 4 or (
        group == tokens
    )


# ------------------------------------------------------------ the fused kernels (opt-in)
def test_fused_kernels_keep_no_fp32_logits(monkeypatch):
    """FASTALIGN_CUDA_KERNEL=fused (or cuda_kernel="fused"): a store group keeps
    ``exp(z − max)·s`` in the model dtype instead of fp32 logits beside it, exactly
    ``group·V·4`` bytes less; the recompute path keeps partials, not logits chunks. Setups
    the fused kernels do not take (fp32 weights, a frozen head, the CPU) are unchanged."""
    monkeypatch.delenv("FASTALIGN_CUDA_KERNEL", raising=False)
    args = ("meta-llama/Llama-3.1-8B", 4, 128)
    for grad_mode in ("store", "recompute"):
        plain = estimate(*args, grad_mode=grad_mode)
        fused = estimate(*args, grad_mode=grad_mode, cuda_kernel="fused")
        assert (plain.setup["cuda_kernel"], fused.setup["cuda_kernel"]) == ("gemm_fold", "fused")
        assert fused.eager == plain.eager
        forward = "forward + reference"
        saved = plain.fused.phases[forward] - fused.fused.phases[forward]
        if grad_mode == "store":
            step = resolve_step(*args, **_options(grad_mode="store"))
            assert saved == store_group_tokens(step) * 128256 * 4 > 0
        else:
            assert saved > 0
            buffers = plain.fused.parts["loss buffers"] - fused.fused.parts["loss buffers"]
            assert buffers > 0  # the recompute's dz chunk without fp32 logits beside it
        assert any("CUDA kernels: fused (no fp32 logits)" in n for n in fused.assumptions)
    for untaken in (dict(dtype="fp32"), dict(lora=8), dict(device="cpu")):
        plain = estimate(*args, **untaken)
        assert estimate(*args, **untaken, cuda_kernel="fused").fused == plain.fused, untaken
    # unset, the environment decides, as it does for the backend
    monkeypatch.setenv("FASTALIGN_CUDA_KERNEL", "fused")
    assert estimate(*args).fused == estimate(*args, cuda_kernel="fused").fused
    monkeypatch.setenv("FASTALIGN_CUDA_KERNEL", "cublas")
    with pytest.raises(ValueError, match="cuda_kernel"):
        estimate(*args)


def test_cli_cuda_kernel(capsys, monkeypatch):
    monkeypatch.delenv("FASTALIGN_CUDA_KERNEL", raising=False)
    argv = ["memory", "meta-llama/Llama-3.1-8B", "--batch-size", "2", "--seq-len", "128"]
    assert cli.main(argv + ["--cuda-kernel", "fused", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = estimate("meta-llama/Llama-3.1-8B", 2, 128, dtype="bf16", cuda_kernel="fused")
    assert got == json.loads(json.dumps(want.to_dict()))
    assert got["setup"]["cuda_kernel"] == "fused"


def _options(**changes):
    options = dict(
        loss="dpo",
        world_size=1,
        sharding="none",
        lora=None,
        activation_checkpointing=False,
        dtype="bfloat16",
        master_weights=None,
        optimizer_state_bytes=8,
        typo_samples=False,
        device="cuda",
        adamw=None,
        grad_mode="recompute",
    )
    return {**options, **changes}


@pytest.mark.parametrize("grad_mode", ["store", "auto"])
def test_store_path_falls_back_when_a_unit_is_over_the_budget(grad_mode):
    args = dict(config_or_name="meta-llama/Llama-3.1-8B", batch_size=2, seq_len=4096)
    store = estimate(**args, grad_mode=grad_mode)
    assert store.setup["grad_mode"] == "recompute"
    assert store.fused == estimate(**args, grad_mode="recompute").fused
    assert any("not taken" in note for note in store.assumptions)


def test_frozen_head_paths():
    """LoRA: "auto" takes the frozen-head path (no lm_head gradient, no store); an explicit
    "store" stores grad_hidden alone, as the losses do (no [V, H] accumulator)."""
    args = dict(config_or_name="meta-llama/Llama-3.1-8B", batch_size=2, seq_len=128, lora=8)
    auto, store = estimate(**args), estimate(**args, grad_mode="store")
    assert (auto.setup["grad_mode"], store.setup["grad_mode"]) == ("frozen", "store")
    assert auto.fused == estimate(**args, grad_mode="recompute").fused
    assert not any("not taken" in note for note in auto.assumptions + store.assumptions)
    full_store = estimate(**{**args, "lora": None}, grad_mode="store")
    head_fp32 = 128256 * 4096 * 4
    held = full_store.fused.parts["loss buffers"] - store.fused.parts["loss buffers"]
    assert held >= head_fp32


@pytest.mark.parametrize("grad_mode", ["auto", "store", "recompute"])
@pytest.mark.parametrize("head_trains", [True, False])
@pytest.mark.parametrize("fits", [True, False])
def test_estimated_path_is_the_path_the_losses_take(grad_mode, head_trains, fits, monkeypatch):
    """The estimator and a fused loss, under the same grad_mode, head and budget verdict,
    take the same path (the loss: a tiny DPO call with a budget one pair fits or not)."""
    import fastalign
    from fastalign.losses import units
    from fastalign.memory.loss import grad_path

    stored = []
    apply = units.StoreResult.apply
    monkeypatch.setattr(units.StoreResult, "apply", lambda *a: stored.append(1) or apply(*a))
    hidden = torch.randn(4, 6, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=head_trains)
    labels = torch.randint(0, 50, (4, 6))
    budget = 2 * 6 * 50 * 4 if fits else 50 * 4  # one pair's fp32 logits, or one token's
    falls_back = grad_mode == "store" and not fits  # asked for and refused: a warning
    warns = pytest.warns(UserWarning, match="exceed store_budget_bytes")
    with warns if falls_back else contextlib.nullcontext():
        options = fastalign.LogpOptions(grad_mode=grad_mode, store_budget_bytes=budget)
        out = fastalign.dpo_loss_fused(
            hidden, weight, labels, ref_hidden=torch.randn(4, 6, 16), options=options
        )
    out.loss.backward()
    taken = "store" if stored else ("recompute" if head_trains else "frozen")
    seq_len = 128 if fits else 4096  # a Llama-3.1-8B pair's logits: under / over 1 GiB
    step = resolve_step(
        "meta-llama/Llama-3.1-8B",
        2,
        seq_len,
        **_options(grad_mode=grad_mode, lora=None if head_trains else 8),
    )
    assert grad_path(step) == taken


def test_cli_grad_mode_subprocess():
    argv = [sys.executable, "-m", "fastalign.memory", "meta-llama/Llama-3.1-8B"]
    argv += ["--batch-size", "2", "--seq-len", "128", "--json", "--grad-mode"]
    runs = {
        mode: subprocess.run(argv + [mode], capture_output=True, text=True, timeout=120)
        for mode in ("store", "fast")
    }
    assert runs["fast"].returncode == 2 and "--grad-mode" in runs["fast"].stderr
    assert runs["store"].returncode == 0, runs["store"].stderr
    store = json.loads(runs["store"].stdout)
    assert store["setup"]["grad_mode"] == "store"
    expected = estimate("meta-llama/Llama-3.1-8B", 2, 128, grad_mode="store").to_dict()
    assert store["fused"] == expected["fused"]


# ----------------------------------------------------------------------------- measured
@pytest.mark.skipif(not cpu_probe_available(), reason="needs /proc/self/clear_refs (Linux)")
@pytest.mark.parametrize("path", ["eager", "fused"])
@pytest.mark.parametrize("setup", ["logits", "activations"])
def test_estimate_matches_measured_peak(setup, path):
    from benchmarks.memory_check import TOLERANCE, measure

    result = measure(setup, path, "cpu")
    assert abs(result["error"]) <= TOLERANCE, result


# ----------------------------------------------------------------------------- CLI, errors
def test_cli_prints_table(capsys):
    argv = ["memory", "Qwen/Qwen3-30B-A3B", "--batch-size", "1", "--seq-len", "4096"]
    argv += ["--world-size", "8", "--sharding", "fsdp", "--activation-checkpointing"]
    assert cli.main(argv + ["--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "eager" in out and "fused" in out and "PEAK" in out and "loss buffers" in out
    assert "fits in 80.0 GiB" in out


def test_cli_passes_every_option_to_estimate(capsys):
    argv = ["memory", "meta-llama/Llama-3.1-8B", "--batch-size", "3", "--seq-len", "256"]
    argv += ["--loss", "kto", "--world-size", "4", "--sharding", "fsdp", "--lora", "8"]
    argv += ["--activation-checkpointing", "--dtype", "fp16", "--no-master-weights"]
    assert cli.main(argv + ["--grad-mode", "recompute", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = estimate(
        "meta-llama/Llama-3.1-8B", 3, 256, loss="kto", world_size=4, sharding="fsdp", lora=8,
        activation_checkpointing=True, dtype="fp16", master_weights=False, grad_mode="recompute",
    )  # fmt: skip
    assert got == json.loads(json.dumps(want.to_dict()))


def test_cli_bad_arguments(capsys):
    assert cli.main(["memory", "no/such-model", "--batch-size", "1", "--seq-len", "8"]) == 2
    assert "error: MODEL 'no/such-model' is neither a preset" in capsys.readouterr().err
    argv = ["memory", "meta-llama/Llama-3.1-8B", "--batch-size", "0", "--seq-len", "8"]
    assert cli.main(argv) == 2
    assert "error: --batch-size must be >= 1" in capsys.readouterr().err
    argv = ["memory", "meta-llama/Llama-3.1-8B", "--batch-size", "1", "--seq-len", "8"]
    for size in ("lots", "80"):  # "80": no unit (80 bytes is never what is meant)
        assert cli.main(argv + ["--gpu-memory", size]) == 2
        assert "error: --gpu-memory must look like '80GB'" in capsys.readouterr().err


@pytest.mark.parametrize("text, why", [("[1, 2]", "a JSON object expected, got list"),
                                       ("{oops", "not valid JSON")])  # fmt: skip
def test_cli_config_file_that_is_no_config(text, why, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(text)
    assert cli.main(["memory", str(path), "--batch-size", "1", "--seq-len", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: MODEL {path}") and why in err


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size=1.5), TypeError, "batch_size"),
        (dict(seq_len=-3), ValueError, "seq_len"),
        (dict(loss="sft"), ValueError, "loss"),
        (dict(world_size=0), ValueError, "world_size"),
        (dict(sharding="zero3"), ValueError, "sharding"),
        (dict(lora=0), ValueError, "lora"),
        (dict(lora="8"), TypeError, "lora"),
        (dict(activation_checkpointing="yes"), TypeError, "activation_checkpointing"),
        (dict(dtype="int8"), ValueError, "dtype"),
        (dict(dtype=3), TypeError, "dtype"),
        (dict(adamw="sgd"), ValueError, "adamw"),
        (dict(grad_mode="fast"), ValueError, "grad_mode"),
        (dict(cuda_kernel="cublas"), ValueError, "cuda_kernel"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, name):
    args = dict(config_or_name="meta-llama/Llama-3.1-8B", batch_size=1, seq_len=16)
    with pytest.raises(error, match=name):
        estimate(**{**args, **kwargs})


def test_bad_config_and_sizes():
    with pytest.raises(TypeError, match="config_or_name"):
        estimate(3, 1, 16)
    with pytest.raises(ValueError, match="config_or_name"):
        estimate({"hidden_size": 8}, 1, 16)
    assert parse_bytes("80GB") == 80 << 30 == parse_bytes("80 GiB") == parse_bytes("80G")
    assert parse_bytes("512B") == 512
    assert parse_bytes(1024) == 1024
    with pytest.raises(ValueError, match="gpu_bytes"):
        estimate("meta-llama/Llama-3.1-8B", 1, 16).fits("eighty", "fused")
    with pytest.raises(ValueError, match="path"):
        estimate("meta-llama/Llama-3.1-8B", 1, 16).total("naive")
