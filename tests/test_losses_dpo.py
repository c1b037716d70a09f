"""DPO (sigmoid, cDPO, robust) vs the float64 formulas, on both backends; TRL metrics."""

from __future__ import annotations

import pytest
import torch

import fastalign
from tests import loss_reference as R


@pytest.mark.parametrize("backend", R.BACKENDS)
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1)])
@pytest.mark.parametrize("reference", ["stream", "precomputed", "free"])
def test_dpo_matches_formula(backend, loss_type, eps, reference, device):
    hidden, ref_hidden, weight, labels = R.paired_inputs(device=device)
    ref_weight = torch.randn_like(weight) / 4
    s, _ = R.logps64(hidden, weight, labels)
    ref_s, _ = R.logps64(ref_hidden, ref_weight.detach(), labels)
    kwargs = {
        "stream": dict(ref_hidden=ref_hidden, ref_weight=ref_weight),
        "precomputed": dict(ref_logps=ref_s.float().detach()),
        "free": dict(reference_free=True),
    }[reference]
    out = fastalign.dpo_loss_fused(
        hidden,
        weight,
        labels,
        beta=0.3,
        loss_type=loss_type,
        label_smoothing=eps,
        options=fastalign.LogpOptions(backend=backend),
        **kwargs,
    )
    ref_used = torch.zeros_like(s) if reference == "free" else ref_s.detach()
    naive = R.dpo(s, ref_used, 0.3, loss_type, eps)
    R.assert_loss_and_grads(out.loss, naive, [hidden, weight])
    torch.testing.assert_close(
        out.chosen_rewards.double(), 0.3 * (s - ref_used)[:3].detach(), rtol=1e-4, atol=1e-5
    )
    assert not out.chosen_rewards.requires_grad and out.chosen_logps.shape == (3,)


def test_dpo_packed_matches_padded():
    hidden, ref_hidden, weight, labels = R.paired_inputs(pairs=2, seq_len=5)
    padded = fastalign.dpo_loss_fused(hidden, weight, labels, ref_hidden=ref_hidden)
    cu = torch.arange(0, 5 * 4 + 1, 5, dtype=torch.int32)
    packed = fastalign.dpo_loss_fused(
        hidden.reshape(20, -1),
        weight,
        labels.reshape(20),
        ref_hidden=ref_hidden.reshape(20, -1),
        cu_seqlens=cu,
    )
    torch.testing.assert_close(packed.loss, padded.loss)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(beta=0.0), ValueError, "beta must be a finite number > 0"),
        (dict(beta=-1.0), ValueError, "beta"),
        (
            dict(label_smoothing=0.5),
            ValueError,
            r"label_smoothing must be a finite number in \[0, 0.5\)",
        ),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(loss_type="kto_pair"), ValueError, "loss_type must be one of"),
        (dict(ref_logps=torch.zeros(5)), ValueError, r"ref_logps must have shape \[6\]"),
        (dict(ref_logps=torch.zeros(6, dtype=torch.long)), TypeError, "ref_logps must be a floa"),
        (dict(), ValueError, "give exactly one reference.*neither"),
        (
            dict(ref_logps=torch.zeros(6), ref_hidden=torch.randn(6, 7, 17)),
            ValueError,
            "ref_hidden and ref_logps",
        ),
        (dict(reference_free=True, ref_logps=torch.zeros(6)), ValueError, "reference-free"),
        (dict(ref_logps=torch.zeros(6), bogus=1), TypeError, r"unexpected keyword.*bogus"),
    ],
)
def test_dpo_errors(kwargs, error, match):
    hidden, _, weight, labels = R.paired_inputs()
    with pytest.raises(error, match=match):
        fastalign.dpo_loss_fused(hidden, weight, labels, **kwargs)


def test_odd_row_count_is_rejected():
    hidden, _, weight, labels = R.paired_inputs()
    with pytest.raises(ValueError, match="even, non-zero number of sequences"):
        fastalign.dpo_loss_fused(hidden[:5], weight, labels[:5], ref_logps=torch.zeros(5))


# No cDPO case: TRL 1.16's "sigmoid" ignores label_smoothing (design.md's cDPO is checked
# against the float64 formula above).
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("robust", 0.2)])
def test_loss_and_metrics_match_trl(loss_type, eps):
    """TRL's own DPO loss and metric code (DPOTrainer._compute_loss) on the same log-probs."""
    pytest.importorskip("trl")
    from tests.trl_peer import trl_dpo

    hidden, ref_hidden, weight, labels = R.paired_inputs(pairs=4)
    ref_logps = torch.randn(8) * 3 - 40
    out = fastalign.dpo_loss_fused(
        hidden,
        weight,
        labels,
        ref_logps=ref_logps,
        beta=0.2,
        loss_type=loss_type,
        label_smoothing=eps,
    )
    trl_loss, trl_metrics = trl_dpo(
        out.chosen_logps,
        out.rejected_logps,
        ref_logps[:4],
        ref_logps[4:],
        beta=0.2,
        loss_type=loss_type,
        eps=eps,
    )
    assert float(out.loss.detach()) == pytest.approx(trl_loss, rel=1e-5)
    ours = out.metrics()
    assert set(ours) <= set(trl_metrics)
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert ours[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name


def test_reference_lm_head_with_its_own_bias():
    hidden, ref_hidden, weight, labels = R.paired_inputs()
    ref_weight, ref_bias = torch.randn_like(weight) / 4, torch.randn(weight.shape[0])
    ref_s, _ = R.logps64(ref_hidden, ref_weight.detach(), labels, bias=ref_bias.double())
    streamed = fastalign.dpo_loss_fused(
        hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias
    )
    precomputed = fastalign.dpo_loss_fused(hidden, weight, labels, ref_logps=ref_s.float())
    torch.testing.assert_close(streamed.loss, precomputed.loss, rtol=1e-5, atol=1e-6)
