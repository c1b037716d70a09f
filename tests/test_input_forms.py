"""Inputs in less common forms: strided bias, 8-bit labels, tensors changed after the forward,
double backward, malformed arguments: right values, or a named error, never a silent wrong
answer. Both backends (Triton through the interpreter), both gradient paths."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import fastalign
from fastalign import LogpOptions
from tests.loss_reference import BACKENDS, dpo, logps64

PATHS = list(itertools.product(BACKENDS, ["store", "recompute"]))


def _pairs(seed=0, pairs=2, seq_len=6, hidden=8, vocab=37):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * pairs, seq_len, hidden, generator=g)
    ref_h = torch.randn(2 * pairs, seq_len, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    y = torch.randint(0, vocab, (2 * pairs, seq_len), generator=g)
    y[:, :2] = -100
    return h, ref_h, w, y


@pytest.mark.parametrize("backend, grad_mode", PATHS)
def test_strided_bias_is_read_with_its_stride(backend, grad_mode):
    """A bias that is a strided view (one column of a ``[V, 3]`` tensor): values and the
    gradient reaching the base tensor equal float64 (the Triton kernels read a bias as
    contiguous, so the backend must hand them a contiguous one)."""
    h0, ref_h, w, y = _pairs()
    base0 = torch.randn(w.shape[0], 3, generator=torch.Generator().manual_seed(1))
    h, base = h0.clone().requires_grad_(), base0.clone().requires_grad_()
    options = LogpOptions(backend=backend, grad_mode=grad_mode)
    bias = base[:, 1]
    assert bias.stride() == (3,)
    out = fastalign.dpo_loss_fused(h, w, y, ref_hidden=ref_h, bias=bias, beta=1.0, options=options)
    out.loss.backward()

    h64, base64 = h0.double().requires_grad_(), base0.double().requires_grad_()
    s, _ = logps64(h64, w, y, bias=base64[:, 1])
    ref, _ = logps64(ref_h, w, y, bias=base64[:, 1].detach())
    want = dpo(s, ref, beta=1.0)
    want.backward()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(base.grad.double(), base64.grad, rtol=1e-4, atol=1e-5)
    assert base.grad[:, 0].abs().max() == 0 and base.grad[:, 2].abs().max() == 0


@pytest.mark.parametrize("backend, grad_mode", PATHS)
def test_uint8_labels_count_and_score_as_int64(backend, grad_mode):
    """uint8 labels cannot hold -100 (it wraps to 156): with ignore_index=255 they give the
    int64 result, token id 156 included, and the rpo NLL's chosen-token count agrees."""
    h0, ref_h, w, y = _pairs(vocab=200)
    y[0, 2:5] = 156  # a real token id, the value -100 wraps to in uint8
    y8 = torch.where(y == -100, torch.full_like(y, 255), y).to(torch.uint8)
    results = []
    for labels, ignore in ((y, -100), (y8, 255)):
        h = h0.clone().requires_grad_()
        options = LogpOptions(backend=backend, grad_mode=grad_mode, ignore_index=ignore)
        out = fastalign.dpo_loss_fused(
            h, w, labels, ref_hidden=ref_h, rpo_alpha=1.0, options=options
        )
        out.loss.backward()
        results.append((out.loss, h.grad, out.chosen_num_tokens))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)
    assert results[0][2].tolist() == results[1][2].tolist() == [4, 4]
    # every position scored, the default ignore_index=-100: 156 is a token like any other
    full = y.clamp_min(0)
    options = LogpOptions(backend=backend, grad_mode=grad_mode)
    losses = [
        fastalign.dpo_loss_fused(h0, w, labels, ref_hidden=ref_h, rpo_alpha=1.0, options=options)
        for labels in (full, full.to(torch.uint8))
    ]
    torch.testing.assert_close(losses[1].loss, losses[0].loss, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_label_outside_the_vocabulary_is_an_error(backend):
    w, h = torch.randn(100, 8), torch.randn(1, 4, 8)
    labels = torch.tensor([[3, 156, 17, 5]], dtype=torch.uint8)  # 156 >= V; -100 wraps to 156
    with pytest.raises(ValueError, match=r"labels holds 156, outside \[0, V=100\)"):
        fastalign.sequence_logps(h, w, labels, options=LogpOptions(backend=backend))


@pytest.mark.parametrize("backend, grad_mode", PATHS)
def test_inputs_changed_in_place_after_the_forward(backend, grad_mode):
    """Recompute reads the inputs again in backward: changed in place, autograd refuses, as
    for any op. The store path formed its gradients in forward: those are returned."""
    h0, ref_h, w0, y = _pairs()
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    options = LogpOptions(backend=backend, grad_mode=grad_mode)
    out = fastalign.dpo_loss_fused(h, w, y, ref_hidden=ref_h, options=options)
    with torch.no_grad():
        w.mul_(2.0)
    if grad_mode == "recompute":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.loss.backward()
        return
    out.loss.backward()
    h2 = h0.clone().requires_grad_()
    fastalign.dpo_loss_fused(h2, w0, y, ref_hidden=ref_h, options=options).loss.backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend, grad_mode", PATHS)
def test_double_backward_is_refused(backend, grad_mode):
    """A gradient penalty needs the gradients' own graph, which kernels do not build: an
    error, never a silently constant penalty."""
    h0, ref_h, w, y = _pairs()
    h = h0.clone().requires_grad_()
    options = LogpOptions(backend=backend, grad_mode=grad_mode)
    loss = fastalign.dpo_loss_fused(h, w, y, ref_hidden=ref_h, options=options).loss
    with pytest.raises(RuntimeError, match="create_graph|differentiate twice"):
        (grad,) = torch.autograd.grad(loss, h, create_graph=True)
        grad.pow(2).sum().backward()


@pytest.mark.parametrize(
    "loss, change, error, match",
    [
        ("dpo", dict(labels=torch.tensor(3)), ValueError, r"labels must be \[B, T\]"),
        ("kto", dict(labels=torch.tensor(3)), ValueError, r"labels must be \[B, T\]"),
        ("dpo", dict(bias=[0.0] * 37), TypeError, "bias must be a torch.Tensor, got list"),
        ("dpo", dict(weight=np.zeros((37, 8), np.float32)), TypeError, "weight must be a torch"),
        ("kto", dict(weight=np.zeros((37, 8), np.float32)), TypeError, "weight must be a torch"),
        ("simpo", dict(hidden=torch.randn(1, 4, 6, 8)), ValueError, r"labels must be \[B, T\]"),
        ("dpo", dict(labels=torch.zeros(21, dtype=torch.long)), ValueError, "need cu_seqlens"),
    ],
)
def test_malformed_arguments_are_named(loss, change, error, match, monkeypatch):
    """Checked before any backend runs: a named error, not an IndexError/AttributeError from
    deep inside, nor the paired layout's message for what is a shape error."""
    from fastalign import torch_backend

    monkeypatch.setattr(torch_backend, "forward", lambda *a, **k: pytest.fail("backend ran"))
    h, ref_h, w, y = _pairs()
    args = dict(hidden=h, weight=w, labels=y)
    if change.get("hidden") is not None:
        args["labels"] = y.unsqueeze(0)
    args.update(change)
    extra = {}
    if loss == "dpo":
        extra = dict(ref_hidden=ref_h)
    elif loss == "kto":
        extra = dict(ref_hidden=ref_h, desirable=torch.tensor([True, False, True, False]))
        extra.update(kl_hidden=ref_h, kl_labels=y, kl_ref_hidden=ref_h)
    fn = getattr(fastalign, f"{loss}_loss_fused")
    with pytest.raises(error, match=match):
        fn(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args, **extra)


def test_ignore_index_must_fit_int64():
    with pytest.raises(ValueError, match="ignore_index must be an int in"):
        LogpOptions(ignore_index=2**70)


@pytest.mark.parametrize("backend", BACKENDS)
def test_orpo_log_odds_metric_skips_pairs_with_an_empty_row(backend):
    """A pair whose chosen row has no scored token has infinite log odds: the metric is the
    mean over the other pairs (before: inf), equal to ORPO on those pairs alone."""
    h, _, w, y = _pairs(pairs=3)
    y[1] = -100  # pair 1's chosen row: nothing scored
    options = LogpOptions(backend=backend)
    with pytest.warns(UserWarning, match="1 of 3 pairs"):
        out = fastalign.orpo_loss_fused(h, w, y, beta=0.1, options=options)
    keep = torch.tensor([0, 2, 3, 5])  # pairs 0 and 2: rows b and b + 3
    alone = fastalign.orpo_loss_fused(h[keep], w, y[keep], beta=0.1, options=options)
    got, want = out.metrics()["log_odds_chosen"], alone.metrics()["log_odds_chosen"]
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-5)
