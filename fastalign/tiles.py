"""Tile and budget rules shared by the backends and the memory estimator (no torch import)."""

from __future__ import annotations

# The store path (fastalign.store) walks the differentiable rows in groups of whole gradient
# units whose fp32 logits [rows, V] take at most this many bytes (per device type; settable
# per call with ``store_budget_bytes=``). A unit larger than the budget sends the whole call
# to the recompute path. CPU: 128 MiB keeps the target shape (one DPO pair of 2×448 tokens at
# V=32000 is 115 MB) under 0.2× eager's memory; CUDA: 1 GiB holds a pair of 2×1024 tokens
# at V=128256.
STORE_GROUP_BUDGET_BYTES = {"cpu": 1 << 27, "cuda": 1 << 30}


def store_group_budget(device_type: str) -> int:
    """The default store-path group budget in bytes for a device type (``"cpu"`` for any
    device without its own entry)."""
    return STORE_GROUP_BUDGET_BYTES.get(device_type, STORE_GROUP_BUDGET_BYTES["cpu"])
