"""TYPO vs the float64 formula (eq. 16 + λ·eq. 17), on both backends."""

from __future__ import annotations

import pytest
import torch

import fastalign
from tests import loss_reference as R


@pytest.mark.parametrize("backend", R.BACKENDS)
@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_typo_matches_formula(backend, lam, device):
    hidden, _, weight, labels = R.paired_inputs(device=device)
    sample_hidden = torch.randn(4, 5, 17).to(device).requires_grad_()
    sample_labels = torch.randint(0, 97, (4, 5))
    sample_labels[:, 0] = -100
    sample_labels = sample_labels.to(device)
    s, _ = R.logps64(hidden, weight, labels)
    sample_s, _ = R.logps64(sample_hidden, weight, sample_labels)
    out = fastalign.typo_loss_fused(
        hidden,
        weight,
        labels,
        sample_hidden=sample_hidden,
        sample_labels=sample_labels,
        lam=lam,
        options=fastalign.LogpOptions(backend=backend),
    )
    R.assert_loss_and_grads(out.loss, R.typo(s, sample_s, lam), [hidden, weight, sample_hidden])
    torch.testing.assert_close(out.sample_logps.double(), sample_s.detach(), rtol=1e-4, atol=1e-5)


def test_samples_scored_in_the_same_launch(monkeypatch):
    calls = R.record_launches(monkeypatch)
    hidden, _, weight, labels = R.paired_inputs()
    fastalign.typo_loss_fused(
        hidden,
        weight,
        labels,
        sample_hidden=torch.randn(2, 4, 17),
        sample_labels=torch.randint(0, 97, (2, 4)),
        options=fastalign.LogpOptions(grad_mode="recompute"),
    )
    assert calls == [2]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(), ValueError, "sample_hidden and sample_labels .* are required when lam > 0"),
        (dict(sample_hidden=torch.randn(2, 4, 17)), ValueError, "sample_labels is required"),
        (dict(lam=-1.0), ValueError, "lam must be a finite number >= 0"),
        (dict(lam=0.0, ref_logps=torch.zeros(6)), TypeError, "unexpected keyword"),
        (
            dict(
                lam=0.1,
                sample_hidden=torch.randn(2, 4, 17),
                sample_labels=torch.randint(0, 97, (2, 3)),
            ),
            ValueError,
            "sample_labels shape",
        ),
    ],
)
def test_typo_errors(kwargs, error, match):
    hidden, _, weight, labels = R.paired_inputs()
    with pytest.raises(error, match=match):
        fastalign.typo_loss_fused(hidden, weight, labels, **kwargs)
