"""pytest-benchmark suite: every implementation on every cell of the chosen grid.

Not part of the test run (testpaths = tests). Use ``python -m benchmarks.run``, which sets
``FASTALIGN_BENCH_GRID``/``FASTALIGN_BENCH_DEVICE`` and collects the JSON. Time comes from
pytest-benchmark (forward+backward per round); peak extra memory from a fresh subprocess per
cell (``benchmarks.cell``). Missing peers are skipped with the reason; a cell that fails is
appended to ``FASTALIGN_BENCH_FAILURES`` (JSON lines) before the failure propagates, so that
``benchmarks.run`` reports it instead of losing the grid. ``FASTALIGN_BENCH_IMPL`` limits the
run to one implementation (``benchmarks.run`` runs each in its own process on CUDA).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from benchmarks.cell import peak_extra_bytes
from benchmarks.grids import grid
from benchmarks.impls import IMPLEMENTATIONS, Unavailable, make_inputs

GRID = os.environ.get("FASTALIGN_BENCH_GRID", "quick")
DEVICE = os.environ.get("FASTALIGN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
CELLS = grid(GRID, DEVICE)
IMPLS = (
    [os.environ["FASTALIGN_BENCH_IMPL"]]
    if "FASTALIGN_BENCH_IMPL" in os.environ
    else list(IMPLEMENTATIONS)
)
FAILURES = os.environ.get("FASTALIGN_BENCH_FAILURES")
# glibc keeps freed heap memory resident and reuses it, which would hide a step's peak
# behind the warm-up's leftovers; with every allocation over 64 KiB mmapped, freed memory
# leaves the resident set at once and the RSS high-water mark tracks live memory.
CELL_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


def _memory(case, impl, shape) -> dict:
    args = [case, impl, shape.rows, shape.seq_len, shape.hidden, shape.vocab, shape.dtype, DEVICE]
    args.append(shape.inputs)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.cell", *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "part,case,shape", CELLS, ids=[f"{p}-{c}-{s.label()}" for p, c, s in CELLS]
)
def test_bench(benchmark, part, case, shape, impl):
    try:
        _bench(benchmark, part, case, shape, impl)
    except Exception as err:  # a skip is no Exception: only failures are recorded
        if FAILURES:
            row = dict(part=part, case=case, impl=impl, device=DEVICE, shape=asdict(shape))
            row["error"] = f"{type(err).__name__}: {err}"[:500]
            with open(FAILURES, "a") as f:
                f.write(json.dumps(row) + "\n")
        raise


def _bench(benchmark, part, case, shape, impl):
    inputs = make_inputs(shape, DEVICE)
    try:
        run = IMPLEMENTATIONS[impl](case, inputs)
    except Unavailable as err:
        pytest.skip(f"{impl}: {err}")
    if DEVICE == "cuda" and impl == "torch.compile" and part.startswith("sweep"):
        pytest.skip("torch.compile: main cells only on CUDA (a recompile per sweep shape)")
    if DEVICE == "cuda":
        # The allocator's peak is per device, not per process: measure here, after a
        # warm-up step, instead of paying a fresh CUDA process per cell.
        run()
        gc.collect()  # earlier cells' tensors must not be freed inside the measured step
        memory = {"peak_extra_bytes": peak_extra_bytes(run, DEVICE)}
    else:
        memory = _memory(case, impl, shape)  # the RSS high-water mark needs a fresh process
    if "unavailable" in memory:
        pytest.skip(f"{impl}: {memory['unavailable']}")

    def step():
        run()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    heavy = shape.tokens * shape.hidden * shape.vocab > 2e9 and DEVICE == "cpu"
    benchmark.group = f"{part} {case} {shape.label()}"
    benchmark.extra_info.update(
        part=part,
        case=case,
        impl=impl,
        device=DEVICE,
        shape=asdict(shape),
        peak_extra_bytes=memory["peak_extra_bytes"],
    )
    benchmark.pedantic(step, rounds=1 if heavy else 3, warmup_rounds=0 if heavy else 1)
