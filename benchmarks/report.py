"""Markdown table and PNG plots from a results JSON of ``benchmarks.run``.

    python -m benchmarks.report [RESULTS.json]     # default: the newest file in results/

Table: time and peak extra memory per implementation, with ratios to eager and, for
fastalign, to the best available peer; on GPU also TFLOP/s and the fraction of bf16 peak.
Plots: time and memory vs V and vs N (one line per implementation).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PEERS = ("torch.compile", "liger", "trl.kernels", "cce", "quack")
# Matmul FLOPs per scored token, in units of H·V: policy fwd+bwd 6 (4 with a frozen lm_head:
# no weight gradient), each no-grad stream 2. Counted once, without any recompute.
FLOP_UNITS = {
    "logps": 6,
    "logps_frozen": 4,
    "policy_ref": 8,
    "dpo": 8,
    "ipo": 8,
    "kto": 12,
    "typo": 12,
}


def scored_tokens(shape: dict) -> int:
    return shape["rows"] * (shape["seq_len"] - max(1, shape["seq_len"] // 8))


def shape_label(shape: dict) -> str:
    peaked = " peaked" if shape.get("inputs") == "peaked" else ""
    return (
        f"N={shape['rows'] * shape['seq_len']} H={shape['hidden']} V={shape['vocab']} "
        f"{shape['dtype']}{peaked}"
    )


def inputs_note(record: dict) -> str:
    """Which inputs the rows used: near-flat logits, or peaked ones (benchmarks/peaked.py)."""
    kinds = {row["shape"].get("inputs", "uniform") for row in record["rows"]}
    notes = {
        "uniform": "uniform inputs (logits ~N(0, 1), near-flat softmax, random labels)",
        "peaked": "peaked inputs (softmax entropy ~2.5 nats/token, labels drawn from it)",
    }
    return "Inputs: " + "; ".join(notes[k] for k in sorted(kinds)) + "."


def _vs_eager(row: dict, eager: dict | None) -> list[str]:
    """Speed-up and memory ratio against the eager row of the same cell."""
    if not eager:
        return ["–", "–"]
    return [
        f"{eager['seconds'] / row['seconds']:.2f}x",
        f"{row['peak_extra_bytes'] / max(eager['peak_extra_bytes'], 1):.3f}x",
    ]


def _vs_best_peer(row: dict, impls: dict) -> str:
    """fastalign against the fastest and the leanest peer of the same cell."""
    peers = [impls[p] for p in PEERS if p in impls]
    if row["impl"] != "fastalign" or not peers:
        return ""
    best_time = min(peers, key=lambda r: r["seconds"])
    best_mem = min(peers, key=lambda r: r["peak_extra_bytes"])
    return (
        f"{best_time['seconds'] / row['seconds']:.2f}x ({best_time['impl']}) / "
        f"{row['peak_extra_bytes'] / max(best_mem['peak_extra_bytes'], 1):.3f}x "
        f"({best_mem['impl']})"
    )


def _throughput(case: str, row: dict, peak: float | None) -> list[str]:
    """TFLOP/s of the matmuls counted once (``FLOP_UNITS``) and the share of bf16 peak."""
    shape = row["shape"]
    flops = FLOP_UNITS[case] * scored_tokens(shape) * shape["hidden"] * shape["vocab"]
    tflops = flops / row["seconds"] / 1e12
    return [f"{tflops:.0f}", f"{100 * tflops / peak:.0f} %" if peak else "–"]


def _frozen_notes(groups: dict) -> list[str]:
    """One sentence per cell timed with both fastalign paths (frozen lm_head)."""
    notes = []
    for (_case, label), impls in groups.items():
        fast, general = impls.get("fastalign"), impls.get("fastalign-recompute")
        if fast and general:
            notes.append(
                f"\nFrozen lm_head, {label}: the fast path (E = softmax·W in forward) takes "
                f"{fast['seconds'] * 1e3:.1f} ms against {general['seconds'] * 1e3:.1f} ms for "
                f"the recompute path: {general['seconds'] / fast['seconds']:.2f}x; peak extra "
                f"{fast['peak_extra_bytes'] / 2**20:.1f} vs "
                f"{general['peak_extra_bytes'] / 2**20:.1f} MiB."
            )
    return notes


def table(record: dict) -> str:
    """The markdown table of the record's main cells (the sweeps are plotted)."""
    groups = defaultdict(dict)
    for row in record["rows"]:
        if not row["part"].startswith("sweep"):
            groups[(row["case"], shape_label(row["shape"]))][row["impl"]] = row
    gpu = record["device_kind"] == "cuda"
    head = (
        "| case | shape | impl | time (ms) | peak extra (MiB) | speed-up vs eager "
        "| memory vs eager | vs best peer (time / memory) |"
    )
    if gpu:
        head += " TFLOP/s | % bf16 peak |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (case, label), impls in groups.items():
        for impl, row in impls.items():
            cells = [case, label, f"**{impl}**" if impl == "fastalign" else impl]
            cells += [f"{row['seconds'] * 1e3:.1f}", f"{row['peak_extra_bytes'] / 2**20:.1f}"]
            cells += _vs_eager(row, impls.get("eager")) + [_vs_best_peer(row, impls)]
            if gpu:
                cells += _throughput(case, row, record.get("bf16_peak_tflops"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + _frozen_notes(groups))


def plots(record: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for part, axis, key in (("sweep-v", "V", "vocab"), ("sweep-n", "N (tokens)", None)):
        rows = [r for r in record["rows"] if r["part"] == part]
        if not rows:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        by_impl = defaultdict(list)
        for r in rows:
            x = r["shape"][key] if key else r["shape"]["rows"] * r["shape"]["seq_len"]
            by_impl[r["impl"]].append((x, r["seconds"] * 1e3, r["peak_extra_bytes"] / 2**20))
        for impl, points in sorted(by_impl.items()):
            points.sort()
            xs, ts, ms = zip(*points)
            style = dict(marker="o", linewidth=2.5 if impl == "fastalign" else 1.2, label=impl)
            ax_t.plot(xs, ts, **style)
            ax_m.plot(xs, ms, **style)
        case = rows[0]["case"]
        for ax, what in ((ax_t, "time fwd+bwd (ms)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xlabel(axis)
            ax.set_ylabel(what)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend()
        fig.suptitle(f"{case}: {record['device']} ({record['date']})")
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{part}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def failed_cells(record: dict) -> str:
    """The cells that failed (``benchmarks.run`` keeps the rest of the grid), one line each."""
    failed = record.get("failed") or []
    if not failed:
        return ""
    lines = ["", f"**Failed cells ({len(failed)})**, not in the table:", ""]
    for f in failed:
        where = " ".join(
            str(part)
            for part in (f.get("case"), f.get("impl"), f.get("shape") and shape_label(f["shape"]))
            if part
        )
        lines.append(f"- {where}: `{f['error']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        path = Path(argv[0])
    else:
        candidates = sorted(RESULTS.glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            print("no results in benchmarks/results/; run python -m benchmarks.run first")
            return 1
        path = candidates[-1]
    record = json.loads(path.read_text())
    stem = path.with_suffix("")
    md = (
        f"## {record['device']} — {record['grid']} grid, {record['date']}\n\n"
        f"torch {record['versions']['torch']}, {record['threads']} threads, load average "
        f"before/after {record['load_average_before'][0]:.2f}/"
        f"{record['load_average_after'][0]:.2f}. "
        "Time: forward+backward of the whole loss (pytest-benchmark median). Peak extra "
        "memory: resident-set (CPU, fresh process) or allocator (CUDA) high-water mark of one "
        "warmed-up step above its start; it includes the lm_head gradient that every "
        "implementation produces (V·H elements; none in the frozen-head case). "
        + inputs_note(record)
        + "\n\n"
        + table(record)
        + "\n"
        + failed_cells(record)
    )
    for png in plots(record, stem):
        md += f"\n![{png.stem}]({png.name})\n"
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
