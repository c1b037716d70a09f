"""dpo_loss_fused with every TRL loss type, mixtures, RPO, LD-DPO and WPO, end to end on both
backends and both gradient paths against the float64 paper formulas (values and gradients to
hidden and lm_head); which path each takes."""

from __future__ import annotations

import pytest
import torch

import fastalign
from fastalign.losses.pair_losses import PAIR_LOSS_TYPES
from tests import loss_reference as R
from tests import pair_reference as PR
from tests.reference import naive_token_logps

EPS = {"exo_pair": 1e-3, "robust": 0.1, "sigmoid": 0.1, "aot": 0.1, "aot_unpaired": 0.1}


def _inputs(device):
    hidden, ref_hidden, weight, labels = R.paired_inputs(pairs=3, seq_len=6, device=device)
    labels[4, 4:] = -100  # pair 1's rejected row is short: LD-DPO's shared lengths differ
    return hidden, ref_hidden, weight, labels


@pytest.mark.parametrize(
    "backend,grad_mode", [("torch", "store"), ("torch", "recompute"), ("triton", "store")]
)
@pytest.mark.parametrize("loss_type", list(PAIR_LOSS_TYPES))
def test_each_type_end_to_end(backend, grad_mode, loss_type, device):
    hidden, ref_hidden, weight, labels = _inputs(device)
    eps = EPS.get(loss_type, 0.0)
    out = fastalign.dpo_loss_fused(
        hidden,
        weight,
        labels,
        ref_hidden=ref_hidden,
        beta=0.3,
        loss_type=loss_type,
        label_smoothing=eps,
        options=fastalign.LogpOptions(backend=backend, grad_mode=grad_mode),
    )
    s, n = R.logps64(hidden, weight, labels)
    ref, _ = R.logps64(ref_hidden, weight.detach(), labels)
    want = PR.FORMULAS[loss_type](PR.pairs_dict(s, ref.detach(), n), PR.options(0.3, eps))
    R.assert_loss_and_grads(out.loss, want, [hidden, weight])


def _ld(token_logps, labels, alpha):
    full, prefix = token_logps.sum(1), PR.naive_prefix_sums(token_logps, labels)
    return prefix + alpha * (full - prefix)


@pytest.mark.parametrize("backend", R.BACKENDS)
@pytest.mark.parametrize("reference", ["stream", "precomputed"])
def test_ld_alpha_wpo_and_rpo_together(backend, reference, device):
    """LD-DPO weighted sums (policy and reference), WPO weights from the fold's log Σ p²,
    and the RPO NLL of the chosen rows, all from one launch."""
    hidden, ref_hidden, weight, labels = _inputs(device)
    token = naive_token_logps(hidden.double(), weight.double(), labels)
    ref_token = naive_token_logps(ref_hidden.double(), weight.double().detach(), labels)
    ld, ref_ld = _ld(token, labels, 0.4), _ld(ref_token, labels, 0.4).detach()
    refs = {"stream": dict(ref_hidden=ref_hidden), "precomputed": dict(ref_logps=ref_ld.float())}
    out = fastalign.dpo_loss_fused(
        hidden,
        weight,
        labels,
        beta=0.3,
        loss_type=["sigmoid", "hinge"],
        loss_weights=[1.0, 0.25],
        rpo_alpha=0.7,
        ld_alpha=0.4,
        use_weighting=True,
        options=fastalign.LogpOptions(backend=backend),
        **refs[reference],
    )
    n = (labels != -100).sum(1)
    log_sum_sq = PR.naive_log_sum_sq(hidden.detach(), weight.detach(), labels)
    pair_weight = PR.wpo_pair_weight(token.sum(1).detach(), log_sum_sq, n)
    P = PR.pairs_dict(ld, ref_ld, n, s_raw=token.sum(1))
    want = PR.combined(
        P, PR.options(0.3), ("sigmoid", "hinge", "sft"), (1.0, 0.25, 0.7), pair_weight
    )
    R.assert_loss_and_grads(out.loss, want, [hidden, weight])
    torch.testing.assert_close(out.chosen_logps.double(), ld[:3].detach(), rtol=1e-5, atol=1e-5)


