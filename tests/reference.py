"""Naive float64 references: full logits, log_softmax, gather. Tests only."""

from __future__ import annotations

import torch


def naive_log_softmax(
    hidden, weight, bias=None, logit_scale=1.0, temperature=1.0, logit_softcap=None
) -> torch.Tensor:
    """float64 ``log_softmax`` of the transformed logits ``[..., V]``, differentiable."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logits * logit_scale / temperature
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return torch.log_softmax(logits, dim=-1)


def naive_token_logps(
    hidden: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor,  # [...]
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Per-position log-probs in float64 (0 where ignored), differentiable."""
    logp = naive_log_softmax(hidden, weight, bias, logit_scale, temperature, logit_softcap)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    token = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, token, torch.zeros_like(token))


def naive_sequence_logps(
    hidden, weight, labels, *, cu_seqlens=None, shift=False, ignore_index=-100, **transform
):
    """``(logps float64 [B], num_tokens [B])`` the slow, obvious way."""
    if hidden.dim() == 3:
        if shift:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        token = naive_token_logps(hidden, weight, labels, ignore_index=ignore_index, **transform)
        return token.sum(-1), (labels != ignore_index).sum(-1)
    sums, counts = [], []
    for b in range(cu_seqlens.numel() - 1):
        start, stop = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        h, y = hidden[start:stop], labels[start:stop]
        if shift:
            h, y = h[:-1], y[1:]
        token = naive_token_logps(h, weight, y, ignore_index=ignore_index, **transform)
        sums.append(token.sum())
        counts.append(int((y != ignore_index).sum()))
    return torch.stack(sums), torch.tensor(counts)
