"""``token_logps`` (fastalign/token_ops.py, kernels/token_stats.py) vs a float64 reference and TRL.

Both backends: chunked torch, and the Triton fold kernels (interpreted on CPU). Odd V, bias,
softcap, temperature, logit_scale, M = 0, frozen head, entropy gradient, autocast dtype.
"""

from __future__ import annotations

import pytest
import torch

from fastalign import TOKEN_OUTPUTS, TokenLogpsOutput, token_logps, token_ops

ALL = TOKEN_OUTPUTS
TRANSFORMS = [
    dict(),
    dict(temperature=0.7, logit_softcap=3.0, logit_scale=1.3),
    dict(logit_scale=0.25, temperature=1.5),
]


def reference(hidden, weight, labels, bias=None, temperature=1.0, logit_softcap=None,
              logit_scale=1.0):  # fmt: skip
    """Float64 full-logits truth: ``(log_probs, entropy, log Σp², mean logit, is_top1)``."""
    u = hidden.double() @ weight.double().T
    if bias is not None:
        u = u + bias.double()
    z = u * logit_scale
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    z = z / temperature
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    return dict(
        log_probs=logp.gather(1, labels[:, None]).squeeze(1),
        entropy=-(p * logp).sum(-1),
        log_sum_sq_probs=torch.logsumexp(2 * logp, -1),
        mean_logits=z.mean(-1),
        is_top1=z.argmax(-1) == labels,
    )


def make(num_rows, vocab, hidden_size, dtype=torch.float32, bias=True):
    hidden = torch.randn(num_rows, hidden_size, dtype=dtype)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (num_rows,))
    b = torch.randn(vocab, dtype=dtype) * 0.3 if bias else None
    return hidden, weight, labels, b


def place(backend, device, *tensors):
    """The Triton backend's tensors go to ``device`` (CUDA when the kernels are compiled)."""
    return [t.to(device) if backend == "triton" else t for t in tensors]


@pytest.fixture
def small_tiles(monkeypatch):
    """Chunked torch backend with tiny vocab chunks, so every test spans several of them."""
    monkeypatch.setitem(token_ops.TILE_ELEMENTS, "cpu", 256)


