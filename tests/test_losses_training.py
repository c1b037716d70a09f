"""A few optimizer steps of each loss on a tiny softmax policy move it as the papers say.

Policy ``π(y) = softmax(θ)`` over three one-token responses a, b, c (θ is the lm_head, the
hidden state a constant 1), reference uniform. Preferences follow Bradley–Terry with
``π* = (0.6, 0.3, 0.1)`` (the setting of Azar et al. §5 and the TYPO paper's Fig. 2).
"""

from __future__ import annotations

import torch

import fastalign

TARGET = torch.tensor([0.6, 0.3, 0.1])
# Pairs (winner, loser) in Bradley–Terry proportions: a≻b 2:1, a≻c 6:1, b≻c 3:1.
PAIRS = [(0, 1)] * 2 + [(1, 0)] + [(0, 2)] * 6 + [(2, 0)] + [(1, 2)] * 3 + [(2, 1)]


def train(loss_fn, steps=300, lr=0.05):
    theta = torch.zeros(3, 1, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(theta).backward()
        optimizer.step()
    return torch.softmax(theta.detach().squeeze(1), 0)


def paired_batch():
    chosen = torch.tensor([w for w, _ in PAIRS])
    rejected = torch.tensor([l for _, l in PAIRS])
    labels = torch.cat([chosen, rejected])[:, None]  # [2B, 1]
    hidden = torch.ones(labels.shape[0], 1, 1)
    return hidden, labels, torch.full((labels.shape[0],), -torch.log(torch.tensor(3.0)))


def test_dpo_moves_towards_the_mode():
    hidden, labels, ref = paired_batch()
    probs = train(
        lambda th: fastalign.dpo_loss_fused(hidden, th, labels, ref_logps=ref, beta=0.1).loss
    )
    assert probs[0] > probs[1] > probs[2]
    assert probs[0] > 0.9  # DPO overshoots π* towards its mode (WIC, TYPO paper Prop. 3.4)


def test_ipo_stays_regularised_towards_the_reference():
    hidden, labels, ref = paired_batch()
    probs = train(
        lambda th: (
            fastalign.ipo_loss_fused(
                hidden, th, labels, ref_logps=ref, beta=1.0, length_normalize=False
            ).loss
        )
    )
    assert probs[0] > probs[1] > probs[2]
    assert probs[0] < 0.9  # the squared target 1/(2β) bounds the log-ratio margins


def test_typo_converges_to_the_bradley_terry_optimum():
    hidden, labels, _ = paired_batch()
    sample_labels = torch.tensor([0, 1, 2])[:, None]  # one sample of each from uniform π_ref
    probs = train(
        lambda th: (
            fastalign.typo_loss_fused(
                hidden,
                th,
                labels,
                sample_hidden=torch.ones(3, 1, 1),
                sample_labels=sample_labels,
                lam=1e-4,
            ).loss
        ),
        steps=400,
    )
    torch.testing.assert_close(probs, TARGET, rtol=0, atol=0.03)  # SIC, Prop. 4.2


def test_kto_raises_desirable_and_lowers_undesirable():
    labels = torch.tensor([0, 0, 2, 2, 1, 2])[:, None]
    desirable = torch.tensor([True, True, False, False, True, False])
    hidden = torch.ones(6, 1, 1)
    ref = torch.full((6,), -torch.log(torch.tensor(3.0)))

    def loss(theta):
        return fastalign.kto_loss_fused(
            hidden,
            theta,
            labels,
            desirable,
            ref_logps=ref,
            kl_hidden=hidden,
            kl_labels=labels.roll(1, 0),
            kl_ref_logps=ref,
            beta=0.5,
        ).loss

    probs = train(loss, steps=100)
    assert probs[0] > 1 / 3 and probs[2] < 1 / 3 and probs[0] > probs[1] > probs[2]
