"""The Triton backend (kernels/logprob.py) through the public API, vs the float64 reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py); shapes stay small and
odd: V not a multiple of the tile, odd H, T=1, all-ignored rows, packed input.
"""

from __future__ import annotations

import pytest
import torch

import fastalign
from fastalign import LogpOptions
from fastalign.kernels import logprob
from tests.reference import naive_sequence_logps
from tests.test_ops import ATOL, CASES, assert_near_truth, eager_same_dtype, make_case

TRITON = LogpOptions(backend="triton")
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,vocab,hidden_size,packed,kwargs", CASES)
def test_forward_and_grads_match_float64(device, dtype, shape, vocab, hidden_size, packed, kwargs):
    hidden, weight, labels, bias, cu = to(
        device, *make_case(shape, vocab, hidden_size, dtype, packed=packed, bias=True)
    )
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    out = fastalign.sequence_logps(
        hidden,
        weight,
        labels,
        bias=bias,
        cu_seqlens=cu,
        options=LogpOptions(backend="triton", **kwargs),
    )
    cpu = [t.detach().cpu() for t in (hidden, weight, bias)]
    labels_cpu, cu_cpu = labels.cpu(), None if cu is None else cu.cpu()
    truth, count = naive_sequence_logps(
        cpu[0].double(),
        cpu[1].double(),
        labels_cpu,
        bias=cpu[2].double(),
        cu_seqlens=cu_cpu,
        **kwargs,
    )
    assert torch.equal(out.num_tokens.cpu(), count)
    same = eager_same_dtype(*cpu[:2], labels_cpu, cpu[2], cu_cpu, **kwargs)
    assert_near_truth(out.logps.cpu(), same, truth, ATOL[dtype])

    upstream = torch.randn(out.logps.shape)
    grads = torch.autograd.grad(out.logps, leaves, upstream.to(device))
    leaves64 = [t.double().requires_grad_() for t in cpu]
    truth64, _ = naive_sequence_logps(
        *leaves64[:2], labels_cpu, bias=leaves64[2], cu_seqlens=cu_cpu, **kwargs
    )
    grads64 = torch.autograd.grad(truth64, leaves64, upstream.double())
    for got, want in zip(grads, grads64):
        assert got.dtype == dtype and got.shape == want.shape
        scale = want.abs().max().clamp_min(1e-6)
        assert float((got.cpu().double() - want).abs().max() / scale) < GRAD_TOL[dtype]


def test_fp16_and_non_contiguous_hidden(device):
    base = torch.randn(3, 2 * 9, 21, dtype=torch.float16, device=device)
    hidden = base[:, ::2].transpose(0, 1).transpose(0, 1)  # strided in T, contiguous in H
    strided_h = torch.randn(3, 9, 2 * 21, dtype=torch.float16, device=device)[..., ::2]
    weight = (torch.randn(130, 21, device=device) / 5).half()
    labels = torch.randint(0, 130, (3, 9), device=device)
    for h in (hidden, strided_h):
        ours = fastalign.sequence_logps(
            h, weight, labels, options=LogpOptions(shift=True, backend="triton")
        )
        truth, _ = naive_sequence_logps(
            h.double().cpu(), weight.double().cpu(), labels.cpu(), shift=True
        )
        same = eager_same_dtype(h.cpu(), weight.cpu(), labels.cpu(), None, None, shift=True)
        assert_near_truth(ours.logps.cpu(), same, truth, ATOL[torch.float16])


