"""benchmarks/fused_bench.py: its parts' logic through the Triton interpreter, and its CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from benchmarks import fused_bench


def test_overhead_and_sweep_run_and_check_the_fused_kernels(device, monkeypatch, tmp_path):
    """The GPU parts on tiny shapes (interpreted on CPU; timing replaced by one call): every
    configuration computes what the GEMM+fold backend computes, and the table lists each row."""
    monkeypatch.setattr(fused_bench, "DEVICE", device)
    monkeypatch.setattr(fused_bench, "_ms", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(fused_bench, "SWEEP", fused_bench.SWEEP[:1])
    argv = ["--shapes", "24,32,150", "--inputs", "peaked", "--out", str(tmp_path)]
    args = fused_bench.parse_args(argv)
    rows = fused_bench.run_overhead(args) + fused_bench.run_sweep(args)
    store = fused_bench.run_store(args)
    assert [r["part"] for r in rows + store] == ["overhead", "sweep", "store"]
    assert store[0]["max_abs_logp_diff"] < 0.1 and store[0]["grad_weight_rel_diff"] < 2e-2
    assert {"fused_store_ms", "gemm_fold_store_pct_peak"} <= set(store[0])
    for row in rows:
        assert "error" not in row, row
        # On CPU the GEMM+fold backend rounds bf16 logits to bf16 (no fp32-output matmul
        # there); peaked logits reach |z| ~ 20, so 0.1 is that rounding, not the kernels.
        assert row["max_abs_logp_diff"] < 0.1
        assert row["grad_rows_rel_diff"] < 2e-2 and row["grad_weight_rel_diff"] < 2e-2
        assert {"fused_forward_tflops", "gemm_fold_backward_pct_peak"} <= set(row)
    table = fused_bench.markdown(rows + store, args)
    assert "Inputs: peaked" in table and table.count("\n| overhead") == 1
    assert "Store path, one group" in table
    assert table.count("\n| sweep") == 1


def test_cli_plan_bad_shapes_and_no_gpu():
    def run(*argv):
        return subprocess.run(
            [sys.executable, "-m", "benchmarks.fused_bench", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )

    plan = run("--dry-run", "--parts", "sweep", "--shapes", "4096,1024,32000")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["shapes"] == [[4096, 1024, 32000]]
    bad = run("--shapes", "1,2")
    assert bad.returncode == 2 and "ROWS,H,V" in bad.stderr
    if not torch.cuda.is_available():
        no_gpu = run("--parts", "overhead")
        assert no_gpu.returncode == 2 and no_gpu.stderr.startswith("error:")
