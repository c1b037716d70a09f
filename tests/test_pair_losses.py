"""Per-pair loss functions (fastalign.losses.pair_losses) vs float64 formulas written from the
papers: values and gradients for every TRL 1.16 type, f-divergences, mixtures, WPO; the
gradient-unit property (a group of pairs is a slice); option errors."""

from __future__ import annotations

import pytest
import torch

from fastalign.losses.pair_config import pair_loss_config, pair_stats
from fastalign.losses.pair_losses import PAIR_LOSS_TYPES, PairParams, combined_pair_losses
from tests import pair_reference as PR

EPS = {"exo_pair": 1e-3, "robust": 0.1, "sigmoid": 0.1, "aot": 0.1, "aot_unpaired": 0.1}


def _sums(pairs=5, spread=1.0):
    """Policy sums (float64, requires grad), reference sums near them, lengths."""
    ref = torch.randn(2 * pairs, dtype=torch.float64) * 3 - 20
    s = (ref + spread * torch.randn(2 * pairs, dtype=torch.float64)).requires_grad_()
    n = torch.randint(1, 12, (2 * pairs,))
    return s, ref, n


def _check(ours, want, s, rtol=1e-10):
    torch.testing.assert_close(ours, want, rtol=rtol, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, s, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(g_ours, g_want, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("name", list(PAIR_LOSS_TYPES))
def test_each_type_value_and_gradient_match_its_paper(name):
    s, ref, n = _sums()
    eps = EPS.get(name, 0.0)
    params = PairParams(beta=0.3, label_smoothing=eps, discopop_tau=0.05)
    ours = combined_pair_losses(pair_stats(s, ref, n), params, [name], [1.0]).mean()
    want = PR.FORMULAS[name](PR.pairs_dict(s, ref, n), PR.options(beta=0.3, eps=eps))
    _check(ours, want, s)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize(
    "name", [t.name for t in PAIR_LOSS_TYPES.values() if t.f_divergence and t.name != "sft"]
)
def test_f_divergence_scores_match_wang_et_al(kind, name):
    s, ref, n = _sums(spread=0.7)
    eps = EPS.get(name, 0.0)
    params = PairParams(
        beta=0.5, label_smoothing=eps, f_divergence_type=kind, f_alpha_divergence_coef=0.3
    )
    ours = combined_pair_losses(pair_stats(s, ref, n), params, [name], [1.0]).mean()
    options = PR.options(beta=0.5, eps=eps, f=kind, fa=0.3)
    _check(ours, PR.FORMULAS[name](PR.pairs_dict(s, ref, n), options), s)


@pytest.mark.parametrize("wpo", [False, True])
def test_mixture_with_weights_and_wpo(wpo):
    """MPO-style list with loss_weights; WPO multiplies every per-pair term by w_w·w_l and
    (as TRL) the batch NLL term by the mean pair weight."""
    s, ref, n = _sums()
    log_sum_sq = (s.detach() * 1.3 - 2.0) if wpo else None
    types, weights = ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0)
    stats = pair_stats(s, ref, n, log_sum_sq=log_sum_sq)
    ours = combined_pair_losses(stats, PairParams(beta=0.3), types, weights).mean()
    pair_weight = PR.wpo_pair_weight(s, log_sum_sq, n) if wpo else None
    want = PR.combined(PR.pairs_dict(s, ref, n), PR.options(beta=0.3), types, weights, pair_weight)
    _check(ours, want, s)


@pytest.mark.parametrize("name", [t.name for t in PAIR_LOSS_TYPES.values() if t.unit == "pair"])
def test_a_group_of_pairs_is_a_slice(name):
    """The gradient-unit property: a group's per-pair losses equal the batch's at its pairs."""
    s, ref, n = _sums(pairs=6)
    params = PairParams(beta=0.3, label_smoothing=EPS.get(name, 0.0))
    stats = pair_stats(s, ref, n, log_sum_sq=s.detach() - 1.0)
    whole = combined_pair_losses(stats, params, [name], [1.0])
    group = torch.tensor([4, 1, 2])
    torch.testing.assert_close(
        combined_pair_losses(stats.subset(group), params, [name], [1.0]), whole[group]
    )


def test_units_declared():
    config = pair_loss_config(["sigmoid", "sft"], use_weighting=True)
    assert config.unit == "batch"  # the NLL term scaled by the batch's mean WPO weight
    assert pair_loss_config(["sigmoid", "sft"]).unit == "pair"
    assert pair_loss_config("aot").unit == "batch"
    assert not pair_loss_config("sft").needs_reference
    assert pair_loss_config("hinge", rpo_alpha=0.5).loss_types == ("hinge", "sft")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(loss_type="kto_pair"), ValueError, "loss_type must be one of"),
        (dict(loss_type=[]), TypeError, "loss_type must be a string"),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ValueError, "loss_weights has 1"),
        (dict(loss_weights="1"), TypeError, "loss_weights must be a list"),
        (dict(loss_type="exo_pair"), ValueError, "label_smoothing must be > 0 for loss_type"),
        (
            dict(label_smoothing=0.5),
            ValueError,
            r"label_smoothing must be a finite number in \[0, 0.5\)",
        ),
        (dict(loss_type="nca_pair", f_divergence_type="js_divergence"), ValueError, "nca_pair"),
        (dict(f_divergence_type="kl"), ValueError, "f_divergence_type must be one of"),
        (dict(loss_type="aot", use_weighting=True), ValueError, "use_weighting"),
        (dict(ld_alpha=1.5), ValueError, r"ld_alpha must be a finite number in \[0, 1\]"),
        (dict(rpo_alpha=-1.0), ValueError, "rpo_alpha must be a finite number >= 0"),
        (dict(discopop_tau=0.0), ValueError, "discopop_tau"),
        (dict(use_weighting=1), TypeError, "use_weighting must be a bool"),
    ],
)
def test_option_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        pair_loss_config(**kwargs)
