"""Measure one (case, implementation, shape) cell in this process; print a JSON line.

Run as ``python -m benchmarks.cell CASE IMPL ROWS T H V DTYPE DEVICE [INPUTS]`` in a fresh process
so the memory figure is this cell's alone: a warm-up step (allocates ``.grad`` buffers,
compiles), then one step under ``PeakMemory``.
"""

from __future__ import annotations

import json
import sys

import torch

from benchmarks.impls import IMPLEMENTATIONS, Shape, Unavailable, make_inputs
from fastalign.profiling import PeakMemory


def measure(case: str, impl: str, shape: Shape, device: str) -> dict:
    inputs = make_inputs(shape, device)
    try:
        run = IMPLEMENTATIONS[impl](case, inputs)
        run()
    except Unavailable as err:
        return {"unavailable": str(err)}
    return {"peak_extra_bytes": peak_extra_bytes(run, device)}


def peak_extra_bytes(run, device: str) -> int:
    """Peak memory of one ``run()`` above what was live before it (see ``PeakMemory``)."""
    with PeakMemory(device) as probe:
        run()
    return probe.peak_extra_bytes


def main(argv: list[str]) -> int:
    case, impl, rows, seq_len, hidden, vocab, dtype, device, *inputs = argv
    torch.manual_seed(0)
    shape = Shape(int(rows), int(seq_len), int(hidden), int(vocab), dtype, *inputs)
    print(json.dumps(measure(case, impl, shape, device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
