"""The benchmarks' peaked inputs (benchmarks/peaked.py): a trained LM's entropy, calibrated."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.grids import grid
from benchmarks.impls import Shape, make_inputs
from benchmarks.peaked import TARGET_ENTROPY, softmax_entropy

SHAPE = Shape(rows=4, seq_len=40, hidden=48, vocab=3001)


def _scored(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [M, V] fp32, labels [M])`` of the policy's scored tokens."""
    mask = inputs["labels"] != -100
    logits = inputs["hidden"].detach()[mask].float() @ inputs["weight"].detach().float().T
    return logits, inputs["labels"][mask]


def test_peaked_inputs_have_the_entropy_of_a_trained_lm():
    logits, labels = _scored(make_inputs(Shape(**{**vars(SHAPE), "inputs": "peaked"}), "cpu"))
    entropy = softmax_entropy(logits)
    assert abs(float(entropy.mean()) - TARGET_ENTROPY) < 0.25
    # Spread like a trained LM's (some tokens near-certain, some open), but far from flat.
    assert 1.5 < float(entropy.median()) < 3.5
    assert float(entropy.max()) < math.log(SHAPE.vocab) - 2.0
    # Labels drawn from the softmax: the mean surprisal matches the entropy (calibrated).
    surprisal = -torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    assert abs(float(surprisal.mean()) - float(entropy.mean())) < 0.5


def test_uniform_inputs_are_near_flat_and_untouched():
    uniform = make_inputs(SHAPE, "cpu")
    logits, _ = _scored(uniform)
    assert float(softmax_entropy(logits).mean()) > math.log(SHAPE.vocab) - 1.0
    peaked = make_inputs(Shape(**{**vars(SHAPE), "inputs": "peaked"}), "cpu")
    prompt = uniform["labels"] == -100
    assert torch.equal(peaked["labels"] == -100, prompt)  # the prompt mask is kept
    assert peaked["hidden"].requires_grad and not peaked["ref_hidden"].requires_grad
    assert peaked["hidden"].dtype == uniform["hidden"].dtype


@pytest.mark.parametrize("name", ["quick", "scale"])
def test_peaked_grids_mirror_their_base(name):
    base, peaked = grid(name, "cpu"), grid(f"{name}-peaked", "cpu")
    assert [(p, c) for p, c, _ in base] == [(p, c) for p, c, _ in peaked]
    assert all(s.inputs == "peaked" and "peaked" in s.label() for _, _, s in peaked)
    assert all(s.inputs == "uniform" for _, _, s in base)
    with pytest.raises(ValueError, match="peaked"):
        grid("nope-peaked", "cpu")
