"""sequence_logps / policy_ref_logps on the chunked torch backend vs the float64 reference."""

from __future__ import annotations

import pytest
import torch

import fastalign
from fastalign import LogpOptions, torch_backend
from tests.reference import naive_sequence_logps

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-10}


def assert_near_truth(impl, same_dtype, truth, atol):
    """style.md's rule: |impl − truth| ≤ 2·|plain torch in the same dtype − truth| + atol."""
    impl, same_dtype, truth = impl.double(), same_dtype.double(), truth.double()
    err = (impl - truth).abs()
    bound = 2 * (same_dtype - truth).abs() + atol * (1 + truth.abs())
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3e}"


def make_case(shape, vocab, hidden_size, dtype, *, packed=False, ignore_frac=0.3, bias=False):
    """Random inputs; labels partly ignored and one all-ignored sequence when B > 1."""
    if packed:
        lengths = list(shape)
        total = sum(lengths)
        hidden = torch.randn(total, hidden_size, dtype=dtype)
        labels = torch.randint(0, vocab, (total,))
        labels[torch.rand(total) < ignore_frac] = -100
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        if len(lengths) > 1:
            labels[cu[1] : cu[2]] = -100
    else:
        hidden = torch.randn(*shape, hidden_size, dtype=dtype)
        labels = torch.randint(0, vocab, shape)
        labels[torch.rand(shape) < ignore_frac] = -100
        if shape[0] > 1:
            labels[1] = -100
        cu = None
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).to(dtype)
    b = torch.randn(vocab).to(dtype) if bias else None
    return hidden, weight, labels, b, cu


def eager_same_dtype(hidden, weight, labels, bias, cu, **kw):
    """The plain path a user writes, in the input dtype (fp32 log_softmax), for the bound."""
    transform = {k: kw[k] for k in ("logit_scale", "temperature", "logit_softcap") if k in kw}
    logits = (hidden @ weight.T).float()
    if bias is not None:
        logits = logits + bias.float()
    logits = logits * transform.get("logit_scale", 1.0) / transform.get("temperature", 1.0)
    cap = transform.get("logit_softcap")
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return naive_sequence_logps(
        logits,
        torch.eye(logits.shape[-1], dtype=logits.dtype),
        labels,
        cu_seqlens=cu,
        shift=kw.get("shift", False),
    )[0]


