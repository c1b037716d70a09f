"""LD-DPO (``ld_alpha``) and WPO (``use_weighting``) on the store path: per-token weights
``w_t ∈ {1, α}`` on the policy's and the streamed reference's sums, and WPO's pair weights
from the group fold's ``log Σ p²``, against the float64 formulas and the recompute path, on
both backends (streamed / precomputed reference, packed input, the ``sft`` term, bias and
logit transform, grad_output ≠ 1), and ``grad_mode="store"`` taking them without a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastalign
from tests import pair_reference as PR
from tests.reference import naive_log_softmax, naive_token_logps
from tests.test_losses_store import SEQ, TRANSFORM, close, inputs

ALPHA, BETA = 0.35, 0.3
LEAVES = ("hidden", "weight", "bias")

# name: dpo_loss_fused keywords (ref: "stream" | "precomputed"; packed, shift, bias, transform)
CASES = {
    "stream": dict(ref="stream"),
    "precomputed": dict(ref="precomputed"),
    "stream-transform-bias": dict(ref="stream", bias=True, **TRANSFORM),
    "packed-shift": dict(ref="stream", packed=True, shift=True),
    "mix-sft-precomputed": dict(
        ref="precomputed", loss_type=["hinge", "sft"], loss_weights=[1.0, 0.6], bias=True
    ),
    "robust-rpo": dict(ref="stream", loss_type="robust", label_smoothing=0.1, rpo_alpha=0.5),
    "wpo-transform-bias": dict(
        ref="stream", use_weighting=True, ld_alpha=None, bias=True, **TRANSFORM
    ),
    "wpo-ld-sft-packed": dict(
        ref="stream", use_weighting=True, rpo_alpha=0.4, packed=True, shift=True
    ),
    "wpo-ld-mix-precomputed": dict(
        ref="precomputed",
        use_weighting=True,
        loss_type=["sigmoid", "hinge"],
        loss_weights=[1.0, 0.25],
    ),
}
TRITON_CASES = [
    "stream-transform-bias",
    "packed-shift",
    "mix-sft-precomputed",
    "wpo-transform-bias",
    "wpo-ld-sft-packed",
]
MATRIX = [(c, "torch") for c in CASES] + [(c, "triton") for c in TRITON_CASES]


def ld_sums(hidden, weight, bias, labels, opts):
    """float64 ``(LD-weighted sums [2B], plain sums [2B], counts [2B], Σ_t log Σ_v p² [2B])``
    from full logits: the first ``min(n_w, n_l)`` scored tokens counted once, the rest α-fold
    (α = ``opts["ld_alpha"]``, default ALPHA; None: plain sums). Packed inputs of
    equal-length sequences are the padded ones reshaped."""
    rows = labels.numel() // SEQ
    hidden, labels = hidden.reshape(rows, SEQ, -1), labels.reshape(rows, SEQ)
    if opts.get("shift"):
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    transform = {k: opts[k] for k in TRANSFORM if k in opts}
    b = bias if opts.get("bias") else None
    token = naive_token_logps(hidden.double(), weight, labels, bias=b, **transform)
    logp = naive_log_softmax(hidden.detach(), weight.detach(), b, **transform)
    scored = labels != -100
    log_sum_sq = (torch.logsumexp(2 * logp, -1) * scored).sum(1)
    full, prefix = token.sum(1), PR.naive_prefix_sums(token, labels)
    alpha = opts.get("ld_alpha", ALPHA)
    weighted = full if alpha is None else prefix + alpha * (full - prefix)
    return weighted, full, scored.sum(1), log_sum_sq


def run(x, opts, backend, grad_mode):
    """``dpo_loss_fused`` with ``ld_alpha`` on the case's inputs."""
    opts = dict(opts)
    options = dict(backend=backend, grad_mode=grad_mode)
    for key in ("shift", *TRANSFORM):
        if key in opts:
            options[key] = opts.pop(key)
    kwargs = dict(options=fastalign.LogpOptions(**options), beta=BETA)
    kwargs["ld_alpha"] = opts.pop("ld_alpha", ALPHA)
    if opts.pop("bias", False):
        kwargs["bias"] = x["bias"]
    if opts.pop("packed", False):
        kwargs["cu_seqlens"] = x["cu_seqlens"]
    ref = opts.pop("ref")
    kwargs.update(
        dict(ref_hidden=x["ref_hidden"]) if ref == "stream" else dict(ref_logps=x["ref_ld"])
    )
    return fastalign.dpo_loss_fused(x["hidden"], x["weight"], x["labels"], **kwargs, **opts)