def test_triton_matches_torch_backend(device):
    hidden, weight, labels, bias, _ = to(device, *make_case((4, 13), 300, 40, torch.float32))
    kwargs = dict(logit_softcap=6.0, temperature=0.9)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    results = []
    for backend in ("triton", "torch"):
        options = LogpOptions(backend=backend, **kwargs)
        out = fastalign.sequence_logps(hidden, weight, labels, bias=bias, options=options)
        results.append((out.logps, *torch.autograd.grad(out.logps.sum(), leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_all_ignored_and_empty(device):
    hidden = torch.randn(3, 4, 16, device=device, requires_grad=True)
    weight = torch.randn(50, 16, device=device, requires_grad=True)
    labels = torch.full((3, 4), -100, device=device)
    labels[2, 1] = 3
    out = fastalign.sequence_logps(hidden, weight, labels, options=TRITON)
    assert out.logps[:2].tolist() == [0.0, 0.0] and out.num_tokens.tolist() == [0, 0, 1]
    out.logps.sum().backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad[:2].abs().sum() == 0
    nothing = fastalign.sequence_logps(
        hidden, weight, torch.full((3, 4), -100, device=device), options=TRITON
    )
    assert nothing.logps.tolist() == [0.0, 0.0, 0.0]


def test_nan_row_stays_in_its_sequence(device):
    hidden = torch.randn(3, 5, 16, device=device)
    hidden[1, 2, 0] = float("nan")
    out = fastalign.sequence_logps(
        hidden,
        torch.randn(70, 16, device=device),
        torch.randint(0, 70, (3, 5), device=device),
        options=TRITON,
    )
    assert torch.isnan(out.logps[1]) and torch.isfinite(out.logps[[0, 2]]).all()


def test_backward_is_bit_identical(device):
    hidden, weight, labels, bias, _ = to(
        device, *make_case((2, 19), 150, 24, torch.float32, bias=True)
    )
    leaves = [hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()]
    runs = []
    for _ in range(2):
        out = fastalign.sequence_logps(hidden, weight, labels, bias=bias, options=TRITON)
        runs.append((out.logps, *torch.autograd.grad(out.logps.sum(), leaves)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_policy_and_reference_share_one_launch_per_vocab_chunk(device, monkeypatch):
    """Streams sharing an lm_head are stacked: one GEMM and one fold launch per vocab chunk
    cover the policy and the reference rows together."""
    launches = []
    kernel = logprob._fold_kernel

    class Counting:
        def __getitem__(self, grid):
            def launch(**kwargs):
                launches.append((grid, kwargs["num_rows"]))
                return kernel[grid](**kwargs)

            return launch

    monkeypatch.setattr(logprob, "_fold_kernel", Counting())
    # several vocab chunks on any device
    monkeypatch.setattr(logprob, "CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(logprob, "VOCAB_ALIGN", 32)
    hidden = torch.randn(3, 6, 16, device=device, requires_grad=True)
    ref_hidden = torch.randn(3, 6, 16, device=device)
    weight = torch.randn(200, 16, device=device, requires_grad=True)
    labels = torch.randint(0, 200, (3, 6), device=device)
    labels[0, :4] = -100  # streams of different lengths in one launch
    policy, ref = fastalign.policy_ref_logps(hidden, weight, labels, ref_hidden, options=TRITON)
    stacked = 2 * int((labels != -100).sum())
    chunks = -(-200 // logprob._chunk_width(stacked, 200))
    assert chunks > 1 and len(launches) == chunks
    assert all(rows == stacked for _, rows in launches)
    assert not ref.logps.requires_grad
    # Stacked or alone, the same sums; cuBLAS may tile a taller GEMM differently, so not
    # necessarily to the bit on a GPU.
    alone = fastalign.sequence_logps(ref_hidden, weight, labels, options=TRITON)
    torch.testing.assert_close(ref.logps, alone.logps, rtol=1e-5, atol=1e-5)
    single = fastalign.sequence_logps(hidden, weight, labels, options=TRITON)
    torch.testing.assert_close(policy.logps, single.logps, rtol=1e-5, atol=1e-5)


def test_incompatible_streams_fall_back_to_separate_launches(device):
    hidden = torch.randn(2, 5, 16, device=device)
    ref_weight = torch.randn(60, 16, device=device, dtype=torch.float16)
    ref_hidden = torch.randn(2, 5, 16, device=device, dtype=torch.float16)
    weight = torch.randn(60, 16, device=device)
    labels = torch.randint(0, 60, (2, 5), device=device)
    _, ref = fastalign.policy_ref_logps(
        hidden, weight, labels, ref_hidden, ref_weight, options=TRITON
    )
    want = fastalign.sequence_logps(
        ref_hidden, ref_weight, labels, options=LogpOptions(backend="torch")
    )
    torch.testing.assert_close(ref.logps, want.logps, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("frozen", [False, True])
def test_every_output_element_is_written(device, nan_empty, frozen):
    """Fresh buffers poisoned with NaN: an unwritten element would surface as NaN."""
    hidden, weight, labels, bias, _ = to(
        device, *make_case((3, 17), 333, 20, torch.float32, bias=True)
    )
    leaves = [hidden.requires_grad_()]
    if not frozen:  # a frozen lm_head takes the expectation path and its fold kernel
        leaves += [weight.requires_grad_(), bias.requires_grad_()]
    out = fastalign.sequence_logps(hidden, weight, labels, bias=bias, options=TRITON)
    grads = torch.autograd.grad(out.logps.sum(), leaves)
    assert torch.isfinite(out.logps).all()
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kwargs", [{}, {"logit_softcap": 3.0, "temperature": 0.7, "logit_scale": 1.3}]
)
def test_frozen_head_fast_path_matches_general_path(device, monkeypatch, dtype, kwargs):
    """A frozen lm_head accumulates E_t = softmax(z_t)·W online in forward; the backward then
    recomputes nothing, and values and hidden gradients stay within the dtype rule."""
    hidden, weight, labels, bias, _ = to(device, *make_case((3, 11), 301, 33, dtype, bias=True))
    hidden.requires_grad_()
    upstream = torch.randn(3).to(device)
    general = fastalign.sequence_logps(
        hidden,
        weight.clone().requires_grad_(),
        labels,
        bias=bias,
        options=LogpOptions(backend="triton", **kwargs),
    )
    (g_general,) = torch.autograd.grad(general.logps, [hidden], upstream)

    monkeypatch.setattr(logprob, "backward", _no_recompute)
    fast = fastalign.sequence_logps(
        hidden, weight, labels, bias=bias, options=LogpOptions(backend="triton", **kwargs)
    )
    (g_fast,) = torch.autograd.grad(fast.logps, [hidden], upstream)

    cpu = [t.detach().cpu() for t in (hidden, weight, labels, bias)]
    h64 = cpu[0].double().requires_grad_()
    truth, _ = naive_sequence_logps(h64, cpu[1].double(), cpu[2], bias=cpu[3].double(), **kwargs)
    same = eager_same_dtype(*cpu[:3], cpu[3], None, **kwargs)
    assert_near_truth(fast.logps.cpu(), same, truth.detach(), ATOL[dtype])
    (g_truth,) = torch.autograd.grad(truth, [h64], upstream.cpu().double())
    scale = g_truth.abs().max()
    err_fast = float((g_fast.cpu().double() - g_truth).abs().max() / scale)
    err_general = float((g_general.cpu().double() - g_truth).abs().max() / scale)
    assert err_fast <= 2 * err_general + {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]


def test_frozen_policy_and_plain_reference_in_one_call(device):
    """Mixed call: the frozen policy takes the expectation path, the reference the plain one;
    both equal their single-stream results."""
    hidden, weight, labels, _, _ = to(device, *make_case((4, 9), 250, 24, torch.float32))
    ref_hidden = torch.randn_like(hidden)
    hidden.requires_grad_()
    policy, ref = fastalign.policy_ref_logps(hidden, weight, labels, ref_hidden, options=TRITON)
    alone = fastalign.sequence_logps(ref_hidden, weight, labels, options=TRITON)
    assert torch.equal(ref.logps, alone.logps)
    general = fastalign.sequence_logps(
        hidden, weight.clone().requires_grad_(), labels, options=TRITON
    )
    torch.testing.assert_close(policy.logps, general.logps, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(policy.logps.sum(), [hidden])
    (grad_general,) = torch.autograd.grad(general.logps.sum(), [hidden])
    torch.testing.assert_close(grad, grad_general, rtol=1e-4, atol=1e-5)


def _no_recompute(*args, **kwargs):
    raise AssertionError("frozen-head path recomputed logits")
