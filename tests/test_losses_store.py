"""The store path (gradients formed in the forward per gradient unit) against the float64
formulas and against the recompute path, on both backends, for every loss and variant; its
autograd contract (grad_output ≠ 1, nothing written to .grad in forward, a second backward
raises, bit-identical reruns) and its budget rule (groups of whole units, fallback)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastalign
from fastalign import torch_backend
from tests import loss_reference as R
from tests.reference import naive_sequence_logps

PAIRS, SEQ, HID, VOCAB = 3, 7, 17, 97
TRANSFORM = dict(logit_scale=1.3, temperature=0.8, logit_softcap=4.0)


def inputs(device="cpu", packed=False):
    """Every tensor any loss takes; row 1 of the policy labels is entirely ignored."""
    rows = 2 * PAIRS

    def states(n=rows, t=SEQ):
        return torch.randn(n, t, HID)

    labels = torch.randint(0, VOCAB, (rows, SEQ))
    labels[:, :2] = -100
    labels[1] = -100
    labels[4, 5:] = -100
    x = dict(
        hidden=states(),
        weight=torch.randn(VOCAB, HID) / HID**0.5,
        bias=torch.randn(VOCAB) / 4,
        labels=labels,
        ref_hidden=states(),
        kl_hidden=states(),
        kl_labels=labels.roll(1, 0),
        kl_ref_hidden=states(),
        sample_hidden=states(4, SEQ + 1),
        sample_labels=torch.randint(0, VOCAB, (4, SEQ + 1)),
        desirable=torch.tensor([True, False, True, False, False, True]),
    )
    if packed:  # [N, H] with cu_seqlens, same sequences
        for key in ("hidden", "ref_hidden"):
            x[key] = x[key].reshape(rows * SEQ, HID)
        x["labels"] = x["labels"].reshape(rows * SEQ)
        x["cu_seqlens"] = torch.arange(0, rows * SEQ + 1, SEQ, dtype=torch.int32)
    return {k: v.to(device) for k, v in x.items()}


# name: (loss, loss kwargs from x, formula-side options). The formula side reads the same.
CASES = {
    "dpo-stream": ("dpo", dict(ref="stream"), {}),
    "dpo-precomputed": ("dpo", dict(ref="precomputed"), {}),
    "dpo-free": ("dpo", dict(ref="free"), {}),
    "cdpo": ("dpo", dict(ref="stream", label_smoothing=0.2), {}),
    "robust": ("dpo", dict(ref="stream", loss_type="robust", label_smoothing=0.1), {}),
    "dpo-transform-bias": ("dpo", dict(ref="stream", bias=True, **TRANSFORM), {}),
    "dpo-packed-shift": ("dpo", dict(ref="stream", packed=True, shift=True), {}),
    "ipo-normalised": ("ipo", dict(ref="stream"), {}),
    "ipo-sums": ("ipo", dict(ref="precomputed", length_normalize=False), {}),
    "kto-unclamped": ("kto", dict(ref="stream", kl_scale=0.3), {}),
    "kto-clamped": ("kto", dict(ref="precomputed", kl_scale=1.0), {}),
    "kto-desirable-only": ("kto", dict(ref="stream", one_class=True), {}),
    "kto-undesirable-only": ("kto", dict(ref="stream", one_class=False), {}),
    "kto-transform-bias-shift": ("kto", dict(ref="stream", bias=True, shift=True, **TRANSFORM), {}),
    "typo-samples": ("typo", dict(lam=0.3), {}),
    "typo-no-samples": ("typo", dict(lam=0.0), {}),
    "typo-transform-bias": ("typo", dict(lam=0.3, bias=True, **TRANSFORM), {}),
}


def call(loss, opts, x, backend, grad_mode):
    """The fused loss of a case: its output and the gradient leaves."""
    opts = dict(opts)
    options = dict(backend=backend, grad_mode=grad_mode)
    for key in ("shift", *TRANSFORM):
        if key in opts:
            options[key] = opts.pop(key)
    common = dict(options=fastalign.LogpOptions(**options))
    if opts.pop("bias", False):
        common["bias"] = x["bias"]
    if opts.pop("packed", False):
        common["cu_seqlens"] = x["cu_seqlens"]
    ref = opts.pop("ref", None)
    args = (x["hidden"], x["weight"], x["labels"])
    if loss == "typo":
        lam = opts["lam"]
        samples = (
            {}
            if lam == 0
            else dict(sample_hidden=x["sample_hidden"], sample_labels=x["sample_labels"])
        )
        return fastalign.typo_loss_fused(*args, lam=lam, **samples, **common)
    refs = {
        "stream": dict(ref_hidden=x["ref_hidden"]),
        "precomputed": dict(ref_logps=x.get("ref_logps")),
        "free": dict(reference_free=True),
    }[ref]
    if loss == "kto":
        kl_scale, one_class = opts.pop("kl_scale", 0.5), opts.pop("one_class", None)
        desirable = (
            x["desirable"] if one_class is None else torch.full_like(x["desirable"], one_class)
        )
        kl = dict(kl_hidden=x["kl_hidden"] * kl_scale, kl_labels=x["kl_labels"])
        kl.update(kl_ref_hidden=x["kl_ref_hidden"]) if ref == "stream" else kl.update(
            kl_ref_logps=x["kl_ref_logps"]
        )
        return fastalign.kto_loss_fused(
            *args, desirable, beta=0.4, desirable_weight=1.3, **refs, **kl, **common, **opts
        )
    fn = fastalign.dpo_loss_fused if loss == "dpo" else fastalign.ipo_loss_fused
    return fn(*args, beta=0.3, **refs, **common, **opts)


def truth(loss, opts, x, leaves64):
    """The loss from its float64 formula (full logits), differentiable in ``leaves64``."""
    hidden, weight, bias, sample_hidden = leaves64
    opts = dict(opts)
    transform = {k: opts.pop(k) for k in TRANSFORM if k in opts}
    kw = dict(shift=opts.pop("shift", False), **transform)
    use_bias = opts.pop("bias", False)
    packed = opts.pop("packed", False)

    def logps(h, labels, grad=True, cu=None):
        w, b = (weight, bias if use_bias else None)
        if not grad:
            w, b = w.detach(), None if b is None else b.detach()
        return naive_sequence_logps(h.double(), w, labels, bias=b, cu_seqlens=cu, **kw)

    s, n = logps(hidden, x["labels"], cu=x["cu_seqlens"] if packed else None)
    ref = opts.pop("ref", None)
    if ref == "stream":
        ref_s = logps(x["ref_hidden"], x["labels"], False, x["cu_seqlens"] if packed else None)[0]
    elif ref == "precomputed":
        ref_s = x["ref_logps"].double()
    if loss == "typo":
        lam = opts["lam"]
        sample = logps(sample_hidden, x["sample_labels"])[0] if lam else torch.zeros(1)
        return R.typo(s, sample.to(s.device), lam)
    if loss == "dpo":
        ref_s = torch.zeros_like(s) if ref == "free" else ref_s
        return R.dpo(
            s, ref_s, 0.3, opts.get("loss_type", "sigmoid"), opts.get("label_smoothing", 0.0)
        )
    if loss == "ipo":
        return R.ipo(s, ref_s, n, 0.3, opts.get("length_normalize", True))
    kl_scale, one_class = opts.get("kl_scale", 0.5), opts.get("one_class")
    desirable = x["desirable"] if one_class is None else torch.full_like(x["desirable"], one_class)
    kl_s = logps(x["kl_hidden"] * kl_scale, x["kl_labels"], False)[0]
    if ref == "stream":
        kl_ref = logps(x["kl_ref_hidden"], x["kl_labels"], False)[0]
    else:
        kl_ref = x["kl_ref_logps"].double()
    return R.kto(s, ref_s, desirable, kl_s, kl_ref, 0.4, w_d=1.3)[0]


def case_inputs(case, device):
    """Inputs of a case, with the precomputed reference sums its formula side uses."""
    loss, opts, _ = CASES[case]
    x = inputs(device, packed=opts.get("packed", False))
    with torch.no_grad():
        w = x["weight"].double()
        ref = naive_sequence_logps(
            x["ref_hidden"].double(), w, x["labels"], cu_seqlens=x.get("cu_seqlens")
        )
        x["ref_logps"] = ref[0].float()
        x["kl_ref_logps"] = naive_sequence_logps(x["kl_ref_hidden"].double(), w, x["kl_labels"])[
            0
        ].float()
    for leaf in ("hidden", "weight", "bias", "sample_hidden"):
        x[leaf].requires_grad_()
    return loss, opts, x


def close(got, want, rtol, name):
    """Max error relative to the largest magnitude of ``want`` (None must match None)."""
    assert (got is None) == (want is None), f"{name}: {got is None} vs {want is None}"
    if got is None:
        return
    scale = want.detach().double().abs().max().clamp_min(1e-6)
    err = float((got.detach().double() - want.detach().double()).abs().max() / scale)
    assert err < rtol, f"{name}: relative error {err:.2e} >= {rtol:.0e}"


LEAVES = ("hidden", "weight", "bias", "sample_hidden")


# The Triton interpreter is slow: it runs the cases that reach each of its code paths (bias,
# softcap and transform, shift, packed, two terms on one lm_head, length-normalised sums).
TRITON_CASES = [
    "dpo-transform-bias",
    "dpo-packed-shift",
    "ipo-sums",
    "kto-transform-bias-shift",
    "typo-transform-bias",
]
MATRIX = [(c, "torch") for c in CASES] + [(c, "triton") for c in TRITON_CASES]


@pytest.mark.parametrize("case,backend", MATRIX)
def test_store_matches_formula_and_recompute(case, backend, device):
    loss, opts, x = case_inputs(case, device)
    leaves = [x[k] for k in LEAVES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the all-ignored row's pair warns, as documented
        store = call(loss, opts, x, backend, "store")
        recompute = call(loss, opts, x, backend, "recompute")
    assert type(store.loss.grad_fn).__name__ == "StoreResultBackward"
    assert type(recompute.loss.grad_fn).__name__ != "StoreResultBackward"
    assert all(leaf.grad is None for leaf in leaves)  # nothing written to .grad in forward
    got = torch.autograd.grad(store.loss, leaves, allow_unused=True)
    again = torch.autograd.grad(recompute.loss, leaves, allow_unused=True)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want_loss = truth(loss, opts, x, leaves64)
    want = torch.autograd.grad(want_loss, leaves64, allow_unused=True)
    close(store.loss, want_loss, 1e-5, "loss")
    close(store.loss, recompute.loss, 1e-6, "loss store vs recompute")
    for name, g, r, w in zip(LEAVES, got, again, want):
        close(g, w, 1e-4, f"grad {name}")
        close(g, r, 1e-5, f"grad {name} store vs recompute")


def _dpo(x, **options):
    """DPO on ``x`` with these ``LogpOptions`` fields."""
    options = fastalign.LogpOptions(**options)
    args = (x["hidden"], x["weight"], x["labels"])
    return fastalign.dpo_loss_fused(
        *args, ref_hidden=x["ref_hidden"], bias=x["bias"], options=options
    )


def test_grad_output_scales_exactly_and_adds_to_other_terms():
    """``loss * c + other``: the store path's gradients are exactly c times its own."""
    _, _, x = case_inputs("dpo-stream", "cpu")
    leaves = [x["hidden"], x["weight"], x["bias"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = torch.autograd.grad(_dpo(x, backend="torch").loss, leaves)
        other = (x["hidden"] ** 2).sum()
        scaled = torch.autograd.grad(_dpo(x, backend="torch").loss * 0.375 + other, leaves)
    torch.testing.assert_close(scaled[0], 0.375 * base[0] + 2 * x["hidden"].detach())
    torch.testing.assert_close(scaled[1], 0.375 * base[1], rtol=0, atol=0)  # the same product
    torch.testing.assert_close(scaled[2], 0.375 * base[2], rtol=0, atol=0)


def test_second_backward_raises_and_reruns_are_bit_identical():
    _, _, x = case_inputs("dpo-stream", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _dpo(x, backend="torch")
        out.loss.backward(retain_graph=True)
        first = [t.grad.clone() for t in (x["hidden"], x["weight"], x["bias"])]
        with pytest.raises(RuntimeError, match="second backward"):
            out.loss.backward()
        for t in (x["hidden"], x["weight"], x["bias"]):
            t.grad = None
        _dpo(x, backend="torch").loss.backward()
    for a, t in zip(first, (x["hidden"], x["weight"], x["bias"])):
        assert torch.equal(a, t.grad)


def _groups_seen(monkeypatch) -> list[int]:
    seen = []
    group_logits = torch_backend.group_logits
    monkeypatch.setattr(
        torch_backend,
        "group_logits",
        lambda rows, *a: seen.append(rows.shape[0]) or group_logits(rows, *a),
    )
    return seen


def test_groups_hold_whole_units_within_the_budget(monkeypatch):
    """A budget of about one pair's logits: one group per pair, the same loss and grads."""
    _, _, x = case_inputs("dpo-stream", "cpu")
    leaves = [x["hidden"], x["weight"], x["bias"]]
    seen = _groups_seen(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = _dpo(x, backend="torch")
        assert len(seen) == 1
        pair_tokens = [int(x["labels"][[p, p + PAIRS]].ne(-100).sum()) for p in range(PAIRS)]
        budget = max(pair_tokens) * VOCAB * 4
        split = _dpo(x, backend="torch", store_budget_bytes=budget)
    assert seen[1:] == pair_tokens  # pair p: rows p and p + B, whole
    torch.testing.assert_close(split.loss, one.loss)
    for a, b in zip(torch.autograd.grad(split.loss, leaves), torch.autograd.grad(one.loss, leaves)):
        torch.testing.assert_close(a, b)


def test_budget_below_one_unit_falls_back_to_recompute(monkeypatch):
    _, _, x = case_inputs("dpo-stream", "cpu")
    seen = _groups_seen(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = _dpo(x, backend="torch", store_budget_bytes=VOCAB * 4)  # one token's logits
        stored = _dpo(x, backend="torch")
    assert type(auto.loss.grad_fn).__name__ != "StoreResultBackward" and len(seen) == 1
    torch.testing.assert_close(auto.loss, stored.loss)
    with pytest.warns(UserWarning, match="grad_mode='store'.*recompute"):
        forced = _dpo(x, backend="torch", grad_mode="store", store_budget_bytes=VOCAB * 4)
    assert type(forced.loss.grad_fn).__name__ != "StoreResultBackward"


def test_auto_takes_the_frozen_head_path_and_no_grad_takes_no_store(monkeypatch):
    _, _, x = case_inputs("dpo-stream", "cpu")
    seen = _groups_seen(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = fastalign.dpo_loss_fused(
            x["hidden"], x["weight"].detach(), x["labels"], ref_hidden=x["ref_hidden"]
        )
        with torch.no_grad():
            _dpo(x)
    assert seen == [] and type(frozen.loss.grad_fn).__name__ != "StoreResultBackward"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(grad_mode="fast"), ValueError, "grad_mode must be one of"),
        (dict(store_budget_bytes=-1), ValueError, "store_budget_bytes must be an int >= 0"),
        (dict(store_budget_bytes=1.5), TypeError, "store_budget_bytes must be an int"),
    ],
)
def test_grad_mode_errors(kwargs, error, match):
    _, _, x = case_inputs("dpo-stream", "cpu")
    with pytest.raises(error, match=match):
        _dpo(x, **kwargs)


@pytest.mark.parametrize("case", ["dpo-stream", "ipo-sums", "kto-unclamped", "typo-samples"])
def test_closed_form_unit_grads_equal_autograd(case):
    """Each loss's hand-written ∂(unit loss)/∂logps against autograd on its unit loss."""
    from fastalign.losses import dpo, ipo, kto, typo
    from fastalign.losses.units import UnitStats

    n = 2 * PAIRS
    stats = UnitStats(torch.randn(n) * 5, torch.tensor([3, 0, 5, 2, 4, 1]), torch.arange(n))
    ref, desirable = torch.randn(n) * 5, torch.tensor([True, False, True, False, False, True])
    unit = {
        "dpo-stream": lambda: dpo.dpo_unit_loss(ref, 0.3, "robust", 0.1),
        "ipo-sums": lambda: ipo.ipo_unit_loss(ref, 0.3, True),
        "kto-unclamped": lambda: kto.kto_unit_loss(
            ref, torch.tensor(0.7), desirable, 0.4, (1.3, 0.8)
        ),
        "typo-samples": lambda: typo.typo_unit_losses(0.3)[0],
    }[case]()
    logps = stats.logps.clone().requires_grad_()
    (want,) = torch.autograd.grad(unit.unit_loss(stats._replace(logps=logps)).sum(), logps)
    torch.testing.assert_close(unit.unit_grad(stats), want)
