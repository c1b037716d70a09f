"""GPU measurements of the fused-epilogue kernels (kernels/fused_gemm.py), one command.

    python -m benchmarks.fused_bench --out DIR                # all parts below
    python -m benchmarks.fused_bench --parts sweep --inputs peaked
    python -m benchmarks.fused_bench --dry-run                # print the plan, touch no GPU

Parts: ``overhead`` times the fused forward and backward against a plain cuBLAS GEMM of the
same shape (bf16 and fp32 output: what the epilogue costs over the bare matrix product) and
against the GEMM+fold backend; ``sweep`` does the same per tile configuration, after checking
each against the GEMM+fold backend's values; ``profile`` is a torch.profiler per-kernel
breakdown of one DPO step (policy + reference; the store path) under each backend; ``store``
times the store path's group step alone (kept forward, then ``dz`` and the three gradients)
with the fused kernels against GEMM+fold, at ``STORE_ROWS`` rows (a 1 GiB fp32 group at
V=128256, CUDA's default store budget). Writes
``fused_bench.json`` and ``fused_bench.md`` to ``--out``.

Predicted before any run (H100, N=8192 stacked rows, H=1024, V=128256, bf16): the GEMM+fold
forward moves 8·N·V ≈ 8.4 GB of fp32 logits (~2.8 ms at 3 TB/s) beside a ~2.2 ms GEMM; the
fused forward should land near the GEMM's time plus the exp2 epilogue (~10-20 %).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

# Tile configurations the sweep tries: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages,
# epilogue in two halves); the first is the default (fused_logprob.GPU_CONFIG).
SWEEP = [
    (128, 256, 64, 8, 8, 3, True),
    (128, 256, 64, 8, 8, 3, False),
    (128, 256, 64, 8, 8, 4, True),
    (128, 256, 64, 16, 8, 3, True),
    (128, 128, 64, 8, 8, 4, True),
    (128, 128, 64, 8, 8, 4, False),
    (128, 128, 128, 8, 8, 3, True),
    (256, 128, 64, 8, 8, 3, True),
    (64, 256, 64, 8, 4, 4, True),
]
# (stacked rows, hidden, vocab): DPO policy+reference at N=4096 (the DPO target shape), a wide H.
SHAPES = [(8192, 1024, 128256), (8192, 4096, 128256)]
PARTS = ("overhead", "sweep", "profile", "store")
STORE_ROWS = 2048
BF16_PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16 datasheet figure
DEVICE = "cuda"  # tests run the parts' logic on CPU through the Triton interpreter


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fused"))
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--inputs", choices=("uniform", "peaked"), default="uniform")
    parser.add_argument("--shapes", nargs="+", default=[",".join(map(str, s)) for s in SHAPES])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    except ValueError:
        parser.error("--shapes takes ROWS,H,V triples, e.g. 8192,1024,128256")
    if any(len(s) != 3 or min(s) <= 0 for s in args.shapes):
        parser.error("--shapes takes positive ROWS,H,V triples")
    return args


def make_problem(rows: int, hidden: int, vocab: int, inputs: str, seed: int = 0) -> dict:
    """Stacked rows, lm_head and targets on the GPU (bf16), uniform or peaked."""
    from benchmarks.peaked import sample_labels, scale_for_entropy
    from fastalign._types import TokenBatch

    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    h = torch.randn(rows, hidden, device=DEVICE, generator=gen)
    weight = torch.randn(vocab, hidden, device=DEVICE, generator=gen) / math.sqrt(hidden)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE, generator=gen)
    if inputs == "peaked":
        h = h * scale_for_entropy(h, weight)
        targets = sample_labels(h, weight, gen)
    h, weight = h.bfloat16(), weight.bfloat16()
    index = torch.arange(rows, device=DEVICE)
    tokens = TokenBatch(h, (index,), index * hidden, targets, weight, None)
    grad = torch.randn(rows, device=DEVICE, generator=gen)
    return dict(rows=h, weight=weight, tokens=tokens, grad=grad)


def _ms(fn) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))


def _with_kernel(kernel: str, fn):
    """Run ``fn`` with the Triton backend's CUDA kernels set to ``kernel``."""
    from fastalign.kernels import logprob

    previous, logprob.CUDA_KERNEL = logprob.CUDA_KERNEL, kernel
    try:
        return fn()
    finally:
        logprob.CUDA_KERNEL = previous


