"""Fused vs eager per-sequence log-probs on CPU: values, time and peak extra memory.

Run ``python -m fastalign.demo`` (defaults: N=4096 scored tokens, V=32000, H=1024, fp32).
Each path runs forward+backward in a fresh subprocess so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from .eager import eager_logps
from .profiling import PeakMemory


def _inputs(num_seqs: int, seq_len: int, vocab: int, hidden_size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_seqs, seq_len, hidden_size, generator=gen, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (num_seqs, seq_len), generator=gen)
    return hidden, weight, labels


def _run_one(path: str, num_seqs: int, seq_len: int, vocab: int, hidden_size: int) -> dict:
    """Child process: forward+backward once to warm up, then measure one more."""
    import fastalign

    hidden, weight, labels = _inputs(num_seqs, seq_len, vocab, hidden_size)

    def step():
        if path == "eager":
            logps = eager_logps(hidden, weight, labels).logps
        else:
            options = fastalign.LogpOptions(backend="torch")
            logps = fastalign.sequence_logps(hidden, weight, labels, options=options).logps
        logps.sum().backward()
        return logps.detach()

    step()  # warm-up: grads now exist, so the measured step allocates nothing persistent
    with PeakMemory("cpu") as probe:
        start = time.perf_counter()
        logps = step()
        seconds = time.perf_counter() - start
    return {
        "path": path,
        "seconds": seconds,
        "peak_extra_bytes": probe.peak_extra_bytes,
        "logps_head": logps[:4].tolist(),
    }


def measure(path: str, num_seqs: int, seq_len: int, vocab: int, hidden_size: int) -> dict:
    """Run one path in a fresh interpreter and return its measurements."""
    code = (
        "import json, fastalign.demo as d; "
        f"print(json.dumps(d._run_one({path!r}, {num_seqs}, {seq_len}, {vocab}, {hidden_size})))"
    )
    # Allocations over 64 KiB are mmapped so freed memory leaves the resident set at once
    # (otherwise glibc reuses the warm-up's freed pages and hides the measured peak).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args(argv)
    shape = (args.batch, args.seq_len, args.vocab, args.hidden)
    print(
        f"N={args.batch * args.seq_len} tokens, V={args.vocab}, H={args.hidden}, fp32, "
        f"forward+backward, {torch.get_num_threads()} threads"
    )
    rows = [measure(path, *shape) for path in ("eager", "fused")]
    for row in rows:
        print(
            f"  {row['path']:>5}: {row['seconds'] * 1e3:8.1f} ms   peak extra "
            f"{row['peak_extra_bytes'] / 2**20:8.1f} MiB   logps[:4] "
            + " ".join(f"{v:.3f}" for v in row["logps_head"])
        )
    eager, fused = rows
    print(
        f"  fused/eager: time {fused['seconds'] / eager['seconds']:.2f}x, "
        f"memory {fused['peak_extra_bytes'] / max(eager['peak_extra_bytes'], 1):.3f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
