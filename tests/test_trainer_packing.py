"""Packed microbatches in the trainer: the body's hidden states, every loss and its gradients
equal the padded ones, packed rows hold no padding, and a packed CLI run trains."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from fastalign.trainer import data as D  # noqa: E402
from fastalign.trainer.default import default_model, default_tokenizer  # noqa: E402
from fastalign.trainer.loop import TrainConfig, Trainer  # noqa: E402
from fastalign.trainer.model import HiddenStates, block_causal_mask, prepare_packing  # noqa: E402

FAST = dict(sft_warmup_steps=5, batch_size=4, logging_steps=1, progress=False)
# Prompt/completion pairs of different lengths (1 to 7 completion characters) so rows pad.
TEXTS = [("1+2=", "3"), ("9+9=", "18 ok"), ("4+0=", "4"), ("7+5=", "12 1234"), ("0+0=", "")]


def _tiny_model(attn_implementation: str):
    tokenizer = default_tokenizer()
    model = default_model(tokenizer, seed=1).eval()
    model.set_attn_implementation(attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    return tokenizer, model


def _padded_and_packed(tokenizer):
    rows = [D.encode(p, c, tokenizer, 16, 8) for p, c in TEXTS]
    padded = D.rows_to_batch(rows, tokenizer.pad_token_id)
    return padded, D.pack(padded)


@pytest.mark.parametrize("mode", ["positions", "mask"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_hidden_states_equal_padded(attn_implementation, mode):
    tokenizer, model = _tiny_model(attn_implementation)
    padded, packed = _padded_and_packed(tokenizer)
    with torch.no_grad():
        want = HiddenStates(model)(padded["input_ids"], padded["attention_mask"])  # [B, T, H]
        got = HiddenStates(model, mode)(
            packed["input_ids"],
            position_ids=packed["position_ids"],
            cu_seqlens=packed["cu_seqlens"],
        )  # [N, H]
    lengths = padded["attention_mask"].sum(1).tolist()
    assert got.shape == (sum(lengths), model.config.hidden_size)
    for b, (start, n) in enumerate(zip(packed["cu_seqlens"][:-1].tolist(), lengths)):
        torch.testing.assert_close(got[start : start + n], want[b, :n], rtol=1e-5, atol=1e-5)


def test_plain_causal_attention_over_a_packed_row_leaks():
    """The check above can fail: without restarting positions or the block mask, later
    sequences attend to earlier ones and their hidden states change."""
    tokenizer, model = _tiny_model("sdpa")
    padded, packed = _padded_and_packed(tokenizer)
    num_total = packed["input_ids"].shape[1]
    with torch.no_grad():
        separate = HiddenStates(model, "mask")(
            packed["input_ids"],
            position_ids=packed["position_ids"],
            cu_seqlens=packed["cu_seqlens"],
        )
        leaky = HiddenStates(model)(packed["input_ids"], torch.ones(1, num_total))[0]
    first = int(packed["cu_seqlens"][1])
    torch.testing.assert_close(leaky[:first], separate[:first], rtol=1e-5, atol=1e-5)
    assert (leaky[first:] - separate[first:]).abs().max() > 1e-2


def test_block_causal_mask_is_causal_within_sequences_only():
    mask = block_causal_mask(torch.tensor([0, 2, 2, 5], dtype=torch.int32))[0, 0]
    seq = torch.tensor([0, 0, 2, 2, 2])
    i, j = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    assert torch.equal(mask, (seq[i] == seq[j]) & (j <= i))
    additive = block_causal_mask(torch.tensor([0, 2, 5]), additive_dtype=torch.float32)[0, 0]
    assert torch.equal(additive == 0, mask)
    assert float(additive.min()) == torch.finfo(torch.float32).min


def test_prepare_packing_picks_an_exact_mode_and_refuses_a_leaky_one():
    from transformers import AttentionInterface

    tokenizer, model = _tiny_model("sdpa")
    assert prepare_packing(model) in ("positions", "mask")

    def leaky_attention(module, query, key, value, attention_mask, **kwargs):
        # Causal over the whole row: ignores any mask, so packed sequences see each other.
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=kwargs.get("scaling")
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("fastalign_test_leaky", leaky_attention)
    model.set_attn_implementation("fastalign_test_leaky")
    with pytest.raises(ValueError, match=r"packing=True: .*fastalign_test_leaky"):
        prepare_packing(model)


def _perturb(model, seed: int = 3) -> None:
    """Move the policy off the reference so the losses and rewards are not at their
    trivial starting values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _mixed_rows(trainer) -> list[dict]:
    """A microbatch of the 2 shortest and 2 longest completions, so the padded layout pads."""
    column = "completion" if trainer.config.loss == "kto" else "chosen"
    texts = trainer.train_set[column]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [trainer.train_set[i] for i in order[:2] + order[-2:]]


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    out = trainer.compute(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.filterwarnings("ignore:.*outside the KTO paper")  # 3 desirable, 1 not
@pytest.mark.parametrize(
    "loss, extra",
    [
        ("dpo", {}),
        ("ipo", {}),
        ("kto", {}),
        ("typo", {}),
        ("dpo", {"lora_rank": 4, "reference": "peft"}),
    ],
    ids=["dpo", "ipo", "kto", "typo", "dpo-peft"],
)
def test_packed_microbatch_gives_the_padded_loss_and_gradients(tmp_path, loss, extra):
    if extra.get("lora_rank"):
        pytest.importorskip("peft")
    trainer = Trainer(
        TrainConfig(loss=loss, max_steps=1, packing=True, output_dir=str(tmp_path), **FAST, **extra)
    )
    _perturb(trainer.model)
    rows = _mixed_rows(trainer)
    packed = trainer.collator(rows)
    packed["index"] = torch.tensor([r["index"] for r in rows])
    assert "cu_seqlens" in packed["policy"]
    assert ("kl" in packed) == (loss == "kto") and ("sample" in packed) == (loss == "typo")
    trainer.collator.packing = False
    padded = trainer.collator(rows)
    padded["index"] = packed["index"]

    packed_out, packed_grads = _loss_and_grads(trainer, packed)
    padded_out, padded_grads = _loss_and_grads(trainer, padded)
    torch.testing.assert_close(packed_out.loss, padded_out.loss, rtol=1e-5, atol=1e-6)
    for name, value in padded_out.metrics().items():
        assert packed_out.metrics()[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert packed_grads.keys() == padded_grads.keys()
    assert sum(int(g.abs().max() > 0) for g in padded_grads.values()) >= 2
    for name, grad in padded_grads.items():
        # fp32 sums in another order: 1e-5 of the gradient's own scale (IPO's reach ~4)
        scale = float(grad.abs().max())
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("loss", ["dpo", "kto", "typo"])
def test_packed_batch_holds_no_padding(tmp_path, loss):
    trainer = Trainer(
        TrainConfig(loss=loss, max_steps=1, packing=True, output_dir=str(tmp_path), **FAST)
    )
    rows = _mixed_rows(trainer)
    packed = trainer.collator(rows)
    trainer.collator.packing = False
    padded = trainer.collator(rows)
    parts = [p for p in ("policy", "kl", "sample") if p in padded]
    assert len(parts) == {"dpo": 1, "kto": 2, "typo": 2}[loss]
    for part in parts:
        pack, pad = packed[part], padded[part]
        lengths = pad["attention_mask"].sum(1)
        num_total = int(lengths.sum())
        assert pad["attention_mask"].numel() > num_total  # the padded layout does pad
        assert pack["input_ids"].shape == pack["position_ids"].shape == (1, num_total)
        assert pack["labels"].shape == (num_total,)
        assert (pack["input_ids"] != trainer.collator.pad_id).all()
        assert pack["cu_seqlens"].dtype == torch.int32
        assert pack["cu_seqlens"].tolist() == [0] + lengths.cumsum(0).tolist()
        starts = pack["cu_seqlens"][:-1].long()
        assert (pack["position_ids"][0, starts] == 0).all()
        assert int((pack["labels"] != -100).sum()) == int((pad["labels"] != -100).sum())


def test_packed_precomputed_reference_matches_padded_cache(tmp_path):
    config = dict(loss="dpo", max_steps=1, reference="precomputed", **FAST)
    padded = Trainer(TrainConfig(output_dir=str(tmp_path / "pad"), **config))
    packed = Trainer(TrainConfig(output_dir=str(tmp_path / "pack"), packing=True, **config))
    for split in ("train", "test"):
        want, got = padded.ref_logps[split], packed.ref_logps[split]
        assert want.shape == got.shape and bool((want != 0).all())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cli_packing_trains_like_padding(tmp_path):
    from fastalign.cli import main

    losses = {}
    for packing in ("--packing", "--no-packing"):
        run = tmp_path / packing.strip("-")
        argv = ["train", "--loss", "dpo", packing, "--max-steps", "3", "--output-dir", str(run)]
        argv += ["--sft-warmup-steps", "5", "--batch-size", "4", "--logging-steps", "1"]
        assert main(argv + ["--no-progress"]) == 0
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3]
        losses[packing] = [r["loss"] for r in records]
        state = torch.load(run / "final" / "trainer_state.pt", weights_only=True)
        assert state["config"]["packing"] == (packing == "--packing")
    assert losses["--packing"] == pytest.approx(losses["--no-packing"], rel=1e-4, abs=1e-6)
    assert len(set(losses["--packing"])) > 1  # it trains: the loss moves
