"""SimPO, ORPO, CPO (all TRL variants) and KTO's apo_zero_unpaired: float64 paper formulas on
both backends (values and gradients), Liger's fused ops (values, gradients, metrics), TRL's
loss code (values, rewards, metrics)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fastalign
from tests import loss_reference as R


def _inputs(device="cpu"):
    hidden, _, weight, labels = R.paired_inputs(pairs=3, seq_len=6, device=device)
    labels[4, 4:] = -100
    return hidden, weight, labels


def _stats64(hidden, weight, labels):
    s, n = R.logps64(hidden, weight, labels)
    b = s.shape[0] // 2
    mean = s / n.double()
    nll = -s[:b].sum() / n[:b].sum()
    return s[:b], s[b:], mean[:b], mean[b:], nll


def _smoothed(x, eps):
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _log_odds(m):  # log(p/(1-p)) with p = e^m
    return m - torch.log(1 - torch.exp(m))


def simpo64(h, w, y, beta, gamma, eps, nll_weight):  # Meng et al. 2024, eq. 6
    _, _, mw, ml, nll = _stats64(h, w, y)
    return _smoothed(beta * (mw - ml) - gamma, eps).mean() + nll_weight * nll


def orpo64(h, w, y, beta):  # Hong et al. 2024, eq. 6-7 (β = λ)
    _, _, mw, ml, nll = _stats64(h, w, y)
    return nll - beta * F.logsigmoid(_log_odds(mw) - _log_odds(ml)).mean()


def cpo64(h, w, y, beta, loss_type, eps, cpo_alpha, gamma, alpha, average):
    """Xu et al. 2024 eq. 3 (sigmoid) and TRL's variants; AlphaPO (Gupta et al. 2025) shape."""
    sw, sl, mw, ml, nll = _stats64(h, w, y)
    cw, cl = (mw, ml) if average else (sw, sl)
    if alpha:
        cw, cl = (1 - torch.exp(cw) ** -alpha) / alpha, (1 - torch.exp(cl) ** -alpha) / alpha
    u = cw - cl
    per = {
        "sigmoid": lambda: _smoothed(beta * u, eps),
        "simpo": lambda: _smoothed(beta * u - gamma, eps),
        "hinge": lambda: torch.clamp(1 - beta * u, min=0),
        "ipo": lambda: (u - 1 / (2 * beta)) ** 2,
    }[loss_type]()
    return per.mean() + cpo_alpha * nll


CPO_CASES = [
    dict(loss_type="sigmoid", label_smoothing=0.1),
    dict(loss_type="hinge", cpo_alpha=0.0),
    dict(loss_type="ipo"),
    dict(loss_type="simpo", simpo_gamma=0.3, label_smoothing=0.05),
    dict(loss_type="sigmoid", alphapo_alpha=0.02, average_log_prob=False),
    dict(loss_type="alphapo", alphapo_alpha=0.3),
]


def _cpo_reference_args(case):
    loss_type = case["loss_type"]
    alphapo = loss_type == "alphapo"
    loss_type = "simpo" if alphapo else loss_type
    average = case.get("average_log_prob", loss_type in ("ipo", "simpo"))
    cpo_alpha = 0.0 if alphapo else case.get("cpo_alpha", 1.0)
    eps, gamma = case.get("label_smoothing", 0.0), case.get("simpo_gamma", 0.5)
    return loss_type, eps, cpo_alpha, gamma, case.get("alphapo_alpha", 0.0), average


@pytest.mark.parametrize("backend", R.BACKENDS)
@pytest.mark.parametrize("family", ["simpo", "simpo_nll", "orpo", *range(len(CPO_CASES))])
def test_matches_float64_formula(backend, family, device):
    hidden, weight, labels = _inputs(device)
    options = fastalign.LogpOptions(backend=backend)
    if family in ("simpo", "simpo_nll"):
        nll_weight = 0.5 if family == "simpo_nll" else 0.0
        out = fastalign.simpo_loss_fused(
            hidden, weight, labels, beta=2.0, gamma=0.4, label_smoothing=0.1,
            nll_weight=nll_weight, options=options,
        )  # fmt: skip
        want = simpo64(hidden, weight, labels, 2.0, 0.4, 0.1, nll_weight)
    elif family == "orpo":
        out = fastalign.orpo_loss_fused(hidden, weight, labels, beta=0.2, options=options)
        want = orpo64(hidden, weight, labels, 0.2)
    else:
        case = CPO_CASES[family]
        out = fastalign.cpo_loss_fused(hidden, weight, labels, beta=0.2, options=options, **case)
        want = cpo64(hidden, weight, labels, 0.2, *_cpo_reference_args(case))
    R.assert_loss_and_grads(out.loss, want, [hidden, weight])