def case_inputs(opts, device):
    """Inputs with the precomputed LD-weighted reference sums (TRL's contract), and pairs
    whose chosen row is longer (pair 0) or shorter (pair 2) than its rejected row."""
    x = inputs(device, packed=opts.get("packed", False))
    grid = x["labels"].view(-1, SEQ)  # [2B, T] view of padded or packed labels
    grid[3, 5:] = -100
    grid[2, 6:] = -100
    with torch.no_grad():
        ref = ld_sums(x["ref_hidden"], x["weight"].double(), x["bias"], x["labels"], opts)
        x["ref_ld"] = ref[0].float()
    for leaf in LEAVES:
        x[leaf].requires_grad_()
    return x


def truth(x, opts, leaves64):
    """``(loss, LD sums [2B], reference LD sums [2B])`` from the float64 formulas."""
    hidden, weight, bias = leaves64
    s, raw, n, log_sum_sq = ld_sums(hidden, weight, bias, x["labels"], opts)
    if opts["ref"] == "stream":
        ref = ld_sums(x["ref_hidden"], weight.detach(), bias.detach(), x["labels"], opts)[0]
    else:
        ref = x["ref_ld"].double()
    types = opts.get("loss_type", "sigmoid")
    types = [types] if isinstance(types, str) else list(types)
    weights = list(opts.get("loss_weights", [1.0] * len(types)))
    if "rpo_alpha" in opts:
        types, weights = [*types, "sft"], [*weights, opts["rpo_alpha"]]
    P = PR.pairs_dict(s, ref, n, s_raw=raw)
    pair_weight = None
    if opts.get("use_weighting"):
        pair_weight = PR.wpo_pair_weight(raw.detach(), log_sum_sq, n.clamp_min(1))
    o = PR.options(BETA, opts.get("label_smoothing", 0.0))
    loss = PR.combined(P, o, types, weights, pair_weight)
    return loss, s.detach(), ref.detach()


def quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the all-ignored row's pair warns, as documented
        return fn(*args)


@pytest.mark.parametrize("case,backend", MATRIX)
def test_ld_store_matches_formula_and_recompute(case, backend, device):
    opts = CASES[case]
    x = case_inputs(opts, device)
    leaves = [x[k] for k in LEAVES]
    store = quiet(run, x, opts, backend, "store")
    recompute = quiet(run, x, opts, backend, "recompute")
    assert type(store.loss.grad_fn).__name__ == "StoreResultBackward"
    assert type(recompute.loss.grad_fn).__name__ != "StoreResultBackward"
    got = torch.autograd.grad(store.loss, leaves, allow_unused=True)
    again = torch.autograd.grad(recompute.loss, leaves, allow_unused=True)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want_loss, s, ref = truth(x, opts, leaves64)
    want = torch.autograd.grad(want_loss, leaves64, allow_unused=True)
    close(store.loss, want_loss, 1e-5, "loss")
    close(store.loss, recompute.loss, 1e-6, "loss store vs recompute")
    for name, g, r, w in zip(LEAVES, got, again, want):
        if not opts.get("bias") and name == "bias":
            continue
        close(g, w, 1e-4, f"grad {name}")
        close(g, r, 1e-5, f"grad {name} store vs recompute")
    # logps/* and rewards read the LD-weighted sums, on both paths
    pairs = s.numel() // 2
    close(store.chosen_logps, s[:pairs], 1e-5, "chosen logps")
    close(store.rejected_logps, s[pairs:], 1e-5, "rejected logps")
    close(store.chosen_rewards, BETA * (s - ref)[:pairs], 1e-5, "chosen rewards")
    for key, value in store.metrics().items():
        assert value == pytest.approx(recompute.metrics()[key], rel=1e-5, abs=1e-6), key


def test_ld_store_scales_by_grad_output_and_adds_to_other_terms():
    opts = CASES["mix-sft-precomputed"]
    x = case_inputs(opts, "cpu")
    leaves = [x[k] for k in LEAVES]
    grads = {}
    for mode in ("store", "recompute"):
        out = quiet(run, x, opts, "torch", mode)
        total = 2.5 * out.loss + (x["hidden"] ** 2).sum() * 1e-3
        grads[mode] = torch.autograd.grad(total, leaves)
    for name, g, r in zip(LEAVES, grads["store"], grads["recompute"]):
        close(g, r, 1e-5, f"grad {name}")


@pytest.mark.parametrize("case", ["stream", "wpo-ld-sft-packed"])
def test_store_and_auto_take_ld_alpha_and_wpo_without_a_warning(case):
    """``ld_alpha`` / ``use_weighting`` no longer fall back: ``auto`` and ``store`` both take
    the store path."""
    x = case_inputs(CASES[case], "cpu")
    x["labels"].view(-1, SEQ)[1, 3:] = 7  # no all-ignored row: no warning is expected at all
    for mode in ("auto", "store"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = run(x, CASES[case], "torch", mode)
        assert type(out.loss.grad_fn).__name__ == "StoreResultBackward", mode
