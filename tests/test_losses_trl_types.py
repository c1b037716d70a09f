"""Every DPO loss type against TRL 1.16's own loss code (values, metrics and gradients back
to the hidden states) and Liger 0.8.5's ``preference_loss_fn`` (values, rewards, gradients)
on the same log-probs."""

from __future__ import annotations

import pytest
import torch

import fastalign
from fastalign.losses.pair_config import pair_stats
from fastalign.losses.pair_losses import PAIR_LOSS_TYPES, PairParams, combined_pair_losses
from tests import loss_reference as R
from tests.reference import naive_token_logps

pytest.importorskip("trl")

# sigmoid with label_smoothing is cDPO here but TRL ignores it: compared at 0 (see below).
TRL_EPS = {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}
CASES = [dict(loss_type=t, label_smoothing=TRL_EPS.get(t, 0.0)) for t in PAIR_LOSS_TYPES] + [
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),  # RPO
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
    dict(loss_type="sigmoid", ld_alpha=0.5),
    dict(loss_type=["ipo", "sft"], ld_alpha=0.3),
    dict(loss_type="sigmoid", use_weighting=True),
    # (TRL 1.16 raises on WPO with "sft": in-place product on an expanded tensor.)
    dict(loss_type=["apo_zero", "sigmoid"], loss_weights=[0.5, 1.0], use_weighting=True),
    dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    dict(loss_type="hinge", f_divergence_type="js_divergence"),
    dict(loss_type="ipo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type="discopop", discopop_tau=0.2),
]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def _inputs():
    hidden, ref_hidden, weight, labels = R.paired_inputs(pairs=4, seq_len=8)
    labels[5, 5:] = -100  # a short rejected row: LD-DPO's shared length differs per pair
    labels[3, 7:] = -100
    return hidden, ref_hidden, weight, labels


def _token_log_sum_sq(hidden, weight, labels):
    """Per-token log Σ_v p² (float64), 0 where not scored."""
    logits = hidden.double() @ weight.double().T
    per_token = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
    return per_token * (labels != -100)


def _trl_kwargs(case):
    keys = ("loss_type", "loss_weights", "label_smoothing", "ld_alpha", "discopop_tau")
    out = {k: case[k] for k in keys if k in case}
    for k in ("f_divergence_type", "f_alpha_divergence_coef"):
        if k in case:
            out[k] = case[k]
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_loss_metrics_and_gradients_match_trl(case):
    from tests.trl_peer_tokens import trl_dpo_tokens

    hidden, ref_hidden, weight, labels = _inputs()
    out = fastalign.dpo_loss_fused(
        hidden,
        weight,
        labels,
        ref_hidden=ref_hidden,
        beta=0.1,
        options=fastalign.LogpOptions(backend="torch"),
        **case,
    )
    ours = torch.autograd.grad(out.loss, [hidden, weight])
    token_logps = naive_token_logps(hidden.double(), weight.double(), labels)
    ref_token_logps = naive_token_logps(ref_hidden.double(), weight.double().detach(), labels)
    log_sum_sq = None
    if case.get("use_weighting"):
        log_sum_sq = _token_log_sum_sq(hidden.detach(), weight.detach(), labels)
    trl_loss, trl_metrics = trl_dpo_tokens(
        token_logps,
        ref_token_logps,
        labels != -100,
        beta=0.1,
        log_sum_sq=log_sum_sq,
        **_trl_kwargs(case),
    )
    theirs = torch.autograd.grad(trl_loss, [hidden, weight])
    assert float(out.loss) == pytest.approx(float(trl_loss), rel=2e-5, abs=1e-6)
    for g_ours, g_theirs in zip(ours, theirs):
        scale = g_theirs.abs().max().clamp_min(1e-12)
        assert float((g_ours - g_theirs).abs().max() / scale) < 1e-4
    metrics = out.metrics()
    for name in (*METRICS, "logps/chosen", "logps/rejected"):
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name


def test_sigmoid_label_smoothing_is_cdpo_while_trl_ignores_it():
    """The documented convention: ε on ``sigmoid`` is cDPO here; TRL 1.16 drops it."""
    from tests.trl_peer_tokens import trl_dpo_tokens

    hidden, ref_hidden, weight, labels = _inputs()
    ours = fastalign.dpo_loss_fused(
        hidden, weight, labels, ref_hidden=ref_hidden, beta=0.1, label_smoothing=0.3
    )
    token = naive_token_logps(hidden.double(), weight.double(), labels).detach()
    ref_token = naive_token_logps(ref_hidden.double(), weight.double(), labels)
    trl_loss, _ = trl_dpo_tokens(token, ref_token, labels != -100, beta=0.1, label_smoothing=0.3)
    s, ref = token.sum(1), ref_token.sum(1)
    assert float(trl_loss) == pytest.approx(float(R.dpo(s, ref, 0.1)), rel=1e-5)
    assert float(ours.loss) == pytest.approx(float(R.dpo(s, ref, 0.1, eps=0.3)), rel=1e-5)
    assert abs(float(ours.loss) - float(trl_loss)) > 1e-3


LIGER_TYPES = ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard"]
LIGER_TYPES += ["apo_zero", "apo_down", "discopop"]


@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_loss_rewards_and_gradients_match_liger(loss_type):
    """Liger's LigerFusedLinearDPOFunction.preference_loss_fn on the same per-sequence sums."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction as Liger

    pairs, eps, beta = 5, TRL_EPS.get(loss_type, 0.0), 0.2
    ref = torch.randn(2 * pairs) * 3 - 30
    leaves = (ref + torch.randn(2 * pairs)).requires_grad_()
    n = torch.randint(1, 9, (2 * pairs,))
    stats = pair_stats(leaves, ref, n)
    params = PairParams(beta=beta, label_smoothing=eps, discopop_tau=0.05)
    ours = combined_pair_losses(stats, params, [loss_type], [1.0]).mean()
    theirs, chosen_rewards, _ = Liger.preference_loss_fn(
        leaves[:pairs],
        leaves[pairs:],
        torch.zeros(2 * pairs, 3),  # full_target: only its row count is read
        ref[:pairs],
        ref[pairs:],
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
        discopop_tau=0.05,
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(beta * stats.chosen_logratios, chosen_rewards)
    (g_ours,) = torch.autograd.grad(ours, leaves)
    (g_theirs,) = torch.autograd.grad(theirs, leaves)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-7)
