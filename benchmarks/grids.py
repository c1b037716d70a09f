"""Benchmark grids: (case, shape) cells per device. Names are what ``--grid`` takes.

Any grid name with the suffix ``-peaked`` (``gpu-peaked``, ``scale-peaked``, ...) runs the same
cells on peaked inputs: softmax entropy ~2.5 nats per token and labels drawn from the softmax,
like a trained LM (``benchmarks/peaked.py``); without it, logits are ~N(0, 1) (near-flat).
"""

from __future__ import annotations

from dataclasses import replace

from benchmarks.impls import CASES, FROZEN, Shape

PEAKED = "-peaked"
# The CPU reference shape: B=4 pairs (8 rows), T=512, H=1024, V=32000, fp32.
CPU_MAIN = Shape(rows=8, seq_len=512, hidden=1024, vocab=32000)
# The names ``grid`` (and ``python -m benchmarks.run --grid``) take: each also on peaked inputs.
BASE_GRIDS = ("quick", "default", "gpu", "scale")
GRIDS = BASE_GRIDS + tuple(name + PEAKED for name in BASE_GRIDS)


def grid(name: str, device: str) -> list[tuple[str, str, Shape]]:
    """``[(grid_part, case, shape)]`` for a named grid."""
    if name.endswith(PEAKED):
        cells = grid(name[: -len(PEAKED)], device)
        return [(part, case, replace(shape, inputs="peaked")) for part, case, shape in cells]
    if name == "quick":
        shape = Shape(rows=4, seq_len=16, hidden=32, vocab=250)
        return [("main", case, shape) for case in (*CASES, FROZEN)]
    if name == "default" and device == "cpu":
        cells = [("main", case, CPU_MAIN) for case in ("logps", "dpo", "kto")]
        cells += [("sweep-v", "logps", Shape(8, 128, 512, v)) for v in (8000, 16000, 32000, 64000)]
        cells += [
            ("sweep-n", "logps", Shape(n // 128, 128, 512, 32000)) for n in (512, 1024, 2048, 4096)
        ]
        return cells
    if name in ("default", "gpu"):
        bf16 = "bfloat16"
        cells = [("main", case, Shape(8, 512, 1024, 128256, bf16)) for case in CASES]
        cells += [("main", "kto", Shape(32, 512, 1024, 128256, bf16))]
        cells += [("main", "logps", Shape(16, 512, 2304, 256000, bf16))]  # N=8192 (CCE paper)
        cells += [
            ("sweep-v", "dpo", Shape(8, 512, 4096, v, bf16))
            for v in (8192, 32768, 65536, 131072, 262144)
        ]
        cells += [
            ("sweep-n", "dpo", Shape(n // 512, 512, 4096, 128256, bf16))
            for n in (2048, 4096, 8192, 16384)
        ]
        return cells
    if name == "scale":
        # The frozen-lm_head fast path against the recompute path and the peers.
        if device == "cpu":
            return [("frozen", FROZEN, Shape(4, 512, 1024, 32000))]
        bf16 = "bfloat16"
        return [
            ("frozen", FROZEN, Shape(8, 512, 4096, 128256, bf16)),  # Llama-3-8B head
            ("frozen", FROZEN, Shape(16, 512, 2048, 151936, bf16)),  # Qwen3-30B-A3B head
            ("frozen", FROZEN, Shape(16, 512, 5120, 152064, bf16)),  # Qwen2.5-32B head
            ("frozen", "logps", Shape(16, 512, 5120, 152064, bf16)),  # same, trainable head
        ]
    raise ValueError(f"unknown grid {name!r} for {device}; use one of {GRIDS}")
