"""README's Python blocks run as written, on tiny tensors, so the documented API cannot drift
from the code (a renamed argument fails here)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from tests.trainer_helpers import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def block(marker: str) -> str:
    """The README block that contains ``marker`` (exactly one)."""
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"{len(found)} README python blocks contain {marker!r}"
    return found[0]


def tiny_inputs(pairs: int = 2, steps: int = 6, hidden: int = 16, vocab: int = 50) -> dict:
    """The names the usage block reads: DPO's concatenated rows, KTO's rows and its
    mismatched KL rows, and a model whose config carries a Gemma-style softcap."""
    gen = torch.Generator().manual_seed(0)
    rows = 2 * pairs

    def states():
        return torch.randn(rows, steps, hidden, generator=gen)

    labels = torch.randint(0, vocab, (rows, steps), generator=gen)
    labels[:, :2] = -100
    kl_labels = labels.roll(1, dims=0)
    return dict(
        hidden=states().requires_grad_(),
        weight=(torch.randn(vocab, hidden, generator=gen) / 4).requires_grad_(),
        labels=labels,
        ref_hidden=states(),
        desirable=torch.tensor([True, False] * pairs),
        kl_hidden=states(),
        kl_labels=kl_labels,
        kl_ref_hidden=states(),
        model=SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=30.0)),
    )


def test_usage_block_runs():
    names = tiny_inputs()
    exec(compile(block("dpo_loss_fused(hidden"), "README.md", "exec"), names)
    assert names["out"].loss.isfinite()
    # shift=True: positions 1..4 score the 4 completion labels 2..5 of each row
    assert names["logps"].shape == (4,) and names["num_tokens"].tolist() == [4] * 4
    assert names["options"].logit_softcap == 30.0 and names["options"].shift
    assert names["hidden"].grad is not None  # the DPO loss's backward ran


def test_trl_block_runs():
    pytest.importorskip("trl")
    from fastalign.integrations import trl as integration

    names: dict = {}
    try:
        exec(compile(block("patch_trl()"), "README.md", "exec"), names)
        assert integration.is_patched()
    finally:
        integration.unpatch_trl()
    assert names["DPOTrainer"].__module__ == integration.__name__
