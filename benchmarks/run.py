"""One command for the benchmarks: pytest-benchmark over a grid, then the results file.

    python -m benchmarks.run                 # default grid on this machine's device
    python -m benchmarks.run --quick         # tiny shapes, < 1 min (the smoke test)
    python -m benchmarks.run --grid gpu      # the GPU grid (on a CUDA machine)
    python -m benchmarks.run --grid scale    # frozen lm_head: fast path vs recompute, peers

Writes ``benchmarks/results/<device>_<date>.json`` (or ``--out DIR``), then the markdown
table and PNG plots via ``benchmarks.report``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.grids import GRIDS
from benchmarks.impls import IMPLEMENTATIONS

RESULTS = Path(__file__).parent / "results"
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' datasheets, for the % of peak.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "trl", "liger_kernel", "cut_cross_entropy", "fastalign"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    return out


def run_cells(grid: str, device: str, out: Path, k: str | None) -> tuple[list[dict], list[dict]]:
    """pytest-benchmark over ``grid``'s cells: ``(rows, failed)``, one row per (cell,
    implementation) with its median seconds, and one entry per cell that failed (or per
    pytest process that ended without results) with its error.

    On CUDA each implementation runs in its own process: an error that poisons the CUDA
    context (an illegal address in a peer's kernel) then costs that implementation's cells,
    not the rest of the grid's."""
    impls = list(IMPLEMENTATIONS) if device == "cuda" else [None]
    rows, failed = [], []
    for impl in impls:
        got, lost = _pytest_cells(grid, device, out, k, impl)
        rows += got
        failed += lost
    return rows, failed


def _pytest_cells(
    grid: str, device: str, out: Path, k: str | None, impl: str | None
) -> tuple[list[dict], list[dict]]:
    """One pytest-benchmark process (``impl``: only that implementation; None: all)."""
    raw, failures = out / "pytest-benchmark-raw.json", out / "pytest-benchmark-failures.jsonl"
    for path in (raw, failures):
        path.unlink(missing_ok=True)
    env = dict(os.environ, FASTALIGN_BENCH_GRID=grid, FASTALIGN_BENCH_DEVICE=device)
    env["FASTALIGN_BENCH_FAILURES"] = str(failures)
    if impl is not None:
        env["FASTALIGN_BENCH_IMPL"] = impl
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).parent / "test_bench.py")]
    cmd += ["-p", "no:cacheprovider", "-q", "-rs", f"--benchmark-json={raw}"]
    cmd += ["--benchmark-columns=min,median,rounds"] + (["-k", k] if k else [])
    status = subprocess.run(cmd, env=env).returncode
    failed = [json.loads(line) for line in failures.read_text().splitlines()] if (
        failures.exists()
    ) else []  # fmt: skip
    failures.unlink(missing_ok=True)
    if status not in (0, 1, 5) or not raw.exists():
        # pytest itself failed (interrupted, a crash, bad arguments): nothing to read
        failed.append(dict(impl=impl or "all", error=f"pytest exited with status {status}"))
        return [], failed
    data = json.loads(raw.read_text())
    raw.unlink()
    rows = [
        {
            **bench["extra_info"],
            "seconds": bench["stats"]["median"],
            "rounds": bench["stats"]["rounds"],
        }
        for bench in data["benchmarks"]
    ]
    return rows, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke mode)")
    parser.add_argument("--grid", default=None, choices=GRIDS, help="default: default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("-k", default=None, help="pytest -k filter on cells")
    args = parser.parse_args(argv)
    grid = "quick" if args.quick else (args.grid or "default")
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows, failed = run_cells(grid, args.device, args.out, args.k)
    if not rows and not failed:
        print("error: no cell ran (check -k)", file=sys.stderr)
        return 2
    name = device_name(args.device)
    record = {
        "device": name,
        "device_kind": args.device,
        "grid": grid,
        "date": datetime.date.today().isoformat(),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "versions": versions(),
        "bf16_peak_tflops": next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None),
        "rows": rows,
        "failed": failed,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = args.out / f"{slug}_{grid}_{record['date']}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    from benchmarks import report

    report.main([str(path)])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
