"""Every loss on the shared log-prob path: odd shapes, bias, shift and bf16 against float64.

One table drives all four losses so the shared path (``fastalign/losses/_common.py``) is
checked the same way for each: value and gradients w.r.t. hidden, weight and bias (and the
TYPO samples) under style.md's rule ``|impl − truth| ≤ 2·|plain torch, same dtype − truth|
+ atol``, on both backends; then the shared argument checks and the no-autograd-state
guarantee of the reference and mismatched-pair streams.
"""

from __future__ import annotations

import doctest
import importlib
import warnings

import pytest
import torch

import fastalign
from tests import loss_reference as R
from tests.reference import naive_sequence_logps

DTYPES = [torch.float32, torch.bfloat16]
# bf16: one unit of its 8-bit mantissa (2^-8), so rounding the result to bf16 always fits.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8}
# (pairs, seq_len, hidden_size, vocab, shift): the default odd case, T = 1, a shifted one
# with V not a multiple of any tile.
SHAPES = [(3, 7, 17, 97, False), (1, 1, 8, 31, False), (2, 9, 24, 130, True)]


def plain_logps(hidden, weight, bias, labels, shift):
    """What a user writes in the input dtype: full logits, fp32 log_softmax, gather."""
    logits = hidden @ weight.T  # [R, T, V] in the input dtype
    if bias is not None:
        logits = logits + bias
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    token = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(-1), mask.sum(-1)


def truth_logps(hidden, weight, bias, labels, shift):
    """float64 sums and counts (the reference casts every operand to float64 itself)."""
    return naive_sequence_logps(hidden, weight, labels, bias=bias, shift=shift)


def make_inputs(pairs, seq_len, hidden_size, vocab, dtype, device="cpu"):
    """Rows ``2·pairs``; row 1 entirely unscored when there is room, prompts masked.

    Drawn on the CPU, then moved to ``device``; the gradient leaves require grad there.
    """
    rows = 2 * pairs

    def states(n=rows, t=seq_len):
        return torch.randn(n, t, hidden_size).to(dtype)

    def token_labels(n=rows, t=seq_len):
        y = torch.randint(0, vocab, (n, t))
        y[:, : t // 3] = -100
        return y

    labels = token_labels()
    if rows > 2:
        labels[1] = -100
    inputs = dict(
        hidden=states(),
        weight=(torch.randn(vocab, hidden_size) / hidden_size**0.5).to(dtype),
        bias=(torch.randn(vocab) / 4).to(dtype),
        labels=labels,
        ref_hidden=states(),
        kl_hidden=states(),
        kl_labels=labels.roll(1, 0),
        kl_ref_hidden=states(),
        desirable=torch.arange(rows) % 2 == 0,
        sample_hidden=states(3, seq_len + 2),
        sample_labels=token_labels(3, seq_len + 2),
    )
    inputs = {k: v.to(device) for k, v in inputs.items()}
    for leaf in ("hidden", "weight", "bias", "sample_hidden"):
        inputs[leaf].requires_grad_()
    return inputs


def fused(name, x, backend, shift, grad_mode="auto"):
    options = fastalign.LogpOptions(shift=shift, backend=backend, grad_mode=grad_mode)
    common = dict(bias=x["bias"], options=options)
    policy = (x["hidden"], x["weight"], x["labels"])
    if name == "dpo":
        return fastalign.dpo_loss_fused(
            *policy, ref_hidden=x["ref_hidden"], beta=0.3, label_smoothing=0.1, **common
        )
    if name == "ipo":
        return fastalign.ipo_loss_fused(*policy, ref_hidden=x["ref_hidden"], beta=0.5, **common)
    if name == "typo":
        samples = dict(sample_hidden=x["sample_hidden"], sample_labels=x["sample_labels"])
        return fastalign.typo_loss_fused(*policy, **samples, lam=0.3, **common)
    return kto_streamed(x, ref_hidden=x["ref_hidden"], **common)


def kto_streamed(x, **kwargs):
    """KTO (beta 0.4) on ``x``'s rows with its mismatched-pair reference rows streamed."""
    return fastalign.kto_loss_fused(
        x["hidden"],
        x["weight"],
        x["labels"],
        x["desirable"],
        kl_hidden=x["kl_hidden"],
        kl_labels=x["kl_labels"],
        kl_ref_hidden=x["kl_ref_hidden"],
        beta=0.4,
        **kwargs,
    )


def formula(name, x, logps_fn, leaves, shift):
    """The loss written from its formula, with ``logps_fn`` (truth or plain) doing the sums."""
    weight, bias = leaves[1], leaves[2]

    def score(hidden, labels, grad=True):
        if not grad:
            hidden, w, b = hidden.detach(), weight.detach(), bias.detach()
            return tuple(t.detach() for t in logps_fn(hidden, w, b, labels, shift))
        return logps_fn(hidden, weight, bias, labels, shift)

    s, n = score(leaves[0], x["labels"])
    ref, _ = score(x["ref_hidden"], x["labels"], grad=False)
    if name == "dpo":
        return R.dpo(s, ref, 0.3, "sigmoid", 0.1)
    if name == "ipo":
        return R.ipo(s, ref, n, 0.5)
    if name == "typo":
        return R.typo(s, score(leaves[3], x["sample_labels"])[0], 0.3)
    kl_policy, _ = score(x["kl_hidden"], x["kl_labels"], grad=False)
    kl_ref, _ = score(x["kl_ref_hidden"], x["kl_labels"], grad=False)
    return R.kto(s, ref, x["desirable"], kl_policy, kl_ref, 0.4)[0]


def within_rule(impl, plain, truth, atol):
    """style.md's bound on the max error: ≤ 2·(plain torch's max error) + atol·(1 + max|truth|)."""
    impl, plain, truth = impl.double(), plain.double(), truth.double()
    err = float((impl - truth).abs().max())
    bound = 2 * float((plain - truth).abs().max()) + atol * (1 + float(truth.abs().max()))
    return err <= bound, f"error {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("backend", R.BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairs,seq_len,hidden_size,vocab,shift", SHAPES)
