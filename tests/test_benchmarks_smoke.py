"""The benchmark suite's quick mode runs end to end, so it cannot rot (no timing asserts)."""

from __future__ import annotations

import json
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
    table = path.with_suffix(".md").read_text()
    assert "| dpo |" in table and "**fastalign**" in table and "speed-up vs eager" in table


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
