"""IPO vs the float64 formula (length-normalised and sum forms), on both backends."""

from __future__ import annotations

import pytest
import torch

import fastalign
from tests import loss_reference as R


@pytest.mark.parametrize("backend", R.BACKENDS)
@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize("reference", ["stream", "precomputed"])
def test_ipo_matches_formula(backend, length_normalize, reference):
    hidden, ref_hidden, weight, labels = R.paired_inputs()
    s, n = R.logps64(hidden, weight, labels)
    ref_s, _ = R.logps64(ref_hidden, weight.detach(), labels)
    kwargs = dict(ref_hidden=ref_hidden) if reference == "stream" else dict(ref_logps=ref_s.float())
    out = fastalign.ipo_loss_fused(
        hidden,
        weight,
        labels,
        beta=0.5,
        length_normalize=length_normalize,
        backend=backend,
        **kwargs,
    )
    naive = R.ipo(s, ref_s.detach(), n, 0.5, length_normalize)
    R.assert_loss_and_grads(out.loss, naive, [hidden, weight])
    assert torch.equal(out.chosen_num_tokens, n[:3])


def test_ipo_length_normalisation_uses_token_counts():
    """TRL's convention: per-token means; an unscored row counts as length 1, not NaN."""
    hidden, ref_hidden, weight, labels = R.paired_inputs(pairs=1)
    labels[1] = -100
    out = fastalign.ipo_loss_fused(hidden, weight, labels, ref_hidden=ref_hidden)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(beta=0), ValueError, "beta"),
        (dict(length_normalize=1), TypeError, "length_normalize must be a bool"),
        (dict(), ValueError, "give exactly one reference"),
    ],
)
def test_ipo_errors(kwargs, error, match):
    hidden, _, weight, labels = R.paired_inputs()
    with pytest.raises(error, match=match):
        fastalign.ipo_loss_fused(hidden, weight, labels, **kwargs)