@pytest.mark.parametrize("name", ["dpo", "ipo", "kto", "typo"])
def test_loss_and_grads_follow_the_dtype_rule(
    name, pairs, seq_len, hidden_size, vocab, shift, dtype, backend, device
):
    x = make_inputs(pairs, seq_len, hidden_size, vocab, dtype, device)
    leaves = [x["hidden"], x["weight"], x["bias"]] + (
        [x["sample_hidden"]] if name == "typo" else []
    )
    out = fused(name, x, backend, shift)
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    got = torch.autograd.grad(out.loss, leaves)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    truth = formula(name, x, truth_logps, leaves64, shift)
    want = torch.autograd.grad(truth, leaves64)
    plain = formula(name, x, plain_logps, leaves, shift)
    plain_grads = torch.autograd.grad(plain, leaves)

    ok, why = within_rule(out.loss.detach(), plain.detach(), truth.detach(), ATOL[dtype])
    assert ok, f"loss: {why}"
    for leaf_name, g, p, w in zip(
        ["hidden", "weight", "bias", "sample_hidden"], got, plain_grads, want
    ):
        assert g.dtype == dtype and g.shape == w.shape
        ok, why = within_rule(g, p, w, ATOL[dtype])
        assert ok, f"grad {leaf_name}: {why}"


@pytest.mark.parametrize("name,streams", [("dpo", 2), ("ipo", 2), ("typo", 2), ("kto", 4)])
def test_every_stream_of_a_loss_is_one_launch(monkeypatch, name, streams):
    """Recompute path: policy rows (chosen and rejected alike), reference, samples,
    mismatched pairs: one call."""
    launches = R.record_launches(monkeypatch)
    fused(name, make_inputs(3, 7, 17, 97, torch.float32), "torch", False, "recompute")
    assert launches == [streams]


@pytest.mark.parametrize("name,nograd", [("dpo", [1]), ("ipo", [1]), ("typo", []), ("kto", [3])])
def test_store_path_scores_nograd_streams_first_and_never_recomputes(monkeypatch, name, nograd):
    """Store path: the no-grad streams in one launch, the policy rows in groups of whole
    units (one group here), and a backward that runs no backend code at all."""
    from fastalign import torch_backend

    launches = R.record_launches(monkeypatch)
    groups = []
    group_logits = torch_backend.group_logits
    monkeypatch.setattr(
        torch_backend,
        "group_logits",
        lambda rows, *a: groups.append(len(rows)) or group_logits(rows, *a),
    )
    monkeypatch.setattr(torch_backend, "backward", None)  # any recompute would fail
    x = make_inputs(3, 7, 17, 97, torch.float32)
    out = fused(name, x, "torch", False, "store")
    out.loss.backward()
    assert launches == nograd
    assert len(groups) == (2 if name == "typo" else 1)  # TYPO: the pairs, then the samples


