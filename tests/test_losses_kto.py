"""KTO vs the float64 formula, z0 semantics (mismatched pairs, detached, clamped,
all-reduced over gloo), helpers, TRL's loss/metrics, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.multiprocessing as mp

import fastalign
from tests import loss_reference as R
from tests.distributed import free_port, set_rank_env

DESIRABLE = torch.tensor([True, False, True, False, False, True])


def kto_inputs(rows=6, seq_len=7, hidden_size=17, vocab=97, device="cpu"):
    hidden = torch.randn(rows, seq_len, hidden_size)
    weight = torch.randn(vocab, hidden_size) / hidden_size**0.5
    labels = torch.randint(0, vocab, (rows, seq_len))
    labels[:, :2] = -100
    ref_hidden = torch.randn(rows, seq_len, hidden_size)
    kl_hidden = torch.randn(rows, seq_len, hidden_size)
    kl_labels = labels.roll(1, 0)
    kl_ref_hidden = torch.randn(rows, seq_len, hidden_size)
    hidden, weight, *rest = (
        t.to(device)
        for t in (hidden, weight, labels, ref_hidden, kl_hidden, kl_labels, kl_ref_hidden)
    )
    return (hidden.requires_grad_(), weight.requires_grad_(), *rest)


@pytest.mark.parametrize("backend", R.BACKENDS)
@pytest.mark.parametrize("reference", ["stream", "precomputed"])
def test_kto_matches_formula(backend, reference, device):
    hidden, weight, labels, ref_hidden, kl_hidden, kl_labels, kl_ref_hidden = kto_inputs(
        device=device
    )
    desirable = DESIRABLE.to(device)
    # Shift the policy's KL rows so that z0 > 0 and the clamp is inactive.
    kl_hidden = kl_hidden * 0.5
    s, _ = R.logps64(hidden, weight, labels)
    ref_s, _ = R.logps64(ref_hidden, weight.detach(), labels)
    kl_s, _ = R.logps64(kl_hidden, weight.detach(), kl_labels)
    kl_ref_s, _ = R.logps64(kl_ref_hidden, weight.detach(), kl_labels)
    if reference == "stream":
        refs = dict(ref_hidden=ref_hidden, kl_ref_hidden=kl_ref_hidden)
    else:
        refs = dict(ref_logps=ref_s.float(), kl_ref_logps=kl_ref_s.float())
    out = fastalign.kto_loss_fused(
        hidden,
        weight,
        labels,
        desirable,
        kl_hidden=kl_hidden,
        kl_labels=kl_labels,
        beta=0.4,
        desirable_weight=1.3,
        undesirable_weight=1.0,
        options=fastalign.LogpOptions(backend=backend),
        **refs,
    )
    naive, z0 = R.kto(s, ref_s.detach(), desirable, kl_s.detach(), kl_ref_s.detach(), 0.4, 1.3, 1.0)
    R.assert_loss_and_grads(out.loss, naive, [hidden, weight])
    torch.testing.assert_close(out.kl.double(), z0, rtol=1e-4, atol=1e-5)


def test_z0_is_detached_and_clamped():
    hidden, weight, labels, ref_hidden, kl_hidden, kl_labels, kl_ref_hidden = kto_inputs()
    common = dict(ref_hidden=ref_hidden, beta=0.4)
    # A sharper reference on the same mismatched rows (3x the hidden states) gives random
    # labels lower log-probs, so z0 > 0 and the clamp is inactive: a z0 that kept its graph
    # would change the gradients below.
    streamed = fastalign.kto_loss_fused(
        hidden,
        weight,
        labels,
        DESIRABLE,
        kl_hidden=kl_hidden,
        kl_labels=kl_labels,
        kl_ref_hidden=kl_hidden * 3.0,
        **common,
    )
    assert float(streamed.kl) > 0.5
    # Same z0 given as a constant: identical loss and gradients, so z0 adds no gradient.
    fixed = fastalign.kto_loss_fused(hidden, weight, labels, DESIRABLE, kl=streamed.kl, **common)
    assert torch.equal(streamed.loss, fixed.loss)
    for a, b in zip(
        torch.autograd.grad(streamed.loss, [hidden, weight]),
        torch.autograd.grad(fixed.loss, [hidden, weight]),
    ):
        assert torch.equal(a, b)
    # Mismatched rows scored below the reference (uniform policy, −log 97 per token, against
    # a reference of log-prob 0): the mean difference is negative and z0 clamps to 0.
    negative = fastalign.kto_loss_fused(
        hidden,
        weight,
        labels,
        DESIRABLE,
        kl_hidden=kl_ref_hidden * 0.0,
        kl_labels=kl_labels,
        kl_ref_logps=torch.zeros(6),
        **common,
    )
    assert float(negative.kl) == 0.0  # mean log-prob < 0 = reference → clamped


def test_all_streams_share_one_launch(monkeypatch):
    calls = R.record_launches(monkeypatch)
    hidden, weight, labels, ref_hidden, kl_hidden, kl_labels, kl_ref_hidden = kto_inputs()
    kl_hidden.requires_grad_()
    out = fastalign.kto_loss_fused(
        hidden,
        weight,
        labels,
        DESIRABLE,
        ref_hidden=ref_hidden,
        kl_hidden=kl_hidden,
        kl_labels=kl_labels,
        kl_ref_hidden=kl_ref_hidden,
        options=fastalign.LogpOptions(grad_mode="recompute"),
    )
    assert calls == [4]  # policy, reference, mismatched policy, mismatched reference
    out.loss.backward()
    assert kl_hidden.grad is None


@pytest.mark.parametrize(
    "desirable,w_d,w_u",
    [(DESIRABLE, 1.0, 2.0), (DESIRABLE, 1.3, 1.0), (torch.ones(6, dtype=torch.bool), 1.0, 1.0)],
)
def test_loss_and_metrics_match_trl(desirable, w_d, w_u):
    """TRL's KTOTrainer._compute_loss on the same log-probs: loss, ``kl`` (the clamped
    mismatched-pair mean) and the class means it logs (none for an absent class)."""
    pytest.importorskip("trl")
    from tests.trl_peer import trl_kto

    hidden, weight, labels, _, kl_hidden, kl_labels, _ = kto_inputs()
    ref_logps = torch.randn(6) - 40
    kl_ref_logps = torch.randn(6) - 60  # z0 > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weights outside the paper's range are on purpose
        out = fastalign.kto_loss_fused(
            hidden,
            weight,
            labels,
            desirable,
            ref_logps=ref_logps,
            kl_hidden=kl_hidden,
            kl_labels=kl_labels,
            kl_ref_logps=kl_ref_logps,
            beta=0.3,
            desirable_weight=w_d,
            undesirable_weight=w_u,
        )
    kl_policy = fastalign.sequence_logps(kl_hidden, weight, kl_labels).logps.detach()
    trl_loss, trl_metrics = trl_kto(
        out.logps, ref_logps, desirable, kl_policy, kl_ref_logps, beta=0.3, w_d=w_d, w_u=w_u
    )
    assert float(out.loss.detach()) == pytest.approx(trl_loss, rel=1e-5)
    ours = out.metrics()
    loss_metrics = {k for k in trl_metrics if k == "kl" or k.split("/")[0] in ("rewards", "logps")}
    assert {k for k in ours if not k.startswith("count/")} == loss_metrics
    assert float(out.kl) > 0
    for name in loss_metrics:
        assert ours[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name
    assert ours["count/chosen"] == float(desirable.sum())


def _allreduce_worker(rank, world, port, kl_policy_all, kl_ref_all, results):
    set_rank_env(rank, world, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        hidden, weight, labels, *_ = kto_inputs(rows=4)
        # Each rank has its own mismatched rows and reference sums; z0 must use both ranks'.
        kl_hidden = torch.randn(4, 7, 17)
        kl_labels = labels.roll(1, 0)
        kl_policy = fastalign.sequence_logps(kl_hidden, weight, kl_labels).logps
        kl_policy_all[rank] = kl_policy.detach()
        out = fastalign.kto_loss_fused(
            hidden,
            weight,
            labels,
            DESIRABLE[:4],
            ref_logps=torch.zeros(4),
            kl_hidden=kl_hidden,
            kl_labels=kl_labels,
            kl_ref_logps=kl_ref_all[rank],
        )
        results[rank] = out.kl
    finally:
        torch.distributed.destroy_process_group()


def test_z0_is_all_reduced_over_gloo():
    manager = mp.Manager()
    kl_policy_all, results = manager.dict(), manager.dict()
    kl_ref_all = {0: torch.full((4,), -80.0), 1: torch.full((4,), -20.0)}
    mp.spawn(
        _allreduce_worker,
        args=(2, free_port(), kl_policy_all, kl_ref_all, results),
        nprocs=2,
        join=True,
    )
    diffs = torch.cat([kl_policy_all[r] - kl_ref_all[r] for r in (0, 1)])
    expected = diffs.double().mean().clamp_min(0).float()
    assert float(expected) > 0
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], expected, rtol=1e-6, atol=1e-6)
    # And each rank alone would have used a different z0.
    local = (kl_policy_all[0] - kl_ref_all[0]).mean().clamp_min(0)
    assert abs(float(local) - float(expected)) > 1.0


@pytest.mark.parametrize("offset,partner", [(1, [1, 2, 0]), (-1, [2, 0, 1])])
def test_mismatched_pairs(offset, partner):
    prompts = [[1, 2], [3], [4, 5, 6]]
    completions = [[10], [20, 21], [30, 31, 32]]
    batch = fastalign.mismatched_pairs(prompts, completions, offset=offset)
    for i, j in enumerate(partner):
        n_p, n = len(prompts[i]), len(prompts[i]) + len(completions[j])
        assert batch["input_ids"][i, :n].tolist() == prompts[i] + completions[j]
        assert batch["labels"][i, :n_p].tolist() == [-100] * n_p
        assert batch["labels"][i, n_p:n].tolist() == completions[j]
        assert (batch["labels"][i, n:] == -100).all() and batch["attention_mask"][i].sum() == n


def test_offset_minus_one_is_trls_cycling():
    completions = [[10], [20, 21], [30, 31, 32], [40]]
    cycled = completions[-1:] + completions[:-1]  # TRL's KTO collator builds its KL rows so
    batch = fastalign.mismatched_pairs([[1, 2]] * 4, completions, offset=-1)
    for row, want in zip(batch["labels"], cycled):
        assert row[row != -100].tolist() == want


def test_mismatched_pairs_errors():
    with pytest.raises(ValueError, match="at least 2 examples"):
        fastalign.mismatched_pairs([[1]], [[2]])
    with pytest.raises(ValueError, match="offset must be an int not divisible"):
        fastalign.mismatched_pairs([[1], [2]], [[3], [4]], offset=2)
    with pytest.raises(ValueError, match="completion_ids has 1 examples"):
        fastalign.mismatched_pairs([[1], [2]], [[3]])


def test_class_weights_meet_the_paper_range():
    for n_d, n_u, ratio in [(100, 1000, 1.0), (1000, 100, 1.5), (50, 50, 1.25), (7, 3, 1.0)]:
        w_d, w_u = fastalign.kto_class_weights(n_d, n_u, target_ratio=ratio)
        assert min(w_d, w_u) == 1.0
        assert w_d * n_d / (w_u * n_u) == pytest.approx(ratio)
    assert fastalign.kto_class_weights(100, 1000) == (10.0, 1.0)  # the paper's 1:10 example
    with pytest.warns(UserWarning, match="outside the KTO paper's recommended"):
        fastalign.kto_class_weights(1, 1, target_ratio=2.0)
    with pytest.raises(ValueError, match="n_desirable must be an int >= 1"):
        fastalign.kto_class_weights(0, 5)


def test_weights_outside_range_warn():
    hidden, weight, labels, *_ = kto_inputs()
    args = (hidden, weight, labels, DESIRABLE)
    with pytest.warns(UserWarning, match=r"λ_D·n_D/\(λ_U·n_U\) = 3"):
        fastalign.kto_loss_fused(*args, ref_logps=torch.zeros(6), kl=0.0, desirable_weight=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastalign.kto_loss_fused(*args, ref_logps=torch.zeros(6), kl=0.0, desirable_weight=1.4)


def kl_rows(rows, **extra):
    """Keywords giving ``rows`` mismatched-pair rows (hidden [rows, 7, 17]) instead of ``kl``."""
    kl_labels = torch.zeros(rows, 7, dtype=torch.long)
    return dict(kl=None, kl_hidden=torch.randn(rows, 7, 17), kl_labels=kl_labels, **extra)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(desirable=torch.ones(6)), TypeError, "desirable must be a bool tensor"),
        (
            dict(desirable=torch.ones(5, dtype=torch.bool)),
            ValueError,
            r"desirable must have shape \[6\]",
        ),
        (dict(kl=None), ValueError, "z0 needs the mismatched-pair rows"),
        (kl_rows(1, kl_ref_logps=torch.zeros(1)), ValueError, "at least 2 rows"),
        (kl_rows(6), ValueError, "exactly one of kl_ref_hidden and kl_ref_logps"),
        (
            kl_rows(6, kl_ref_logps=torch.zeros(5)),
            ValueError,
            r"kl_ref_logps must have shape \[6\]",
        ),
        (
            dict(kl_hidden=torch.randn(6, 7, 17)),
            ValueError,
            "either kl .* or the kl_\\* mismatched",
        ),
        (dict(kl=float("nan")), ValueError, "kl must be a finite scalar"),
        (dict(beta=-0.1), ValueError, "beta"),
        (dict(desirable_weight=0.0), ValueError, "desirable_weight"),
        (dict(ref_logps=None), ValueError, "give exactly one reference"),
    ],
)
def test_kto_errors(kwargs, error, match):
    hidden, weight, labels, *_ = kto_inputs()
    args = dict(desirable=DESIRABLE, ref_logps=torch.zeros(6), kl=0.0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fastalign.kto_loss_fused(hidden, weight, labels, args.pop("desirable"), **args)