def check_close(got, want, tol):
    got, want = got.detach(), want.detach()
    scale = want.abs().max().clamp_min(1.0)
    assert float((got.double() - want).abs().max() / scale) < tol, (got, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("vocab", [97, 130])
def test_values_and_grads_match_float64(small_tiles, device, backend, transform, vocab):
    hidden, weight, labels, bias = make(37, vocab, 24)
    # Make a few labels the argmax so is_top1 is exercised both ways
    labels[:5] = (hidden[:5] @ weight.T + bias).argmax(-1)  # the transform keeps the argmax
    leaves = [t.requires_grad_() for t in place(backend, device, hidden, weight, bias)]
    out = token_logps(
        leaves[0], leaves[1], *place(backend, device, labels), bias=leaves[2], outputs=ALL,
        backend=backend, **transform,
    )  # fmt: skip
    out = TokenLogpsOutput(*(None if x is None else x.cpu() for x in out))
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    truth = reference(*leaves64[:2], labels, leaves64[2], **transform)
    for name in ALL:
        got = getattr(out, name)
        assert got.shape == (37,)
        if name == "is_top1":
            assert torch.equal(got, truth[name])
        else:
            assert got.dtype == torch.float32
            check_close(got, truth[name].detach(), 2e-6)
    g_logp, g_ent = torch.randn(37), torch.randn(37)
    grads = torch.autograd.grad(
        (out.log_probs * g_logp).sum() + (out.entropy * g_ent).sum(), leaves
    )
    grads = [g.cpu() for g in grads]
    loss64 = (truth["log_probs"] * g_logp.double()).sum() + (
        truth["entropy"] * g_ent.double()
    ).sum()
    for got, want in zip(grads, torch.autograd.grad(loss64, leaves64)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        check_close(got, want, 2e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_frozen_head_uses_the_forward_expectation(
    small_tiles, monkeypatch, device, backend, softcap
):
    hidden, weight, labels, bias = make(29, 97, 16)
    placed = place(backend, device, hidden, weight, labels, bias)
    placed[0].requires_grad_()
    transform = dict(logit_softcap=softcap, temperature=0.8, logit_scale=1.7)
    out = token_logps(*placed[:3], bias=placed[3], backend=backend, **transform)

    def no_recompute(*args):
        raise AssertionError("a frozen head must not recompute the logits in backward")

    monkeypatch.setattr(token_ops, "_backward_recompute", no_recompute)
    g = torch.randn(29)
    (grad,) = torch.autograd.grad(out.log_probs, placed[0], g.to(placed[0].device))
    grad = grad.cpu()
    h64 = hidden.detach().double().requires_grad_()
    truth = reference(h64, weight, labels, bias, **transform)["log_probs"]
    check_close(grad, torch.autograd.grad(truth, h64, g.double())[0], 2e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_rows_give_differentiable_zeros(device, backend):
    hidden, weight, labels = place(backend, device, torch.randn(0, 8), torch.randn(13, 8),
                                   torch.zeros(0, dtype=torch.long))  # fmt: skip
    hidden.requires_grad_(), weight.requires_grad_()
    out = token_logps(hidden, weight, labels, outputs=ALL, backend=backend)
    assert out.log_probs.shape == (0,) and out.is_top1.shape == (0,)
    (out.log_probs.sum() + out.entropy.sum()).backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert hidden.grad.shape == (0, 8)


def test_unrequested_outputs_are_none_and_stats_are_not_differentiable():
    hidden, weight, labels, _ = make(6, 11, 4, bias=False)
    out = token_logps(hidden, weight.requires_grad_(), labels)
    assert out.entropy is None and out.is_top1 is None and out.mean_logits is None
    out = token_logps(hidden, weight, labels, outputs=("mean_logits", "log_sum_sq_probs"))
    assert out.log_probs.requires_grad and not out.mean_logits.requires_grad
    assert not out.log_sum_sq_probs.requires_grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_computes_chunks_in_the_autocast_dtype(device, backend):
    """fp32 weights under bf16 autocast (TRL's default): same as bf16 inputs without autocast."""
    hidden, weight, labels, bias = place(backend, device, *make(21, 67, 16))
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        under = token_logps(hidden, weight, labels, bias=bias, outputs=ALL, backend=backend)
    plain = token_logps(hidden.bfloat16(), weight.bfloat16(), labels, bias=bias.bfloat16(),
                        outputs=ALL, backend=backend)  # fmt: skip
    for name in ALL:
        assert torch.equal(getattr(under, name), getattr(plain, name)), name
    truth = reference(hidden, weight, labels, bias)["log_probs"]
    check_close(under.log_probs.cpu(), truth.cpu(), 5e-2)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_matches_trl_chunked_logprob_function(transform):
    """TRL 1.16's own kernel (its torch fold on CPU) on the same inputs: values and grads."""
    kernels = pytest.importorskip("trl.kernels")
    hidden, weight, labels, bias = make(33, 97, 16)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    ours = token_logps(hidden, weight, labels, bias=bias, outputs=ALL, **transform)
    theirs = kernels.ChunkedLogProbFunction.apply(
        hidden, weight, bias, labels, transform.get("temperature", 1.0), 32768,
        transform.get("logit_softcap"), transform.get("logit_scale", 1.0), ALL,
    )  # fmt: skip
    for name, want in zip(ALL, theirs):
        got = getattr(ours, name)
        if name == "is_top1":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g_logp, g_ent = torch.randn(33), torch.randn(33)
    ours_grads = torch.autograd.grad((ours.log_probs * g_logp + ours.entropy * g_ent).sum(), leaves)
    theirs_grads = torch.autograd.grad((theirs[0] * g_logp + theirs[1] * g_ent).sum(), leaves)
    for got, want in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(hidden=torch.randn(3, 4, 2)), ValueError, "hidden must be"),
        (dict(labels=torch.zeros(2, dtype=torch.long)), ValueError, "labels must be"),
        (dict(labels=torch.full((3,), 7)), ValueError, r"labels must lie in \[0, 7\)"),
        (dict(labels=torch.zeros(3)), TypeError, "labels must be an integer"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(outputs=("logits",)), ValueError, "outputs must be"),
        (dict(bias=torch.zeros(6)), ValueError, "bias must be"),
        (dict(backend="cuda"), ValueError, "backend must be"),
    ],
)
def test_bad_input_is_named(change, error, match):
    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(7, 4), labels=torch.zeros(3).long())
    args.update(change)
    with pytest.raises(error, match=match):
        token_logps(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)