def test_reference_and_mismatched_streams_hold_no_autograd_state():
    """Gradients reach the policy rows only: the reference and KL rows are not in the graph."""
    x = make_inputs(3, 7, 17, 97, torch.float32)
    for key in ("ref_hidden", "kl_hidden", "kl_ref_hidden"):
        x[key].requires_grad_()
    out = fused("kto", x, "torch", False)
    assert not out.kl.requires_grad and not out.rewards.requires_grad
    grads = torch.autograd.grad(
        out.loss,
        [x["hidden"], x["ref_hidden"], x["kl_hidden"], x["kl_ref_hidden"]],
        allow_unused=True,
    )
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1:] == (None, None, None)

    dpo = fused("dpo", x, "torch", False)
    assert torch.autograd.grad(dpo.loss, [x["ref_hidden"]], allow_unused=True) == (None,)


@pytest.mark.parametrize("backend", R.BACKENDS)
def test_reference_lm_head_with_its_own_bias(backend, device):
    """ref_weight/ref_bias score the reference (and KTO's mismatched reference rows)."""
    x = make_inputs(3, 7, 17, 97, torch.float32, device)
    ref_weight, ref_bias = (torch.randn(97, 17) / 4).to(device), torch.randn(97).to(device)
    head = dict(ref_weight=ref_weight, ref_bias=ref_bias, bias=x["bias"])
    head["options"] = fastalign.LogpOptions(backend=backend)
    s, _ = truth_logps(x["hidden"], x["weight"], x["bias"], x["labels"], False)
    ref, _ = truth_logps(x["ref_hidden"], ref_weight, ref_bias, x["labels"], False)
    kl_policy, _ = truth_logps(x["kl_hidden"], x["weight"], x["bias"], x["kl_labels"], False)
    kl_ref, _ = truth_logps(x["kl_ref_hidden"], ref_weight, ref_bias, x["kl_labels"], False)

    dpo = fastalign.dpo_loss_fused(
        x["hidden"], x["weight"], x["labels"], ref_hidden=x["ref_hidden"], beta=0.3, **head
    )
    R.assert_loss_and_grads(dpo.loss, R.dpo(s, ref.detach(), 0.3), [x["hidden"], x["weight"]])
    kto = kto_streamed(x, ref_hidden=x["ref_hidden"], **head)
    s, _ = truth_logps(x["hidden"], x["weight"], x["bias"], x["labels"], False)  # fresh graph
    naive, z0 = R.kto(s, ref.detach(), x["desirable"], kl_policy.detach(), kl_ref.detach(), 0.4)
    R.assert_loss_and_grads(kto.loss, naive, [x["hidden"], x["weight"]])
    torch.testing.assert_close(kto.kl.double(), z0, rtol=1e-4, atol=1e-5)

    # Precomputed ref_logps, mismatched reference rows streamed: the head still applies to them.
    half = kto_streamed(x, ref_logps=ref.float(), **head)
    torch.testing.assert_close(half.kl, kto.kl)
    torch.testing.assert_close(half.loss, kto.loss)


