"""IPO vs the float64 formula (length-normalised and sum forms), on both backends."""

from __future__ import annotations

import pytest
import torch

import fastalign
from tests import loss_reference as R


@pytest.mark.parametrize("backend", R.BACKENDS)
@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize("reference", ["stream", "precomputed"])
def test_ipo_matches_formula(backend, length_normalize, reference, device):
    hidden, ref_hidden, weight, labels = R.paired_inputs(device=device)
    s, n = R.logps64(hidden, weight, labels)
    ref_s, _ = R.logps64(ref_hidden, weight.detach(), labels)
    kwargs = dict(ref_hidden=ref_hidden) if reference == "stream" else dict(ref_logps=ref_s.float())
    out = fastalign.ipo_loss_fused(
        hidden,
        weight,
        labels,
        beta=0.5,
        length_normalize=length_normalize,
        options=fastalign.LogpOptions(backend=backend),
        **kwargs,
    )
    naive = R.ipo(s, ref_s.detach(), n, 0.5, length_normalize)
    R.assert_loss_and_grads(out.loss, naive, [hidden, weight])
    assert torch.equal(out.chosen_num_tokens, n[:3])


def test_ipo_length_normalisation_uses_token_counts():
    """TRL's convention: per-token means; an unscored row counts as length 1, not NaN."""
    hidden, ref_hidden, weight, labels = R.paired_inputs(pairs=1)
    labels[1] = -100
    out = fastalign.ipo_loss_fused(hidden, weight, labels, ref_hidden=ref_hidden)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(beta=0), ValueError, "beta"),
        (dict(length_normalize=1), TypeError, "length_normalize must be a bool"),
        (dict(), ValueError, "give exactly one reference"),
    ],
)
def test_ipo_errors(kwargs, error, match):
    hidden, _, weight, labels = R.paired_inputs()
    with pytest.raises(error, match=match):
        fastalign.ipo_loss_fused(hidden, weight, labels, **kwargs)


def trl_ipo(logps, num_tokens, ref_logps, *, beta):
    """``(loss, metrics)`` from TRL's DPOTrainer._compute_loss with ``loss_type="ipo"``.

    TRL divides by the completion-mask length, so the stand-in model's inputs carry a mask
    with ``num_tokens`` completion positions per row and the sum in the first log-prob slot.
    """
    from types import SimpleNamespace

    from tests.trl_peer import _dpo_module, _trainer

    rows, width = logps.shape[0], int(num_tokens.max()) + 1
    positions = torch.arange(width)
    completion_mask = ((positions >= 1) & (positions <= num_tokens[:, None])).long()
    per_token = torch.zeros(rows, width - 1)
    per_token[:, 0] = logps

    def model(**kwargs):
        zeros = torch.zeros(rows, width - 1)
        return SimpleNamespace(
            log_probs=per_token,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
            aux_loss=None,
        )

    model.training = True
    trainer = _trainer(
        model=model,
        beta=beta,
        loss_types=["ipo"],
        loss_weights=[1.0],
        label_smoothing=0.0,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        use_weighting=False,
    )
    half = rows // 2
    inputs = {
        "input_ids": torch.zeros(rows, width, dtype=torch.long),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_logps[:half].float(),
        "ref_rejected_logps": ref_logps[half:].float(),
    }
    loss = _dpo_module.DPOTrainer._compute_loss(trainer, model, inputs, False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def test_ipo_loss_and_metrics_match_trl():
    """TRL's IPO (per-token-mean margins, rewards β·r on sums) on the same log-probs."""
    pytest.importorskip("trl")
    hidden, _, weight, labels = R.paired_inputs(pairs=4, seq_len=9)
    labels[2, 2:6] = -100  # lengths differ within and across pairs
    ref_logps = torch.randn(8) * 3 - 30
    out = fastalign.ipo_loss_fused(hidden, weight, labels, ref_logps=ref_logps, beta=0.2)
    num_tokens = torch.cat([out.chosen_num_tokens, out.rejected_num_tokens])
    assert len(set(num_tokens.tolist())) > 1
    trl_loss, trl_metrics = trl_ipo(
        torch.cat([out.chosen_logps, out.rejected_logps]), num_tokens, ref_logps, beta=0.2
    )
    assert float(out.loss.detach()) == pytest.approx(trl_loss, rel=1e-5)
    ours = out.metrics()
    assert set(ours) <= set(trl_metrics)
    for name, value in ours.items():
        assert value == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name