def test_ld_alpha_packed_equals_padded():
    hidden, ref_hidden, weight, labels = _inputs("cpu")
    kwargs = dict(beta=0.3, ld_alpha=0.5, use_weighting=True)
    padded = fastalign.dpo_loss_fused(hidden, weight, labels, ref_hidden=ref_hidden, **kwargs)
    rows, seq_len = labels.shape
    cu = torch.arange(0, rows * seq_len + 1, seq_len, dtype=torch.int32)
    packed = fastalign.dpo_loss_fused(
        hidden.reshape(rows * seq_len, -1),
        weight,
        labels.reshape(-1),
        ref_hidden=ref_hidden.reshape(rows * seq_len, -1),
        cu_seqlens=cu,
        **kwargs,
    )
    torch.testing.assert_close(packed.loss, padded.loss)


def test_sft_alone_needs_no_reference(monkeypatch):
    """``loss_type="sft"`` is the chosen rows' NLL: no reference stream; recompute is one
    launch of one stream."""
    hidden, _, weight, labels = _inputs("cpu")
    launches = R.record_launches(monkeypatch)
    options = fastalign.LogpOptions(backend="torch", grad_mode="recompute")
    out = fastalign.dpo_loss_fused(hidden, weight, labels, loss_type="sft", options=options)
    s, n = R.logps64(hidden, weight, labels)
    R.assert_loss_and_grads(out.loss, -s[:3].sum() / n[:3].sum(), [hidden, weight])
    assert launches == [1]


def _forbid_recompute(monkeypatch) -> list[int]:
    """Fail any recompute backward; record the store path's groups (their row counts)."""
    from fastalign import torch_backend

    groups, group_logits = [], torch_backend.group_logits
    monkeypatch.setattr(
        torch_backend,
        "group_logits",
        lambda rows, *a: groups.append(len(rows)) or group_logits(rows, *a),
    )
    monkeypatch.setattr(torch_backend, "backward", None)
    return groups


@pytest.mark.parametrize(
    "kwargs",
    [dict(loss_type=t) for t in PAIR_LOSS_TYPES]
    + [dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2], rpo_alpha=0.5)],
    ids=str,
)
def test_every_plain_type_takes_the_store_path(monkeypatch, kwargs):
    """grad_mode="auto" with a trainable lm_head: the store path (no recompute), and the same
    loss and gradients as the recompute path."""
    hidden, ref_hidden, weight, labels = _inputs("cpu")
    kwargs = dict(
        kwargs,
        label_smoothing=EPS.get(kwargs["loss_type"], 0.0)
        if isinstance(kwargs["loss_type"], str)
        else 0.0,
    )
    recompute = fastalign.dpo_loss_fused(
        hidden,
        weight,
        labels,
        ref_hidden=ref_hidden,
        options=fastalign.LogpOptions(grad_mode="recompute"),
        **kwargs,
    )
    want = torch.autograd.grad(recompute.loss, [hidden, weight])
    groups = _forbid_recompute(monkeypatch)
    out = fastalign.dpo_loss_fused(hidden, weight, labels, ref_hidden=ref_hidden, **kwargs)
    got = torch.autograd.grad(out.loss, [hidden, weight])
    assert len(groups) == 1
    torch.testing.assert_close(out.loss, recompute.loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_wpo_with_ld_alpha_recompute_is_one_launch(monkeypatch):
    """The per-token extras (prefix sums, log Σ p²) come from the one recompute launch."""
    hidden, ref_hidden, weight, labels = _inputs("cpu")
    launches = R.record_launches(monkeypatch)
    fastalign.dpo_loss_fused(
        hidden, weight, labels, ref_hidden=ref_hidden, rpo_alpha=1.0, use_weighting=True,
        ld_alpha=0.5, options=fastalign.LogpOptions(grad_mode="recompute"),
    ).loss.backward()  # fmt: skip
    assert launches == [2]  # policy and reference streams, one backend forward
