"""fastalign.eager (the demo's and benchmarks' eager baseline) equals the float64 formulas."""

from __future__ import annotations

import pytest
import torch

from fastalign import eager
from tests import loss_reference as ref64
from tests.loss_reference import assert_loss_and_grads, logps64, paired_inputs

BETA = 0.3


def test_logps_match_float64():
    hidden, _, weight, labels = paired_inputs()
    got = eager.eager_logps(hidden, weight, labels)
    want, num_tokens = logps64(hidden, weight, labels)
    assert got.logps.dtype == torch.float32
    assert torch.equal(got.num_tokens, num_tokens)
    assert_loss_and_grads(got.logps.sum(), want.sum(), [hidden, weight])


@pytest.mark.parametrize("loss", ["dpo", "ipo", "kto", "typo"])
def test_losses_match_float64(loss):
    hidden, ref_hidden, weight, labels = paired_inputs()
    kl_hidden = torch.randn_like(ref_hidden)
    got, n = eager.eager_logps(hidden, weight, labels)
    want, n64 = logps64(hidden, weight, labels)
    with torch.no_grad():
        ref = eager.eager_logps(ref_hidden, weight, labels).logps
        ref64_ = logps64(ref_hidden, weight, labels)[0]
        kl = eager.eager_logps(kl_hidden, weight, labels).logps
        kl64 = logps64(kl_hidden, weight, labels)[0]
    desirable = torch.arange(got.shape[0]) % 3 == 0
    pairs = {
        "dpo": (eager.dpo_loss(got, ref, BETA), ref64.dpo(want, ref64_, BETA)),
        "ipo": (eager.ipo_loss(got, ref, n, BETA), ref64.ipo(want, ref64_, n64, BETA)),
        "kto": (
            eager.kto_loss(got, ref, kl, ref.flip(0), desirable, BETA),
            ref64.kto(want, ref64_, desirable, kl64, ref64_.flip(0), BETA)[0],
        ),
        "typo": (eager.typo_loss(got, kl, lam=0.2), ref64.typo(want, kl64, 0.2)),
    }
    assert_loss_and_grads(*pairs[loss], [hidden, weight])