def _run_backend(kernel: str, problem: dict) -> dict:
    """One backend's forward and backward on ``problem``: outputs and median milliseconds."""
    from fastalign._types import ForwardRequest, LogitTransform
    from fastalign.kernels import logprob

    tokens, grad, transform = problem["tokens"], problem["grad"], LogitTransform()

    def forward():
        request = ForwardRequest(tokens)
        return _with_kernel(kernel, lambda: logprob.forward([request], transform)[0])

    logp, lse = forward()[:2]  # (logp, lse, expected, log_sum_sq)

    def backward():
        return _with_kernel(
            kernel, lambda: logprob.backward(tokens, transform, lse, grad, True, True, False)
        )

    return dict(logp=logp, grads=backward()[:2], forward_ms=_ms(forward), backward_ms=_ms(backward))


def time_backends(problem: dict) -> dict:
    """Milliseconds of the fused and GEMM+fold forward and backward, and the max differences
    between their outputs (the check that a configuration computes the right thing)."""
    fused, base = _run_backend("fused", problem), _run_backend("gemm_fold", problem)
    out = {}
    for name, run in (("fused", fused), ("gemm_fold", base)):
        out[f"{name}_forward_ms"], out[f"{name}_backward_ms"] = (
            run["forward_ms"],
            run["backward_ms"],
        )
    out["max_abs_logp_diff"] = float((fused["logp"] - base["logp"]).abs().max())
    for name, a, b in zip(("grad_rows", "grad_weight"), fused["grads"], base["grads"]):
        out[f"{name}_rel_diff"] = float((a.float() - b.float()).abs().max() / b.float().abs().max())
    return out


def time_gemms(problem: dict) -> dict:
    """The bare matrix product of the same shape through cuBLAS: bf16 and fp32 outputs."""
    from fastalign.kernels.logprob import _mm_fp32

    rows, weight = problem["rows"], problem["weight"]
    return {
        "cublas_bf16_ms": _ms(lambda: rows @ weight.T),
        "cublas_fp32out_ms": _ms(lambda: _mm_fp32(rows, weight.T)),
    }


def annotate(row: dict, rows: int, hidden: int, vocab: int) -> dict:
    """TFLOP/s and % of the bf16 peak on the FLOPs each timed thing executes."""
    gemm = 2.0 * rows * hidden * vocab
    flops = {"forward": gemm, "backward": 3 * gemm, "cublas": gemm, "store": 3 * gemm}
    for key in [k for k in row if k.endswith("_ms")]:
        kind = next(k for k in flops if k in key)
        tflops = flops[kind] / (row[key] * 1e-3) / 1e12
        row[key.replace("_ms", "_tflops")] = round(tflops, 1)
        row[key.replace("_ms", "_pct_peak")] = round(100 * tflops / BF16_PEAK_TFLOPS, 1)
    return row


def run_overhead(args) -> list[dict]:
    out = []
    for rows, hidden, vocab in args.shapes:
        problem = make_problem(rows, hidden, vocab, args.inputs)
        row = dict(part="overhead", rows=rows, hidden=hidden, vocab=vocab, inputs=args.inputs)
        row.update(time_gemms(problem))
        row.update(time_backends(problem))
        out.append(annotate(row, rows, hidden, vocab))
        print(json.dumps(out[-1]), flush=True)
    return out


def time_store(problem: dict) -> dict:
    """Milliseconds of the store path's group step (``group_logits`` + ``group_grads``), fused
    and GEMM+fold, and the max differences between their logp and gradients."""
    from fastalign._types import BackendGrads, LogitTransform
    from fastalign.kernels import logprob

    rows, weight, tokens, grad = (problem[k] for k in ("rows", "weight", "tokens", "grad"))
    transform = LogitTransform()

    def step():
        group = logprob.group_logits(rows, tokens, transform)
        acc = BackendGrads(rows, torch.zeros(weight.shape, device=weight.device), None)
        grad_rows = logprob.group_grads(group, rows, tokens, transform, grad, acc)
        return group.logp, grad_rows, acc.weight

    out, results = {}, {}
    for kernel in ("fused", "gemm_fold"):
        results[kernel] = _with_kernel(kernel, step)
        out[f"{kernel}_store_ms"] = _ms(lambda kernel=kernel: _with_kernel(kernel, step))
    (logp, *grads), (base_logp, *base_grads) = results["fused"], results["gemm_fold"]
    out["max_abs_logp_diff"] = float((logp - base_logp).abs().max())
    for name, a, b in zip(("grad_rows", "grad_weight"), grads, base_grads):
        out[f"{name}_rel_diff"] = float((a.float() - b.float()).abs().max() / b.float().abs().max())
    return out


def run_store(args) -> list[dict]:
    out = []
    for rows, hidden, vocab in args.shapes:
        rows = min(rows, STORE_ROWS)
        problem = make_problem(rows, hidden, vocab, args.inputs)
        row = dict(part="store", rows=rows, hidden=hidden, vocab=vocab, inputs=args.inputs)
        row.update(time_store(problem))
        out.append(annotate(row, rows, hidden, vocab))
        print(json.dumps(out[-1]), flush=True)
    return out


