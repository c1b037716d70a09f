"""The fused-epilogue GEMM kernels (kernels/fused_gemm.py) against float64 references.

Interpreted on CPU (TRITON_INTERPRET=1), compiled on a GPU. Both tile loaders run: TMA
descriptors (the interpreter emulates them) and pointer loads; shapes are small and odd
(V not a multiple of the tile, targets on tile and chunk edges, unaligned H).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastalign
from fastalign import LogpOptions
from fastalign._types import BackendGrads, LogitTransform, TokenBatch
from fastalign.kernels import fused_logprob, logprob
from tests import loss_reference as R
from tests.reference import naive_sequence_logps

TRITON = LogpOptions(backend="triton")
TRANSFORMS = {
    "identity": LogitTransform(),
    "scaled": LogitTransform(logit_scale=1.3, temperature=0.7),
    "softcap": LogitTransform(logit_scale=0.9, temperature=1.2, softcap=3.0),
}


@pytest.fixture
def fused(monkeypatch):
    """Select the fused kernels and count their forward launches: ``(rows, store path)``."""
    monkeypatch.setattr(logprob, "CUDA_KERNEL", "fused")
    launches = []
    kernel = fused_logprob.K._fused_gemm_kernel

    class Counting:
        def __getitem__(self, grid):
            def launch(**kwargs):
                if not kwargs["DZ"]:
                    launches.append((kwargs["num_rows"], kwargs["STORE"]))
                return kernel[grid](**kwargs)

            return launch

    monkeypatch.setattr(fused_logprob.K, "_fused_gemm_kernel", Counting())
    return launches


def _tokens(hidden, weight, targets, bias=None) -> TokenBatch:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return TokenBatch(hidden, (rows,), rows * hidden.shape[1], targets, weight, bias)


def _edge_targets(num_rows: int, vocab: int) -> torch.Tensor:
    """Random targets, the first ones on vocab-tile and forward-chunk edges."""
    cfg = fused_logprob.tile_config()
    chunk = fused_logprob.forward_chunk_width(num_rows, vocab, cfg)
    edges = [0, cfg.block_n - 1, cfg.block_n, 2 * cfg.block_n - 1, chunk - 1, chunk, vocab - 1]
    targets = torch.randint(0, vocab, (num_rows,))
    edges = [e for e in edges if e < vocab]
    targets[: len(edges)] = torch.tensor(edges)
    return targets


def _z64(hidden, weight, bias, transform: LogitTransform) -> torch.Tensor:
    """float64 logits after the transform: ``[M, V]``."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * transform.multiplier
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    return z


def _inputs(device, rows, vocab, hidden_size, dtype, with_bias):
    hidden = torch.randn(rows, hidden_size).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).to(device, dtype)
    bias = torch.randn(vocab).to(device, dtype) if with_bias else None
    return hidden, weight, bias, _edge_targets(rows, vocab).to(device)


CASES = [  # (rows, V, H, transform, bias, loads, epilogue in two halves)
    (37, 333, 32, "identity", False, "tma", False),
    (37, 333, 32, "softcap", True, "pointer", True),  # the last tile's right half: padding
    (21, 96, 48, "scaled", True, "tma", True),  # V a multiple of the tile
    (19, 257, 21, "softcap", False, "pointer", False),  # unaligned H: pointer loads only
]


def _select(monkeypatch, loads: str, split: bool) -> None:
    """Force the tile loader and the epilogue split of the configuration in use."""
    monkeypatch.setattr(fused_logprob, "LOADS", loads)
    for name in ("GPU_CONFIG", "INTERPRET_CONFIG"):
        config = getattr(fused_logprob, name)._replace(epilogue_split=split)
        monkeypatch.setattr(fused_logprob, name, config)


