"""Tile-size rules of the loss backends, and which gradient path a fused loss takes, in one
torch-free module.

The chunked torch backend, the Triton backend, the fused losses and the memory estimator
(``fastalign.memory``) all import these, so an estimate cannot drift from the buffers the
backends allocate or the path the losses take.
"""

from __future__ import annotations

import os

# Torch backend: one [chunk, V] fp32 logits tile holds about this many elements (16 MiB).
# Large enough that the [chunk, H] x [H, V] matmul runs near peak on a CPU, small enough to
# stay a rounding error next to the [N, V] logits of the eager path.
TORCH_CHUNK_ELEMENTS = 1 << 22
# Fewest token rows in a torch-backend tile, whatever the vocabulary.
TORCH_MIN_CHUNK_ROWS = 8

# Triton backend: elements of one [rows, vocab chunk] fp32 logits buffer (256 MiB on CUDA),
# whose width is a multiple of TRITON_VOCAB_ALIGN columns (GEMM-friendly on the GPU).
TRITON_CHUNK_ELEMENTS = 1 << 26
TRITON_VOCAB_ALIGN = 256
# Under the Triton interpreter (tests): a small budget, so that the tests' small
# vocabularies still span several chunks.
TRITON_INTERPRET_CHUNK_ELEMENTS = 1 << 12
TRITON_INTERPRET_VOCAB_ALIGN = 32

# The store path (fastalign.store) walks the differentiable rows in groups of whole gradient
# units whose fp32 logits [rows, V] take at most this many bytes (per device type; settable
# per call with ``store_budget_bytes=``). A unit larger than the budget sends the whole call
# to the recompute path. CPU: 128 MiB keeps the target shape (one DPO pair of 2×448 tokens at
# V=32000 is 115 MB) under 0.2× eager's memory; CUDA: 1 GiB holds a pair of 2×1024 tokens
# at V=128256.
STORE_GROUP_BUDGET_BYTES = {"cpu": 1 << 27, "cuda": 1 << 30}

# A fused loss's gradient path (``grad_mode=``): "auto" (the default), "store" or "recompute".
GRAD_MODES = ("auto", "store", "recompute")

# The CUDA kernels of the Triton backend: "gemm_fold" (cuBLAS GEMM + Triton fold, the default)
# or "fused" (GEMMs with the logsumexp / dz in the epilogue, kernels/fused_logprob.py; for
# 16-bit weights and a trainable lm_head). Chosen by FASTALIGN_CUDA_KERNEL.
CUDA_KERNELS = ("gemm_fold", "fused")
# The fused kernels' fp32 logsumexp partials per forward launch ([tiles, rows], two of them).
FUSED_PARTIAL_ELEMENTS = 1 << 22


def cuda_kernel() -> str:
    """The CUDA kernel choice FASTALIGN_CUDA_KERNEL makes (``"gemm_fold"`` when unset)."""
    return os.environ.get("FASTALIGN_CUDA_KERNEL", "gemm_fold")


def chunk_rows(vocab_size: int, chunk_elements: int = TORCH_CHUNK_ELEMENTS) -> int:
    """Tokens per torch-backend chunk, so that one ``[chunk, V]`` fp32 tile holds
    ~``chunk_elements``.

    Example:
        >>> chunk_rows(32000)
        131
    """
    return max(TORCH_MIN_CHUNK_ROWS, chunk_elements // max(vocab_size, 1))


def vocab_chunk_width(
    num_rows: int,
    vocab_size: int,
    chunk_elements: int = TRITON_CHUNK_ELEMENTS,
    align: int = TRITON_VOCAB_ALIGN,
) -> int:
    """Vocab columns per Triton-backend chunk: an fp32 ``[num_rows, width]`` buffer of
    ~``chunk_elements``, ``width`` a multiple of ``align`` (at least ``align``, at most V).

    Example:
        >>> vocab_chunk_width(4096, 128256)
        16384
    """
    width = chunk_elements // max(num_rows, 1) // align * align
    return min(vocab_size, max(align, width))


def store_group_budget(device_type: str) -> int:
    """The default store-path group budget in bytes for a device type (``"cpu"`` for any
    device without its own entry)."""
    return STORE_GROUP_BUDGET_BYTES.get(device_type, STORE_GROUP_BUDGET_BYTES["cpu"])


def store_group_units(unit_logit_bytes: int, budget_bytes: int) -> int:
    """Whole gradient units whose logits fit in one store-path group of ``budget_bytes`` (0: not
    even one fits, so the loss falls back to the recompute path).

    Example:
        >>> store_group_units(100 << 20, store_group_budget("cuda"))
        10
    """
    return budget_bytes // max(unit_logit_bytes, 1)


def store_wanted(grad_mode: str, head_trains: bool) -> bool:
    """Whether a fused loss that needs gradients tries the store path: asked for (``"store"``),
    or ``"auto"`` with a trainable lm_head (a frozen head has a cheaper path still: E_t in
    the forward, no GEMM in the backward). It takes it when one gradient unit's logits fit
    the group budget (:func:`store_group_units` > 0), else it recomputes.

    Example:
        >>> store_wanted("auto", head_trains=True), store_wanted("auto", head_trains=False)
        (True, False)
    """
    return grad_mode == "store" or (grad_mode == "auto" and head_trains)
