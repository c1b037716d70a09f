"""The benchmark suite's quick mode runs end to end, so it cannot rot (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_json_table_and_plots(tmp_path):
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("matplotlib")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "-k",
            "logps or dpo",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = tmp_path.glob("*_quick_*.json")
    record = json.loads(path.read_text())
    impls = {(r["case"], r["impl"]) for r in record["rows"]}
    assert {
        ("dpo", "eager"),
        ("dpo", "fastalign"),
        ("dpo", "liger"),
        ("logps", "fastalign"),
    } <= impls
    assert all(r["seconds"] > 0 and r["peak_extra_bytes"] >= 0 for r in record["rows"])
    assert record["failed"] == []
    table = path.with_suffix(".md").read_text()
    assert "| dpo |" in table and "**fastalign**" in table and "speed-up vs eager" in table
    assert "Failed cells" not in table


# A pytest plugin for the benchmark's own pytest process (through PYTEST_ADDOPTS): Liger's
# cells raise, as a peer that breaks on some machine would.
FAILING_PEER = """
from benchmarks import impls

def planted(case, inputs):
    raise RuntimeError("planted failure")

impls.IMPLEMENTATIONS["liger"] = planted
"""


def test_a_failing_cell_is_reported_and_the_grid_kept(tmp_path):
    """One implementation failing loses its cells only: the others are measured and written,
    the failures are listed in the JSON and under the table, and the exit status is 1."""
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("matplotlib")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "failing_peer.py").write_text(FAILING_PEER)
    out = tmp_path / "out"
    env = dict(os.environ, PYTEST_ADDOPTS="-p failing_peer")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(plugins), str(ROOT), env.get("PYTHONPATH")])
    )
    argv = ["-m", "benchmarks.run", "--quick", "--device", "cpu", "--out", str(out), "-k", "dpo"]
    result = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = out.glob("*_quick_*.json")
    record = json.loads(path.read_text())
    assert {("dpo", "eager"), ("dpo", "fastalign")} <= {
        (r["case"], r["impl"]) for r in record["rows"]
    }
    assert not any(r["impl"] == "liger" for r in record["rows"])
    assert record["failed"] and {f["impl"] for f in record["failed"]} == {"liger"}
    assert all(f["error"] == "RuntimeError: planted failure" for f in record["failed"])
    table = path.with_suffix(".md").read_text()
    assert "Failed cells" in table and "planted failure" in table


def test_cuda_runs_each_implementation_in_its_own_process(monkeypatch, tmp_path):
    """On CUDA, one pytest process per implementation (a sticky CUDA error stays in its
    own); on the CPU one process for all. The processes themselves are stubbed."""
    from benchmarks import run
    from benchmarks.impls import IMPLEMENTATIONS

    calls = []

    def fake(grid, device, out, k, impl):
        calls.append(impl)
        return [dict(impl=impl)], ([dict(impl=impl, error="x")] if impl == "quack" else [])

    monkeypatch.setattr(run, "_pytest_cells", fake)
    rows, failed = run.run_cells("gpu", "cuda", tmp_path, None)
    assert calls == list(IMPLEMENTATIONS) and [r["impl"] for r in rows] == calls
    assert failed == [dict(impl="quack", error="x")]
    calls.clear()
    run.run_cells("quick", "cpu", tmp_path, None)
    assert calls == [None]


def test_unknown_grid_is_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--grid", "huge"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--grid" in result.stderr and "scale" in result.stderr  # the choices are listed