@pytest.mark.parametrize(
    "loss,kwargs,error,match",
    [
        (
            "dpo",
            dict(ref_logps=torch.zeros(6), ref_weight=torch.randn(97, 17)),
            ValueError,
            "ref_weight was given without ref_hidden",
        ),
        (
            "dpo",
            dict(ref_logps=torch.zeros(6), ref_bias=torch.zeros(97)),
            ValueError,
            "ref_bias was given without ref_hidden",
        ),
        ("typo", dict(lam=0.0, ref_bias=torch.zeros(97)), TypeError, "keyword argument 'ref_bias'"),
        ("ipo", dict(ref_logps=torch.zeros(6), bogus=1), TypeError, "unexpected keyword.*bogus"),
        ("ipo", dict(ref_logps=torch.zeros(3, 2)), ValueError, r"ref_logps must have shape \[6\]"),
        (
            "dpo",
            dict(ref_hidden=torch.randn(6, 5, 17)),
            ValueError,
            "labels shape .* must equal ref_hidden.shape",
        ),
        (
            "kto",
            dict(kl_hidden=torch.randn(6, 7, 17), kl_labels=torch.zeros(6, 5, dtype=torch.long)),
            ValueError,
            "kl_labels shape .* must equal kl_hidden.shape",
        ),
        (
            "kto",
            dict(kl_hidden=torch.randn(6, 7, 17), kl_labels=torch.full((6, 7), 97)),
            ValueError,
            "kl_labels holds 97",
        ),
        (
            "kto",
            dict(
                kl_hidden=torch.randn(6, 7, 17),
                kl_labels=torch.zeros(6, 7, dtype=torch.long),
                kl_ref_hidden=torch.randn(6, 7, 16),
            ),
            ValueError,
            "kl_ref_hidden",
        ),
        (
            "typo",
            dict(sample_hidden=torch.randn(2, 4, 16), sample_labels=torch.zeros(2, 4).long()),
            ValueError,
            r"weight must be .* \(the last dim of sample_hidden\)",
        ),
        (
            "dpo",
            dict(ref_logps=torch.zeros(6), options=dict(backend="cuda")),
            ValueError,
            "backend",
        ),
        ("dpo", dict(ref_logps=torch.zeros(6), cu_seqlens=[0, 7]), TypeError, "cu_seqlens must"),
        (
            "kto",
            dict(
                kl_hidden=torch.randn(14, 17),
                kl_labels=torch.zeros(14, dtype=torch.long),
                kl_cu_seqlens=[0, 7, 14],
            ),
            TypeError,
            "kl_cu_seqlens must be a torch.Tensor",
        ),
    ],
)
def test_errors_name_the_argument(loss, kwargs, error, match):
    x = make_inputs(3, 7, 17, 97, torch.float32)
    hidden, weight, labels = x["hidden"], x["weight"], x["labels"]
    with pytest.raises(error, match=match):
        if "options" in kwargs:  # the LogpOptions fields, built inside the raises block
            kwargs = {**kwargs, "options": fastalign.LogpOptions(**kwargs["options"])}
        if loss == "dpo":
            fastalign.dpo_loss_fused(hidden, weight, labels, **kwargs)
        elif loss == "ipo":
            fastalign.ipo_loss_fused(hidden, weight, labels, **kwargs)
        elif loss == "typo":
            fastalign.typo_loss_fused(hidden, weight, labels, **kwargs)
        else:
            kwargs = dict(ref_logps=torch.zeros(6), kl_ref_logps=torch.zeros(6)) | kwargs
            if "kl_ref_hidden" in kwargs:
                del kwargs["kl_ref_logps"]
            fastalign.kto_loss_fused(hidden, weight, labels, x["desirable"], **kwargs)


@pytest.mark.parametrize("module", ["dpo", "ipo", "kto", "typo"])
def test_docstring_examples_run(module):
    """The examples in the public docstrings run and print what they claim."""
    result = doctest.testmod(importlib.import_module(f"fastalign.losses.{module}"))
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", ["dpo", "ipo", "typo"])
def test_pairs_with_an_unscored_row_warn(name):
    """A pair with an unscored chosen or rejected row: a UserWarning naming the loss; a batch
    with every row scored stays silent."""
    x = make_inputs(3, 7, 17, 97, torch.float32)  # row 1 (chosen of pair 1) unscored
    with pytest.warns(UserWarning, match=f"{name}_loss_fused: 1 of 3 pairs have a chosen"):
        fused(name, x, "torch", False)
    x["labels"][1] = x["labels"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(name, x, "torch", False)


def test_kto_on_an_empty_batch_raises():
    x = make_inputs(3, 7, 17, 97, torch.float32)
    with pytest.raises(ValueError, match="kto_loss_fused needs at least one row"):
        fastalign.kto_loss_fused(
            x["hidden"][:0],
            x["weight"],
            x["labels"][:0],
            x["desirable"][:0],
            ref_logps=torch.zeros(0),
            kl=0.0,
        )
