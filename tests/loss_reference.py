"""Naive float64 losses written from the formulas (full logits, log_softmax, gather)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.reference import naive_sequence_logps


def logps64(hidden, weight, labels, **kw):
    """float64 per-sequence sums and token counts, differentiable w.r.t. hidden/weight."""
    return naive_sequence_logps(hidden.double(), weight.double(), labels, **kw)


def dpo(s, ref, beta, loss_type="sigmoid", eps=0.0):
    b = s.shape[0] // 2
    r = s - ref
    delta = r[:b] - r[b:]
    if loss_type == "sigmoid":
        per = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    else:
        per = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (
            1 - 2 * eps
        )
    return per.mean()


def ipo(s, ref, n, beta, length_normalize=True):
    b = s.shape[0] // 2
    r = s - ref
    if length_normalize:
        r = r / n.clamp_min(1).double()
    return ((r[:b] - r[b:] - 1 / (2 * beta)) ** 2).mean()


def typo(s, sample, lam):
    b = s.shape[0] // 2
    return torch.log1p(torch.exp(s[b:] - s[:b])).mean() + lam * (-sample).mean()


def kto(s, ref, desirable, kl_policy, kl_ref, beta, w_d=1.0, w_u=1.0):
    z0 = torch.clamp((kl_policy - kl_ref).mean(), min=0).detach()
    r = s - ref
    per = torch.where(
        desirable,
        w_d * (1 - torch.sigmoid(beta * (r - z0))),
        w_u * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    return per.mean(), z0


BACKENDS = ["torch", "triton"]


def paired_inputs(pairs=3, seq_len=7, hidden_size=17, vocab=97, dtype=torch.float32, device="cpu"):
    """Policy/reference hidden states, lm_head and labels of 2·pairs rows (prompt masked).

    Drawn on the CPU (the same values for a seed whatever ``device``), then moved.
    """
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, dtype=dtype)
    ref_hidden = torch.randn(2 * pairs, seq_len, hidden_size, dtype=dtype)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (2 * pairs, seq_len))
    labels[:, :2] = -100
    labels[0, 5:] = -100  # unequal lengths
    hidden, ref_hidden, weight, labels = (
        t.to(device) for t in (hidden, ref_hidden, weight, labels)
    )
    return hidden.requires_grad_(), ref_hidden, weight.requires_grad_(), labels


def assert_loss_and_grads(fused_loss, naive_loss, leaves, rtol=1e-4):
    """Fused loss and its gradients w.r.t. ``leaves`` equal the float64 formulas."""
    torch.testing.assert_close(fused_loss.double(), naive_loss, rtol=rtol, atol=1e-6)
    got = torch.autograd.grad(fused_loss, leaves, retain_graph=True)
    want = torch.autograd.grad(naive_loss, leaves)
    for g, w in zip(got, want):
        scale = w.abs().max().clamp_min(1e-8)
        assert float((g.double() - w).abs().max() / scale) < rtol * 10, "gradient mismatch"


def record_launches(monkeypatch) -> list[int]:
    """Patch the torch backend's forward to record how many streams each launch scores."""
    from fastalign import torch_backend

    launches = []
    forward = torch_backend.forward

    def counting(batches, *args, **kwargs):
        launches.append(len(batches))
        return forward(batches, *args, **kwargs)

    monkeypatch.setattr(torch_backend, "forward", counting)
    return launches
