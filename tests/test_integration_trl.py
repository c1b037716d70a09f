"""fastalign's TRL integration equals TRL 1.16's stock trainers: loss, metrics, gradients.

Each case builds a stock TRL trainer and fastalign's subclass on identical tiny Llama copies
(fp32, CPU) and compares one ``compute_loss`` + backward; two cases run ``train()``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from fastalign.integrations import trl as fa  # noqa: E402
from tests.trl_harness import (  # noqa: E402
    assert_same_step,
    make_trainers,
    one_step,
    tiny_llama,
)

DPO_LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _routing():
    fa.ROUTING.clear()
    yield
    assert not fa.is_patched()


def assert_all_routed():
    """TRL's fused head went to fastalign, and never fell back to TRL's kernel."""
    assert fa.ROUTING["fastalign"] > 0 and fa.ROUTING["trl"] == 0, dict(fa.ROUTING)


def compare(kind, config, **kwargs):
    stock, fast = make_trainers(kind, config, **kwargs)
    fa.ROUTING.clear()  # a precomputed reference was already scored by fastalign
    stock_step = one_step(stock)
    assert fa.ROUTING["fastalign"] == 0
    assert_same_step(stock_step, one_step(fast))
    assert_all_routed()
    return stock, fast


def test_the_loss_type_list_is_trls():
    help_text = trl.DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert sorted(DPO_LOSS_TYPES) == sorted(t for t in DPO_LOSS_TYPES if f"'{t}'" in help_text)
    assert help_text.count("`'") == len(DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_dpo_loss_type(loss_type):
    smoothing = 0.1 if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired") else 0.0
    compare("dpo", dict(loss_type=[loss_type], label_smoothing=smoothing))


@pytest.mark.parametrize(
    "config",
    [
        dict(loss_type=["sigmoid", "sft", "ipo"], loss_weights=[1.0, 0.5, 0.3]),
        dict(loss_type=["hinge", "bco_pair"], loss_weights=[0.2, 1.0], ld_alpha=0.5),
        dict(loss_type=["sigmoid", "ipo"], use_weighting=True),
        dict(f_divergence_type="js_divergence"),
        dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
    ],
    ids=["weighted-mix", "ld_alpha", "wpo", "js", "alpha"],
)
def test_dpo_options(config):
    compare("dpo", config)


@pytest.mark.parametrize(
    "heads",
    [dict(tied=True), dict(bias=True), dict(softcap=2.0, logit_scale=0.7)],
    ids=["tied", "bias", "softcap-scale"],
)
def test_dpo_heads(heads):
    compare("dpo", dict(loss_type=["sigmoid", "sft"]), model_kwargs=heads)


def test_dpo_precomputed_reference():
    stock, fast = compare("dpo", dict(precompute_ref_log_probs=True))
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        want = torch.tensor(stock.train_dataset[column])
        torch.testing.assert_close(
            torch.tensor(fast.train_dataset[column]), want, rtol=1e-6, atol=0
        )


def test_dpo_peft_reference_is_the_disabled_adapter():
    """LoRA: frozen lm_head (fastalign's no-recompute path); reference = adapter disabled."""
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    stock, fast = compare("dpo", dict(loss_type=["sigmoid", "sft"]), ref=False, peft=lora)
    assert fast.ref_model is None and not fast.model.get_output_embeddings().weight.requires_grad


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"], ids=["with-KL", "no-KL"])
def test_kto(loss_type):
    stock, fast = compare("kto", dict(loss_type=loss_type, desirable_weight=1.3))
    assert fast.calculate_KL == (loss_type == "kto")


def test_kto_precomputed_reference_with_kl():
    compare("kto", dict(precompute_ref_log_probs=True), model_kwargs=dict(bias=True))


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_two_training_steps_log_the_same(kind):
    """``train()`` end to end (optimizer steps, eval, logging) gives TRL's log history."""
    config = dict(max_steps=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=3)
    stock, fast = make_trainers(kind, config, with_eval=True)
    for trainer in (stock, fast):
        trainer.train()
    assert len(fast.state.log_history) == len(stock.state.log_history) >= 3
    for got, want in zip(fast.state.log_history, stock.state.log_history):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if "runtime" in key or "per_second" in key:
                continue
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for (name, got), want in zip(fast.model.named_parameters(), stock.model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    assert_all_routed()


def test_patch_trl_routes_stock_trainers_and_unpatch_restores():
    stock, _ = make_trainers("dpo", {})
    fa.patch_trl()
    try:
        assert fa.is_patched()
        patched = one_step(stock)
    finally:
        fa.unpatch_trl()
    routed = fa.ROUTING["fastalign"]
    assert routed == 2  # policy and reference
    assert_same_step(one_step(stock), patched)
    assert fa.ROUTING["fastalign"] == routed  # unpatched: TRL's kernel again
    with fa.use_fastalign():
        one_step(stock)
    assert fa.ROUTING["fastalign"] == routed + 2
    assert_all_routed()


def test_requests_fastalign_cannot_serve_go_to_trl():
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8)
    labels = torch.tensor([1, 2, 3, 4])
    args = (hidden, weight, None, labels, 1.0, 32768, None, 1.0)
    served = fa.FastalignLogProbFunction.apply(*args, ("log_probs", "entropy"))
    fallback = fa.FastalignLogProbFunction.apply(*args, ("log_probs", "future_stat"))
    assert fa.ROUTING["trl: outputs ['future_stat']"] == 1 and fa.ROUTING["fastalign"] == 1
    torch.testing.assert_close(fallback[0], served[0])


def test_backward_regathers_a_zero3_sharded_head(monkeypatch):
    """ZeRO-3 leaves a parameter unusable outside its gather context: fastalign's forward and
    backward must read the lm_head only inside TRL's ``maybe_gather_lm_head_ctx``. Here the
    head holds NaNs outside that context, so any read elsewhere poisons the gradients."""
    stock, fast = make_trainers("dpo", {})
    head = fast.model.get_output_embeddings().weight
    full, poison = head.data, torch.full_like(head.data, float("nan"))
    entered = []

    @contextlib.contextmanager
    def gathered(*params):
        entered.append(torch.is_grad_enabled())
        head.data = full
        try:
            yield
        finally:
            head.data = poison

    monkeypatch.setattr(fa._utils, "maybe_gather_lm_head_ctx", gathered)
    head.data = poison
    try:
        step = one_step(fast)
    finally:
        head.data = full
    # TRL's forward context and fastalign's own, for the policy and the reference, and the
    # policy's backward (autograd runs backward with grad mode off)
    assert entered.count(False) >= 1 and len(entered) >= 5
    assert_all_routed()
    assert_same_step(one_step(stock), step)


def test_unsupported_trl_is_named():
    class OldUtils:
        add_fused_lm_head = None

    with pytest.raises(ImportError, match=r"supports TRL 1\.16\.x.*lacks _ChunkedLogProbFunction"):
        fa.check_trl(OldUtils)


def test_trl_step_benchmark_runs_at_tiny_scale():
    """``benchmarks/trl_step.py`` end to end on a tiny preset (one interleaved step each)."""
    from benchmarks import trl_step

    shape = dict(vocab=97, hidden=32, layers=1, intermediate=64, prompt=6, completion=4,
                 pairs=2, bf16=False)  # fmt: skip
    cell = trl_step.measure(shape, "cpu", lora=True, repeats=1)
    assert cell["scored_tokens"] < cell["positions"]
    for result in cell["results"].values():
        assert len(result["seconds"]) == 1 and result["median_seconds"] > 0
    record = dict(device="cpu", device_type="cpu", date="today", preset="tiny", shape=shape,
                  repeats=1, versions={}, cells=[cell])  # fmt: skip
    assert "| lora (frozen head) | 4 x 9" in trl_step.markdown(record)
    assert_all_routed()


def _fused_head_grads(model, labels, route: bool):
    """TRL's fused-head forward (as GRPO calls it, entropy bonus included) and its grads."""
    model.zero_grad()
    context = fa.use_fastalign() if route else contextlib.nullcontext()
    input_ids = labels.clamp(min=0)
    with context:
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.log_probs.detach(), out.entropy.detach(), grads


@pytest.mark.parametrize("all_masked", [False, True], ids=["entropy-grad", "all-masked"])
def test_fused_head_entropy_gradient_and_all_masked_rows(all_masked):
    """GRPO differentiates the entropy: served by fastalign with TRL's gradients. An
    all-masked microbatch scores no row (M = 0) and still backpropagates zeros."""
    model = tiny_llama(0, softcap=3.0)
    trl.trainer.utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    labels = torch.randint(0, 97, (2, 7))
    labels[:, :3] = -100
    if all_masked:
        labels[:] = -100
    stock = _fused_head_grads(model, labels, route=False)
    fast = _fused_head_grads(model, labels, route=True)
    assert_all_routed()
    for got, want in zip(fast[:2], stock[:2]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert fast[2].keys() == stock[2].keys()
    for name, want in stock[2].items():
        error = float((fast[2][name] - want).norm())
        assert error <= 1e-6 * float(want.norm()) + 1e-12, name
    if all_masked:
        assert all(float(g.abs().max()) == 0 for g in fast[2].values())