def run_sweep(args) -> list[dict]:
    from fastalign.kernels import fused_logprob

    default, out = fused_logprob.GPU_CONFIG, []
    rows, hidden, vocab = args.shapes[0]
    problem = make_problem(rows, hidden, vocab, args.inputs)
    for config in SWEEP:
        fused_logprob.GPU_CONFIG = fused_logprob.TileConfig(*config)
        row = dict(part="sweep", config=config, rows=rows, hidden=hidden, vocab=vocab)
        try:
            row.update(time_backends(problem))
        except Exception as err:  # noqa: BLE001 - out of shared memory etc.: record, go on
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        finally:
            fused_logprob.GPU_CONFIG = default
        out.append(annotate(row, rows, hidden, vocab) if "error" not in row else row)
        print(json.dumps(out[-1]), flush=True)
    return out


def run_profile(args, out_dir: Path) -> list[dict]:
    """Per-kernel CUDA time of one DPO step (policy + reference, B=4 pairs × 512 tokens)."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.impls import Shape, make_inputs
    from fastalign import dpo_loss_fused

    shape = Shape(8, 512, args.shapes[0][1], args.shapes[0][2], "bfloat16", args.inputs)
    x = make_inputs(shape, "cuda")
    rows = []
    for kernel in ("fused", "gemm_fold"):

        def step():
            out = dpo_loss_fused(
                x["hidden"], x["weight"], x["labels"], ref_hidden=x["ref_hidden"], beta=0.1
            )
            out.loss.backward()

        _with_kernel(kernel, step)  # warm-up: compile the kernels
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _with_kernel(kernel, step)
            torch.cuda.synchronize()
        events = prof.key_averages()
        table = events.table(sort_by="self_cuda_time_total", row_limit=20)
        (out_dir / f"profile_{kernel}.txt").write_text(table)
        for e in events:
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if us > 0:
                rows.append(dict(part="profile", kernel=kernel, name=e.key[:120], us=us))
        print(table, flush=True)
    return rows


def _device_name() -> str:
    return torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE


def markdown(rows: list[dict], args) -> str:
    lines = [f"# Fused-epilogue kernels on {_device_name()}", ""]
    lines.append(f"Inputs: {args.inputs}. Times are do_bench medians (ms); bf16.")
    head = (
        "| part | config | N, H, V | cuBLAS bf16 | fused fwd | gemm_fold fwd | fused bwd "
        "| gemm_fold bwd | fused fwd % peak | max abs Δlogp |"
    )
    lines += ["", head, "|---" * 10 + "|"]
    for r in rows:
        if r["part"] in ("profile", "store") or "error" in r:
            continue
        lines.append(
            f"| {r['part']} | {r.get('config', '')} | {r['rows']}, {r['hidden']}, {r['vocab']} "
            f"| {r.get('cublas_bf16_ms', float('nan')):.3f} | {r['fused_forward_ms']:.3f} "
            f"| {r['gemm_fold_forward_ms']:.3f} | {r['fused_backward_ms']:.3f} "
            f"| {r['gemm_fold_backward_ms']:.3f} | {r['fused_forward_pct_peak']} "
            f"| {r['max_abs_logp_diff']:.2e} |"
        )
    store = [r for r in rows if r["part"] == "store"]
    if store:
        lines += ["", "Store path, one group (kept forward + dz + gradients):", ""]
        lines += [
            "| N, H, V | fused | gemm_fold | fused % peak | max abs Δlogp |",
            "|---" * 5 + "|",
        ]
        lines += [
            f"| {r['rows']}, {r['hidden']}, {r['vocab']} | {r['fused_store_ms']:.3f} "
            f"| {r['gemm_fold_store_ms']:.3f} | {r['fused_store_pct_peak']} "
            f"| {r['max_abs_logp_diff']:.2e} |"
            for r in store
        ]
    lines += [f"\nFailed: {r['config']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        sweep = SWEEP if "sweep" in args.parts else []
        plan = dict(parts=args.parts, shapes=args.shapes, inputs=args.inputs, sweep=sweep)
        print(json.dumps(dict(plan, out=str(args.out))))
        return 0
    if not torch.cuda.is_available():
        print("error: benchmarks.fused_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    if "overhead" in args.parts:
        rows += run_overhead(args)
    if "sweep" in args.parts:
        rows += run_sweep(args)
    if "profile" in args.parts:
        rows += run_profile(args, args.out)
    if "store" in args.parts:
        rows += run_store(args)
    record = dict(device=_device_name(), inputs=args.inputs, rows=rows)
    record["versions"] = {"torch": torch.__version__, "triton": __import__("triton").__version__}
    (args.out / "fused_bench.json").write_text(json.dumps(record, indent=1))
    (args.out / "fused_bench.md").write_text(markdown(rows, args))
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