@pytest.mark.parametrize("rows,vocab,hidden_size,name,with_bias,loads,split", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_matches_float64(
    device, monkeypatch, rows, vocab, hidden_size, name, with_bias, loads, split, dtype
):
    _select(monkeypatch, loads, split)
    hidden, weight, bias, targets = _inputs(device, rows, vocab, hidden_size, dtype, with_bias)
    logp, lse, expected = fused_logprob.forward_group(
        [_tokens(hidden, weight, targets, bias)], TRANSFORMS[name]
    )
    z = _z64(hidden.cpu(), weight.cpu(), None if bias is None else bias.cpu(), TRANSFORMS[name])
    lse64 = torch.logsumexp(z, dim=-1)
    logp64 = z.gather(1, targets.cpu()[:, None]).squeeze(1) - lse64
    assert expected is None and logp.dtype == lse.dtype == torch.float32
    # Inputs are exact in fp32; what is left is fp32 accumulation and exp2/log2 rounding.
    torch.testing.assert_close(lse.cpu().double(), lse64, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(logp.cpu().double(), logp64, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("rows,vocab,hidden_size,name,with_bias,loads,split", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dz_matches_float64(
    device, monkeypatch, rows, vocab, hidden_size, name, with_bias, loads, split, dtype
):
    """One vocab chunk of dz into a NaN-poisoned buffer, within one ulp of the weight's dtype;
    rows with g = 0 give exact zeros."""
    _select(monkeypatch, loads, split)
    transform = TRANSFORMS[name]
    hidden, weight, bias, targets = _inputs(device, rows, vocab, hidden_size, dtype, with_bias)
    z = _z64(hidden.cpu(), weight.cpu(), None if bias is None else bias.cpu(), transform)
    lse = torch.logsumexp(z, dim=-1)
    grad = torch.randn(rows, dtype=torch.float64)
    grad[::3] = 0.0
    start, stop = 32, vocab - 5  # a chunk that starts on a tile edge and ends off one
    buffer = fused_logprob.dz_buffer(rows, stop - start, weight).fill_(float("nan"))
    dz = fused_logprob.dz_chunk(
        hidden, weight[start:stop], None if bias is None else bias[start:stop],
        targets, start, lse.float().to(device), grad.float().to(device), transform, buffer,
    )  # fmt: skip
    onehot = torch.nn.functional.one_hot(targets.cpu(), vocab).double()
    slope = 1.0 if transform.softcap is None else 1 - (z / transform.softcap) ** 2
    want = grad[:, None] * (onehot - torch.softmax(z, -1)) * slope * transform.multiplier
    want = want[:, start:stop]
    assert dz.dtype == dtype and dz.shape == want.shape and torch.isfinite(dz).all()
    err = (dz.cpu().double() - want).abs()
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    assert bool((err <= ulp * want.abs() + 1e-6).all()), float(err.max())
    assert bool((dz[::3] == 0).all())


def _loss_and_grads(hidden, weight, bias, labels, upstream, **kwargs):
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
    out = fastalign.sequence_logps(
        *leaves[:2], labels, bias=leaves[2], options=LogpOptions(backend="triton", **kwargs)
    )
    return (out.logps, *torch.autograd.grad(out.logps, leaves, upstream))


def test_public_api_grads_within_rule_of_gemm_fold(device, fused, monkeypatch):
    """Through ``sequence_logps``: values and gradients at least as close to float64 as the
    GEMM+fold backend's (times 2, plus a bf16 rounding allowance)."""
    kwargs = dict(logit_softcap=4.0, temperature=0.9)
    hidden = torch.randn(3, 11, 40).to(device, torch.bfloat16)
    weight = (torch.randn(301, 40) / 40**0.5).to(device, torch.bfloat16)
    bias = torch.randn(301).to(device, torch.bfloat16)
    labels = torch.randint(0, 301, (3, 11)).to(device)
    labels[1, :4] = -100
    upstream = torch.tensor([0.7, 0.0, -1.3]).to(device)  # one sequence with g = 0
    got = _loss_and_grads(hidden, weight, bias, labels, upstream, **kwargs)
    assert fused, "the fused kernels did not run"
    monkeypatch.setattr(logprob, "CUDA_KERNEL", "gemm_fold")
    base = _loss_and_grads(hidden, weight, bias, labels, upstream, **kwargs)
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in (hidden, weight, bias)]
    truth, _ = naive_sequence_logps(*leaves64[:2], labels.cpu(), bias=leaves64[2], **kwargs)
    truth = (truth.detach(), *torch.autograd.grad(truth, leaves64, upstream.cpu().double()))
    for ours, theirs, want in zip(got, base, truth):
        scale = want.abs().max()
        err = float((ours.detach().cpu().double() - want).abs().max() / scale)
        err_base = float((theirs.detach().cpu().double() - want).abs().max() / scale)
        assert err <= 2 * err_base + 4e-3, (err, err_base)
    assert bool((got[1][1] == 0).all())  # g = 0: no gradient reaches that sequence's rows


def test_streams_sharing_a_head_are_stacked(device, fused):
    hidden = torch.randn(3, 6, 16).to(device, torch.float16)
    ref_hidden = torch.randn(3, 6, 16).to(device, torch.float16)
    weight = (torch.randn(150, 16) / 4).to(device, torch.float16).requires_grad_()
    labels = torch.randint(0, 150, (3, 6)).to(device)
    labels[0, :4] = -100
    policy, ref = fastalign.policy_ref_logps(hidden, weight, labels, ref_hidden, options=TRITON)
    stacked = 2 * int((labels != -100).sum())
    assert fused and all(launch == (stacked, False) for launch in fused)
    alone = fastalign.sequence_logps(ref_hidden, weight, labels, options=TRITON)
    torch.testing.assert_close(ref.logps, alone.logps, rtol=1e-5, atol=1e-5)


def test_poisoned_buffers_and_bit_identical_reruns(device, fused, nan_empty):
    """Every torch.empty is NaN-filled: an unwritten partial, target or dz would surface."""
    hidden = torch.randn(2, 17, 24).to(device, torch.bfloat16)
    weight = (torch.randn(333, 24) / 5).to(device, torch.bfloat16)
    bias = torch.randn(333).to(device, torch.bfloat16)
    labels = torch.randint(0, 333, (2, 17)).to(device)
    upstream = torch.tensor([1.0, -2.0]).to(device)
    runs = [_loss_and_grads(hidden, weight, bias, labels, upstream) for _ in range(2)]
    assert fused and all(torch.isfinite(t).all() for t in runs[0])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_nan_row_stays_in_its_sequence(device, fused):
    hidden = torch.randn(3, 5, 16).to(device, torch.bfloat16)
    hidden[1, 2, 0] = float("nan")
    weight = torch.randn(70, 16).to(device, torch.bfloat16)
    labels = torch.randint(0, 70, (3, 5)).to(device)
    out = fastalign.sequence_logps(hidden, weight, labels, options=TRITON)
    assert fused and torch.isnan(out.logps[1]) and torch.isfinite(out.logps[[0, 2]]).all()


def test_groups_the_fused_kernels_do_not_take_keep_gemm_fold(device, fused):
    """fp32 weights and a frozen lm_head (the E_t path) stay on the GEMM+fold kernels."""
    hidden = torch.randn(2, 5, 16, device=device, requires_grad=True)
    labels = torch.randint(0, 60, (2, 5), device=device)
    for weight in (
        torch.randn(60, 16, device=device, requires_grad=True),  # fp32
        torch.randn(60, 16, device=device).bfloat16(),  # frozen head
    ):
        out = fastalign.sequence_logps(hidden.to(weight.dtype), weight, labels, options=TRITON)
        out.logps.sum().backward()
    assert not fused


def test_tma_needs_aligned_rows():
    if fused_logprob.LOADS != "auto":
        pytest.skip("FASTALIGN_FUSED_LOADS forces one loader in this run")
    assert fused_logprob._use_tma(torch.empty(4, 32, dtype=torch.bfloat16))
    assert not fused_logprob._use_tma(torch.empty(4, 21, dtype=torch.bfloat16))  # 42-B rows


def test_selection_default_and_bad_value():
    """``gemm_fold`` unless FASTALIGN_CUDA_KERNEL says otherwise; a bad value is an error."""
    code = "from fastalign.kernels import logprob; print(logprob.CUDA_KERNEL)"
    env = {k: v for k, v in os.environ.items() if k != "FASTALIGN_CUDA_KERNEL"}
    for value, want in ((None, "gemm_fold"), ("fused", "fused")):
        if value is not None:
            env["FASTALIGN_CUDA_KERNEL"] = value
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.stdout.strip() == want, done.stderr[-2000:]
    tokens = _tokens(torch.zeros(2, 8), torch.zeros(5, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="FASTALIGN_CUDA_KERNEL"):
        fused_logprob.applies("fast", tokens, False)


def _dz64(z, targets, grad, transform: LogitTransform) -> torch.Tensor:
    """float64 ``dz = g·(onehot − softmax(z))·s·mult`` ``[M, V]``."""
    onehot = torch.nn.functional.one_hot(targets, z.shape[1]).double()
    slope = 1.0 if transform.softcap is None else 1 - (z / transform.softcap) ** 2
    return grad[:, None] * (onehot - torch.softmax(z, -1)) * slope * transform.multiplier


@pytest.mark.parametrize("rows,vocab,hidden_size,name,with_bias,loads,split", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_path_group_matches_float64(
    device, fused, monkeypatch, rows, vocab, hidden_size, name, with_bias, loads, split, dtype
):
    """The store path's fused variant: logp and lse as the forward's; ``dz`` formed in place
    of the kept ``exp2(z₂ − part max)·s`` within two roundings to the weight's dtype (one
    at the target), exact zeros for g = 0; the gradients it accumulates are ``dz``'s."""
    _select(monkeypatch, loads, split)
    transform = TRANSFORMS[name]
    hidden, weight, bias, targets = _inputs(device, rows, vocab, hidden_size, dtype, with_bias)
    tokens = _tokens(hidden, weight, targets, bias)
    group = logprob.group_logits(hidden, tokens, transform)
    assert fused == [(rows, True)] and group.part_max is not None
    z = _z64(hidden.cpu(), weight.cpu(), None if bias is None else bias.cpu(), transform)
    lse64 = torch.logsumexp(z, dim=-1)
    torch.testing.assert_close(group.lse.cpu().double(), lse64, rtol=2e-6, atol=2e-6)
    logp64 = z.gather(1, targets.cpu()[:, None]).squeeze(1) - lse64
    torch.testing.assert_close(group.logp.cpu().double(), logp64, rtol=2e-6, atol=2e-6)
    grad = torch.randn(rows, dtype=torch.float64)
    grad[::3] = 0.0
    accumulators = BackendGrads(
        hidden, torch.zeros(vocab, hidden_size, device=device), torch.zeros(vocab, device=device)
    )
    grad_rows = logprob.group_grads(
        group, hidden, tokens, transform, grad.float().to(device), accumulators
    )
    dz = group.logits  # dz in place of what the forward kept
    want = _dz64(z, targets.cpu(), grad, transform)
    assert dz.dtype == dtype and dz.shape == want.shape and torch.isfinite(dz).all()
    # One conversion to the weight's dtype: within a unit roundoff on the GPU (round to
    # nearest), within an ulp interpreted (triton 3.9's interpreter truncates). Two here.
    unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    conversion = 2 * unit if logprob.INTERPRET else unit
    err = (dz.cpu().double() - want).abs()
    bound = 2 * conversion * (1 + 1e-4) * want.abs() + 1e-6
    assert bool((err <= bound).all()), float((err / want.abs().clamp_min(1e-6)).max())
    assert bool((dz[::3] == 0).all())
    dz64 = dz.cpu().double()
    for got, ours in (
        (grad_rows, dz64 @ weight.cpu().double()),
        (accumulators.weight, dz64.T @ hidden.cpu().double()),
        (accumulators.bias, dz64.sum(0)),
    ):
        torch.testing.assert_close(got.cpu().double(), ours, rtol=1e-2, atol=1e-2)


def _store_loss(loss: str, x: dict) -> tuple[torch.Tensor, ...]:
    """``(loss, grad hidden, grad weight, grad bias)`` of a store-path loss on Triton."""
    leaves = [x[k].detach().requires_grad_() for k in ("hidden", "weight", "bias")]
    options = LogpOptions(logit_softcap=4.0, temperature=0.9, backend="triton", grad_mode="store")
    common = dict(bias=leaves[2], options=options)
    if loss == "dpo":  # policy on the store path, reference through the fused forward
        out = fastalign.dpo_loss_fused(
            *leaves[:2], x["labels"], ref_hidden=x["ref_hidden"], beta=0.3, **common
        )
    else:  # two differentiable streams on one lm_head
        out = fastalign.typo_loss_fused(
            *leaves[:2], x["labels"], lam=0.3, sample_hidden=x["sample_hidden"],
            sample_labels=x["sample_labels"], **common,
        )  # fmt: skip
    return (out.loss.detach(), *torch.autograd.grad(out.loss, leaves))


def _store_truth(loss: str, x: dict) -> tuple[torch.Tensor, ...]:
    leaves = [x[k].detach().cpu().double().requires_grad_() for k in ("hidden", "weight", "bias")]
    kw = dict(logit_softcap=4.0, temperature=0.9)
    weight, bias = leaves[1:]

    def sums(hidden, labels, grad=True):
        w, b = (weight, bias) if grad else (weight.detach(), bias.detach())
        return naive_sequence_logps(hidden.cpu().double(), w, labels.cpu(), bias=b, **kw)[0]

    policy = sums(leaves[0], x["labels"])
    if loss == "dpo":
        value = R.dpo(policy, sums(x["ref_hidden"], x["labels"], grad=False), 0.3)
    else:
        value = R.typo(policy, sums(x["sample_hidden"], x["sample_labels"]), 0.3)
    return (value.detach(), *torch.autograd.grad(value, leaves))


@pytest.mark.parametrize("loss", ["dpo", "typo"])
def test_store_path_losses_within_rule_of_gemm_fold(device, fused, nan_empty, monkeypatch, loss):
    """Through the losses' store path: loss and gradients at least as close to float64 as the
    GEMM+fold store path's (times 2, plus a bf16 allowance), in NaN-poisoned buffers, and
    bit-identical on a rerun."""
    pairs, seq, hidden_size, vocab = 2, 6, 24, 150
    labels = torch.randint(0, vocab, (2 * pairs, seq))
    labels[1, :3] = -100
    x = dict(
        hidden=torch.randn(2 * pairs, seq, hidden_size),
        ref_hidden=torch.randn(2 * pairs, seq, hidden_size),
        sample_hidden=torch.randn(3, seq + 1, hidden_size),
        sample_labels=torch.randint(0, vocab, (3, seq + 1)),
        weight=torch.randn(vocab, hidden_size) / hidden_size**0.5,
        bias=torch.randn(vocab) / 4,
        labels=labels,
    )
    x = {
        k: v.to(device, torch.bfloat16) if v.is_floating_point() else v.to(device)
        for k, v in x.items()
    }
    runs = [_store_loss(loss, x) for _ in range(2)]
    assert any(store for _, store in fused), "the fused store path did not run"
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    monkeypatch.setattr(logprob, "CUDA_KERNEL", "gemm_fold")
    base = _store_loss(loss, x)
    for ours, theirs, want in zip(runs[0], base, _store_truth(loss, x)):
        scale = want.abs().max()
        err = float((ours.cpu().double() - want).abs().max() / scale)
        err_base = float((theirs.cpu().double() - want).abs().max() / scale)
        assert err <= 2 * err_base + 4e-3, (err, err_base)
