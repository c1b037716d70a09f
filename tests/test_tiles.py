"""fastalign.tiles ties the backends' tiles to the memory estimator: the buffers each backend
allocates for a shape are the bytes the estimator counts for it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastalign
from fastalign import LogpOptions, tiles, torch_backend
from fastalign.kernels import logprob
from fastalign.memory import loss as memory_loss

TILES_PY = Path(tiles.__file__)


def test_tiles_module_imports_no_torch():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tiles', {str(TILES_PY)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(sorted(m for m in ('torch', 'triton', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("vocab,num_tokens", [(50_000, 200), (70_001, 37), (1_000, 9)])
def test_torch_backend_tile_is_the_estimated_tile(monkeypatch, vocab, num_tokens):
    """Forward and backward of the torch backend: every logits tile it forms has at most
    the estimator's row count, the largest exactly, and the bytes the estimator counts."""
    hidden_size = 8
    seen = []
    logits_of = torch_backend._logits

    def spy(rows, tokens, transform):
        logits = logits_of(rows, tokens, transform)
        seen.append(logits.shape)
        return logits

    monkeypatch.setattr(torch_backend, "_logits", spy)
    hidden = torch.randn(1, num_tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (1, num_tokens))
    out = fastalign.sequence_logps(hidden, weight, labels, options=LogpOptions(backend="torch"))
    out.logps.sum().backward()
    rows = max(shape[0] for shape in seen)
    assert rows == min(tiles.chunk_rows(vocab), num_tokens)
    assert len(seen) == 2 * -(-num_tokens // tiles.chunk_rows(vocab))  # forward + backward
    estimated = memory_loss.fused_tile_bytes(vocab, hidden_size, 4, num_tokens)
    # fp32 inputs: the estimate is the fp32 logits tile and the chunk's rows (+ fp32 copy)
    assert estimated == rows * vocab * 4 + rows * hidden_size * 8


@pytest.mark.parametrize("vocab,num_tokens", [(200, 40), (1000, 10), (300, 77)])
def test_triton_backend_chunk_is_the_estimated_chunk(monkeypatch, device, vocab, num_tokens):
    """Every vocab chunk the Triton backend forms is an fp32 ``[R, C]`` buffer of the bytes
    the estimator counts for ``R`` rows, with the backend's own chunk budget."""
    seen = []
    vocab_chunks = logprob._vocab_chunks

    def spy(rows, weight, bias, writes_out):
        for chunk in vocab_chunks(rows, weight, bias, writes_out):
            seen.append(chunk.logits)
            yield chunk

    monkeypatch.setattr(logprob, "_vocab_chunks", spy)
    hidden = torch.randn(1, num_tokens, 16, device=device, requires_grad=True)
    weight = torch.randn(vocab, 16, device=device, requires_grad=True)
    labels = torch.randint(0, vocab, (1, num_tokens), device=device)
    out = fastalign.sequence_logps(hidden, weight, labels, options=LogpOptions(backend="triton"))
    out.logps.sum().backward()
    assert seen
    budget = dict(chunk_elements=logprob.CHUNK_ELEMENTS, align=logprob.VOCAB_ALIGN)
    first = seen[0]
    estimated = memory_loss.triton_chunk_bytes(num_tokens, vocab, 4, half_copy=False, **budget)
    assert first.dtype == torch.float32 and first.shape[0] == num_tokens
    assert first.numel() * first.element_size() == estimated
    width = tiles.vocab_chunk_width(num_tokens, vocab, **budget)
    assert all(chunk.shape[1] in (width, vocab % width) for chunk in seen)
    assert sum(chunk.shape[1] for chunk in seen) == 2 * vocab  # forward + backward


def test_store_group_units():
    for device in ("cpu", "cuda"):
        budget = tiles.store_group_budget(device)
        assert budget == tiles.STORE_GROUP_BUDGET_BYTES[device]
        assert tiles.store_group_units(budget + 1, budget) == 0
        assert tiles.store_group_units(budget, budget) == 1
    assert tiles.store_group_budget("mps") == tiles.STORE_GROUP_BUDGET_BYTES["cpu"]
    assert tiles.store_group_units(1 << 20, budget_bytes=3 << 20) == 3
