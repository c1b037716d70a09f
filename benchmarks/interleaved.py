"""Interleaved timing of a few implementations on one cell: ratios within one run.

On a shared machine the load drifts over minutes, so implementations are timed in
round-robin (eager, fastalign, ... , eager, fastalign, ...) and each ratio to eager is taken
per round, then the median over rounds is reported, with the load average around the run.
Peak extra memory comes from a fresh process per implementation (``benchmarks.cell``).

    python -m benchmarks.interleaved --cases dpo kto --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.grids import CPU_MAIN
from benchmarks.impls import IMPLEMENTATIONS, make_inputs
from benchmarks.run import RESULTS, device_name, versions

IMPLS = ("eager", "fastalign", "fastalign-recompute")


def _memory(case: str, impl: str, device: str) -> int:
    s = CPU_MAIN
    args = [case, impl, s.rows, s.seq_len, s.hidden, s.vocab, s.dtype, device]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # see benchmarks/test_bench.py
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.cell", *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def time_case(case: str, impls: tuple[str, ...], rounds: int, device: str) -> dict:
    """``{impl: [seconds per round]}`` with one warm-up step each, then round-robin."""
    runs = {}
    for impl in impls:
        runs[impl] = IMPLEMENTATIONS[impl](case, make_inputs(CPU_MAIN, device))
        runs[impl]()  # warm-up: allocates .grad, first-touch pages
    times = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            x = runs[impl]
            gc.collect()
            start = time.perf_counter()
            x()
            times[impl].append(time.perf_counter() - start)
    return times


def markdown(record: dict) -> str:
    """The results as a table: median time over rounds, median per-round ratio to eager,
    peak extra memory and its ratio to eager, with the load average around each case."""
    lines = [
        f"## {record['device']}: store path vs recompute vs eager, {record['shape']}",
        "",
        f"{record['date']}, torch {record['versions']['torch']}, {record['threads']} threads. "
        "Forward+backward of the whole loss; implementations timed in round-robin, the ratio "
        "to eager taken per round (median over rounds); peak extra memory: resident-set "
        "high-water mark of one warmed-up step in a fresh process (lm_head gradient included).",
        "",
        "| case | impl | median time (s) | rounds (s) | time vs eager | peak extra (MiB) "
        "| memory vs eager | load avg before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, r in record["cases"].items():
        load = f"{r['load_average_before'][0]:.1f} → {r['load_average_after'][0]:.1f}"
        for impl, times in r["seconds"].items():
            memory = r["peak_extra_bytes"].get(impl)
            lines.append(
                f"| {case} | {impl} | {statistics.median(times):.1f} | "
                f"{', '.join(f'{t:.1f}' for t in times)} | "
                f"{r['median_ratio_to_eager'][impl]:.3f}× | "
                f"{'' if memory is None else f'{memory / 2**20:.0f}'} | "
                f"{r['memory_ratio_to_eager'].get(impl, float('nan')):.3f}× | {load} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="+", default=["dpo", "kto"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", type=Path, help="only write the markdown of a results JSON")
    args = parser.parse_args(argv)
    if args.report:
        args.report.with_suffix(".md").write_text(markdown(json.loads(args.report.read_text())))
        return 0
    device = "cpu"
    record = {
        "device": device_name(device),
        "shape": CPU_MAIN.label(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "cases": {},
    }
    for case in args.cases:
        load_before = os.getloadavg()
        times = time_case(case, tuple(args.impls), args.rounds, device)
        ratios = {
            impl: statistics.median(t / e for t, e in zip(times[impl], times["eager"]))
            for impl in args.impls
        }
        memory = {} if args.no_memory else {i: _memory(case, i, device) for i in args.impls}
        record["cases"][case] = {
            "seconds": times,
            "median_ratio_to_eager": ratios,
            "peak_extra_bytes": memory,
            "memory_ratio_to_eager": {
                i: memory[i] / memory["eager"] for i in memory if memory.get("eager")
            },
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        }
        print(json.dumps({case: record["cases"][case]}, indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = record["device"].lower().replace(" ", "-").replace("_", "-")
    path = args.out / f"{slug}_store-path_{record['date'][:10]}.json"
    path.write_text(json.dumps(record, indent=1))
    path.with_suffix(".md").write_text(markdown(record))
    print(f"wrote {path} and its .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