def _liger(name):
    pytest.importorskip("liger_kernel")
    from liger_kernel import chunked_loss

    return getattr(chunked_loss, name)


LIGER_CASES = [
    ("simpo", dict(beta=2.0, gamma=0.4, label_smoothing=0.1, nll_weight=0.3),
     "LigerFusedLinearSimPOLoss", dict(beta=2.0, gamma=0.4, label_smoothing=0.1, alpha=0.3)),
    ("simpo", dict(beta=0.5), "LigerFusedLinearSimPOLoss", dict(beta=0.5, compute_nll_loss=False)),
    ("orpo", dict(beta=0.2), "LigerFusedLinearORPOLoss", dict(beta=0.2)),
    ("cpo", dict(beta=0.2, cpo_alpha=0.7, label_smoothing=0.1),
     "LigerFusedLinearCPOLoss", dict(beta=0.2, alpha=0.7, label_smoothing=0.1)),
    ("cpo", dict(beta=0.2, average_log_prob=True),
     "LigerFusedLinearCPOLoss", dict(beta=0.2, average_log_prob=True)),
]  # fmt: skip


@pytest.mark.parametrize("family,ours_kwargs,liger_name,liger_kwargs", LIGER_CASES)
def test_matches_liger_fused_op(family, ours_kwargs, liger_name, liger_kwargs):
    """Liger's own chunked op (compiled=False, CPU) on the same inputs: loss, gradients to
    hidden and lm_head, the log-probs it reads, rewards and NLL."""
    hidden, weight, labels = _inputs()
    fused = getattr(fastalign, f"{family}_loss_fused")
    out = fused(
        hidden, weight, labels, options=fastalign.LogpOptions(backend="torch"), **ours_kwargs
    )
    liger_loss, aux = _liger(liger_name)(compiled=False, **liger_kwargs)(weight, hidden, labels)
    torch.testing.assert_close(out.loss, liger_loss, rtol=1e-5, atol=1e-6)
    ours = torch.autograd.grad(out.loss, [hidden, weight])
    theirs = torch.autograd.grad(liger_loss, [hidden, weight])
    for g_ours, g_theirs in zip(ours, theirs):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)
    chosen_logps, rejected_logps, _, _, nll, chosen_rewards, rejected_rewards = aux[:7]
    torch.testing.assert_close(out.chosen_logps, chosen_logps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards, rtol=1e-5, atol=1e-6)
    if liger_kwargs.get("compute_nll_loss", True):
        assert out.metrics()["nll_loss"] == pytest.approx(float(nll), rel=1e-5)
    if family == "orpo":  # Liger's extra outputs: mean logσ(log odds), mean log odds
        assert out.metrics()["log_odds_ratio"] == pytest.approx(float(aux[7]), rel=1e-5)
        assert out.metrics()["log_odds_chosen"] == pytest.approx(float(aux[8]), rel=1e-5)


@pytest.mark.parametrize("case", [*CPO_CASES, "orpo"])
def test_matches_trl_loss_code(case):
    """TRL's experimental CPOTrainer.cpo_loss / ORPOTrainer.odds_ratio_loss, called on the
    log-probs our op produced (mean where TRL averages)."""
    hidden, weight, labels = _inputs()
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    if case == "orpo":
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer

        out = fastalign.orpo_loss_fused(hidden, weight, labels, beta=0.2)
        trainer = SimpleNamespace(beta=0.2, accelerator=accelerator)
        losses, chosen, rejected, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
            trainer, out.chosen_logps, out.rejected_logps
        )
        trl_loss = out.metrics()["nll_loss"] - losses.mean()
        assert out.metrics()["log_odds_ratio"] == pytest.approx(float(ratio), rel=1e-5)
        assert out.metrics()["log_odds_chosen"] == pytest.approx(float(log_odds), rel=1e-5)
    else:
        from trl.experimental.cpo.cpo_trainer import CPOTrainer

        out = fastalign.cpo_loss_fused(hidden, weight, labels, beta=0.2, **case)
        loss_type, eps, cpo_alpha, gamma, alpha, _ = _cpo_reference_args(case)
        trainer = SimpleNamespace(
            beta=0.2, label_smoothing=eps, loss_type=loss_type, simpo_gamma=gamma, alpha=alpha,
            accelerator=accelerator,
        )  # fmt: skip
        losses, chosen, rejected = CPOTrainer.cpo_loss(
            trainer, out.chosen_logps, out.rejected_logps
        )
        trl_loss = losses.mean() + cpo_alpha * out.metrics()["nll_loss"]
    assert float(out.loss) == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(out.chosen_rewards, chosen)
    torch.testing.assert_close(out.rejected_rewards, rejected)