CASES = [
    # (shape or lengths, V, H, packed, kwargs)
    ((3, 7), 97, 33, False, {}),
    ((2, 1), 50, 16, False, {}),  # T = 1
    ((3, 9), 257, 24, False, {"shift": True}),
    ((2, 6), 61, 17, False, {"logit_scale": 0.5, "temperature": 1.7, "logit_softcap": 4.0}),
    ((5, 0, 4, 9), 89, 20, True, {}),  # packed, with an empty sequence
    ((5, 3, 8), 89, 20, True, {"shift": True, "temperature": 0.8}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab,hidden_size,packed,kwargs", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_grads_match_float64(dtype, shape, vocab, hidden_size, packed, kwargs, bias):
    hidden, weight, labels, b, cu = make_case(
        shape, vocab, hidden_size, dtype, packed=packed, bias=bias
    )
    leaves = [t.requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    options = LogpOptions(**kwargs)
    out = fastalign.sequence_logps(hidden, weight, labels, bias=b, cu_seqlens=cu, options=options)
    assert out.logps.dtype == torch.float32
    truth, count = naive_sequence_logps(
        hidden.detach().double(),
        weight.detach().double(),
        labels,
        bias=None if b is None else b.detach().double(),
        cu_seqlens=cu,
        **kwargs,
    )
    assert torch.equal(out.num_tokens, count)
    with torch.no_grad():
        same = eager_same_dtype(hidden, weight, labels, b, cu, **kwargs)
    assert_near_truth(out.logps, same, truth, ATOL[dtype])

    upstream = torch.randn(out.logps.shape)
    grads = torch.autograd.grad(out.logps, leaves, upstream)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    truth64, _ = naive_sequence_logps(
        leaves64[0],
        leaves64[1],
        labels,
        bias=leaves64[2] if bias else None,
        cu_seqlens=cu,
        **kwargs,
    )
    grads64 = torch.autograd.grad(truth64, leaves64, upstream.double())
    for got, want in zip(grads, grads64):
        assert got.dtype == dtype and got.shape == want.shape
        scale = want.abs().max().clamp_min(1e-6)
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
        assert float((got.double() - want).abs().max() / scale) < tol


def test_all_ignored_rows_give_zero_and_no_nan():
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    labels = torch.full((3, 5), -100)
    labels[0, 2] = 7
    out = fastalign.sequence_logps(hidden, weight, labels)
    assert out.num_tokens.tolist() == [1, 0, 0]
    assert out.logps[1:].tolist() == [0.0, 0.0]
    out.logps.sum().backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert hidden.grad[1:].abs().sum() == 0 and hidden.grad[0, [0, 1, 3, 4]].abs().sum() == 0

    none = torch.full((2, 4), -100)
    out = fastalign.sequence_logps(torch.randn(2, 4, 8), torch.randn(40, 8), none)
    assert out.logps.tolist() == [0.0, 0.0] and out.num_tokens.tolist() == [0, 0]


def test_non_finite_hidden_poisons_only_its_sequence():
    hidden = torch.randn(4, 6, 8)
    hidden[2, 3, 1] = float("inf")
    labels = torch.randint(0, 30, (4, 6))
    out = fastalign.sequence_logps(hidden, torch.randn(30, 8), labels)
    assert torch.isnan(out.logps[2])
    assert torch.isfinite(out.logps[[0, 1, 3]]).all()


def test_strided_views_are_scored_without_copy(monkeypatch):
    base = torch.randn(3, 8, 2 * 16)[..., ::2]  # non-contiguous last dim
    labels = torch.randint(0, 45, (3, 8))
    weight = torch.randn(45, 16)
    calls = []
    original = torch.Tensor.contiguous
    monkeypatch.setattr(
        torch.Tensor, "contiguous", lambda t, *a, **k: calls.append(t.shape) or original(t, *a, **k)
    )
    shifted = fastalign.sequence_logps(base, weight, labels, options=LogpOptions(shift=True))
    monkeypatch.undo()
    assert not any(s == base.shape for s in calls)
    explicit = fastalign.sequence_logps(base[:, :-1].clone(), weight, labels[:, 1:].clone())
    torch.testing.assert_close(shifted.logps, explicit.logps, rtol=0, atol=1e-5)


def test_chunking_is_exercised_and_matches_single_chunk(monkeypatch):
    hidden = torch.randn(4, 50, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(64, 12, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 64, (4, 50))
    full = fastalign.sequence_logps(hidden, weight, labels)
    g_full = torch.autograd.grad(full.logps.sum(), [hidden, weight])
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 64 * 8)  # 8-token chunks
    assert torch_backend.chunk_rows(64, torch_backend.CHUNK_ELEMENTS) == 8
    monkeypatch.setattr(torch_backend, "chunk_rows", lambda v, e=64 * 8: 8)
    chunked = fastalign.sequence_logps(hidden, weight, labels)
    g_chunked = torch.autograd.grad(chunked.logps.sum(), [hidden, weight])
    torch.testing.assert_close(chunked.logps, full.logps, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    hidden = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 4))
    labels[0, 0] = -100

    def fn(h, w, b):
        options = LogpOptions(logit_softcap=3.0, temperature=0.9, logit_scale=1.2)
        return fastalign.sequence_logps(h, w, labels, bias=b, options=options).logps

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_backward_is_deterministic():
    hidden = torch.randn(3, 40, 24, requires_grad=True)
    weight = torch.randn(300, 24, requires_grad=True)
    labels = torch.randint(0, 300, (3, 40))
    grads = []
    for _ in range(2):
        out = fastalign.sequence_logps(hidden, weight, labels)
        grads.append(torch.autograd.grad(out.logps.sum(), [hidden, weight]))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_policy_ref_equals_separate_calls_and_ref_is_detached():
    hidden = torch.randn(3, 6, 16, requires_grad=True)
    ref_hidden = torch.randn(3, 6, 16, requires_grad=True)
    weight = torch.randn(70, 16, requires_grad=True)
    ref_weight = torch.randn(70, 16)
    labels = torch.randint(0, 70, (3, 6))
    for rw in (None, ref_weight):
        policy, ref = fastalign.policy_ref_logps(hidden, weight, labels, ref_hidden, rw)
        alone = fastalign.sequence_logps(ref_hidden, weight if rw is None else rw, labels)
        assert torch.equal(ref.logps, alone.logps.detach())
        assert not ref.logps.requires_grad and policy.logps.requires_grad
        policy.logps.sum().backward()
        assert ref_hidden.grad is None
        single = fastalign.sequence_logps(hidden, weight, labels)
        assert torch.equal(policy.logps, single.logps)


def test_frozen_weight_gets_no_grad_and_same_hidden_grad():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(30, 8)
    labels = torch.randint(0, 30, (2, 5))
    out = fastalign.sequence_logps(hidden, weight, labels)
    (g_frozen,) = torch.autograd.grad(out.logps.sum(), [hidden])
    trainable = weight.clone().requires_grad_()
    out = fastalign.sequence_logps(hidden, trainable, labels)
    g_hidden, _ = torch.autograd.grad(out.logps.sum(), [hidden, trainable])
    torch.testing.assert_close(g_frozen, g_hidden, rtol=0, atol=1e-6)


def test_matches_trl_selective_log_softmax():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    hidden = torch.randn(3, 9, 16)
    weight = torch.randn(120, 16)
    labels = torch.randint(0, 120, (3, 9))
    labels[:, :3] = -100
    logits = hidden @ weight.T
    safe = labels.clamp_min(0)
    per_token = trl_utils.selective_log_softmax(logits, safe)
    trl_sums = (per_token * (labels != -100)).sum(-1)
    ours = fastalign.sequence_logps(hidden, weight, labels).logps
    torch.testing.assert_close(ours, trl_sums, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kwargs", [{}, {"logit_softcap": 3.0, "temperature": 0.7, "logit_scale": 1.3}]
)
def test_frozen_head_fast_path_matches_general_path(monkeypatch, dtype, kwargs):
    hidden, weight, labels, bias, _ = make_case((3, 11), 97, 33, dtype, bias=True)
    hidden.requires_grad_()
    upstream = torch.randn(3)
    trainable = weight.clone().requires_grad_()
    options = LogpOptions(**kwargs)
    general = fastalign.sequence_logps(hidden, trainable, labels, bias=bias, options=options)
    (g_general,) = torch.autograd.grad(general.logps, [hidden], upstream)

    # The fast path must not recompute logits: the general backward is never called.
    monkeypatch.setattr(torch_backend, "backward", _no_recompute)
    fast = fastalign.sequence_logps(hidden, weight, labels, bias=bias, options=options)
    (g_fast,) = torch.autograd.grad(fast.logps, [hidden], upstream)
    torch.testing.assert_close(fast.logps, general.logps.detach(), rtol=0, atol=0)
    h64 = hidden.detach().double().requires_grad_()
    truth, _ = naive_sequence_logps(h64, weight.double(), labels, bias=bias.double(), **kwargs)
    (g_truth,) = torch.autograd.grad(truth, [h64], upstream.double())
    scale = g_truth.abs().max()
    err_fast = float((g_fast.double() - g_truth).abs().max() / scale)
    err_general = float((g_general.double() - g_truth).abs().max() / scale)
    assert err_fast <= 2 * err_general + {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]


def test_frozen_head_fast_path_can_be_switched_off(monkeypatch):
    """With FROZEN_HEAD_FAST_PATH False a frozen head takes the general recompute backward."""
    hidden, weight, labels, _, _ = make_case((2, 7), 50, 16, torch.float32)
    hidden.requires_grad_()
    calls = []
    general_backward = torch_backend.backward
    monkeypatch.setattr(
        torch_backend, "backward", lambda *a, **k: calls.append(1) or general_backward(*a, **k)
    )
    fast = fastalign.sequence_logps(hidden, weight, labels)
    (g_fast,) = torch.autograd.grad(fast.logps.sum(), [hidden])
    assert not calls
    monkeypatch.setattr(fastalign.ops, "FROZEN_HEAD_FAST_PATH", False)
    slow = fastalign.sequence_logps(hidden, weight, labels)
    (g_slow,) = torch.autograd.grad(slow.logps.sum(), [hidden])
    assert calls == [1]
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-6)


def _no_recompute(*args, **kwargs):
    raise AssertionError("frozen-head path recomputed logits")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_logits_above_fp16_max_stay_finite(backend):
    """A logit above 65504 (fp16's max) is formed with an fp32 output, as CUDA's GEMM does:
    finite log-probs and gradients, equal to the float64 truth."""
    hidden = torch.full((1, 3, 4), 16.0, dtype=torch.float16)
    weight = torch.zeros(5, 4, dtype=torch.float16)
    weight[0] = 2048.0  # logit of token 0: 4 · 16 · 2048 = 131072 > 65504
    weight[1:] = torch.randn(4, 4).half()
    labels = torch.tensor([[0, 1, 2]])
    options = LogpOptions(backend=backend)
    out = fastalign.sequence_logps(hidden, weight.requires_grad_(), labels, options=options)
    truth = naive_sequence_logps(hidden.double(), weight.double(), labels)[0]
    assert torch.isfinite(out.logps).all()
    torch.testing.assert_close(out.logps.double(), truth, rtol=1e-3, atol=1e-2)
    out.logps.sum().backward()
    assert torch.isfinite(weight.grad).all()


def test_both_backends_satisfy_the_backend_protocol():
    """Every method of ``fastalign._types.Backend`` exists in both backend modules with the
    same parameters, so ``ops`` and the store path can take either."""
    import inspect

    from fastalign._types import Backend
    from fastalign.kernels import logprob

    for name in ("forward", "backward", "group_logits", "group_grads"):
        want = list(inspect.signature(getattr(Backend, name)).parameters)[1:]  # minus self
        for module in (torch_backend, logprob):
            assert list(inspect.signature(getattr(module, name)).parameters) == want, (
                module.__name__,
                name,
            )