@pytest.mark.parametrize("backend", R.BACKENDS)
def test_kto_apo_zero_unpaired(backend, device):
    """APO-zero unpaired: float64 formula on both backends, and TRL's KTOTrainer code."""
    from tests.trl_peer import _kto_module, _model, _trainer

    hidden, weight, labels = _inputs(device)
    ref_hidden = torch.randn_like(hidden)
    desirable = torch.tensor([True, False, True, True, False, False], device=device)
    out = fastalign.kto_loss_fused(
        hidden, weight, labels, desirable, ref_hidden=ref_hidden, beta=0.3,
        desirable_weight=1.2, loss_type="apo_zero_unpaired",
        options=fastalign.LogpOptions(backend=backend),
    )  # fmt: skip
    s, _ = R.logps64(hidden, weight, labels)
    ref, _ = R.logps64(ref_hidden, weight.detach(), labels)
    r = s - ref.detach()
    want = torch.where(desirable, 1.2 * (1 - torch.sigmoid(0.3 * r)), torch.sigmoid(0.3 * r))
    R.assert_loss_and_grads(out.loss, want.mean(), [hidden, weight])
    trainer = _trainer(
        model=_model(out.logps.cpu()), beta=0.3, loss_type="apo_zero_unpaired",
        calculate_KL=False, precompute_ref_logps=True, desirable_weight=1.2,
        undesirable_weight=1.0, _compute_kl_logps=lambda model, batch: None,
    )  # fmt: skip
    rows = labels.shape[0]
    inputs = {
        "input_ids": torch.zeros(rows, 2, dtype=torch.long),
        "attention_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_mask": torch.ones(rows, 2, dtype=torch.long),
        "label": desirable.cpu(),
        "ref_logps": ref.float().cpu(),
    }
    trl_loss = _kto_module.KTOTrainer._compute_loss(trainer, trainer.model, inputs, False)
    assert float(out.loss) == pytest.approx(float(trl_loss), rel=1e-5)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for name, value in out.metrics().items():
        if name in trl_metrics:
            assert value == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize(
    "fn,kwargs,error,match",
    [
        ("simpo", dict(beta=0.0), ValueError, "beta"),
        ("simpo", dict(gamma=-1.0), ValueError, "gamma must be"),
        ("simpo", dict(label_smoothing=0.5), ValueError, "label_smoothing must be"),
        ("simpo", dict(ref_logps=torch.zeros(6)), TypeError, "unexpected.*ref_logps"),
        ("orpo", dict(beta="x"), TypeError, "beta must be a number"),
        ("cpo", dict(loss_type="kto_pair"), ValueError, "loss_type must be one of"),
        ("cpo", dict(loss_type="hinge", label_smoothing=0.1), ValueError, "does not apply"),
        ("cpo", dict(average_log_prob=1), TypeError, "average_log_prob must be"),
        ("cpo", dict(cpo_alpha=-1.0), ValueError, "cpo_alpha must be"),
    ],
)
def test_errors(fn, kwargs, error, match):
    hidden, weight, labels = _inputs()
    with pytest.raises(error, match=match):
        getattr(fastalign, f"{fn}_loss_fused")(hidden, weight, labels, **kwargs)


def test_kto_apo_rejects_reference_point_inputs():
    hidden, weight, labels = _inputs()
    desirable = torch.tensor([True, False] * 3)
    with pytest.raises(ValueError, match="kl is not used by loss_type 'apo_zero_unpaired'"):
        fastalign.kto_loss_fused(
            hidden, weight, labels, desirable, ref_logps=torch.zeros(6), kl=0.0,
            loss_type="apo_zero_unpaired",
        )  # fmt: skip


@pytest.mark.parametrize("name", ["simpo", "orpo", "cpo", "kto"])
def test_store_path_equals_recompute(monkeypatch, name):
    """grad_mode="auto" takes the store path (no recompute backward) and matches recompute."""
    from fastalign import torch_backend

    hidden, weight, labels = _inputs()
    if name == "kto":
        desirable = torch.tensor([True, False, True, True, False, False])
        extra = dict(ref_logps=torch.randn(6) - 30, loss_type="apo_zero_unpaired")

        def call(**kw):
            return fastalign.kto_loss_fused(hidden, weight, labels, desirable, **extra, **kw)
    else:
        fn = getattr(fastalign, f"{name}_loss_fused")

        def call(**kw):
            return fn(hidden, weight, labels, **kw)

    recompute = call(options=fastalign.LogpOptions(grad_mode="recompute"))
    want = torch.autograd.grad(recompute.loss, [hidden, weight])
    monkeypatch.setattr(torch_backend, "backward", None)  # any recompute would fail
    out = call()
    got = torch.autograd.grad(out.loss, [hidden, weight])
    torch.testing.assert_close(out.loss, recompute.loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
