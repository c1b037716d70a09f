"""Packed vs padded training steps on the embedded default: seconds and tokens per step,
padding fraction and peak memory.

    python -m benchmarks.packing                    # 50 steps each, this machine's CPU
    python -m benchmarks.packing --device cuda --steps 100 --loss kto
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from unittest import mock

import torch

from fastalign.profiling import PeakMemory
from fastalign.trainer.loop import TrainConfig, Trainer

PARTS = ("policy", "kl", "sample")  # every body forward of a microbatch


def _trainer(config: TrainConfig, device: str) -> Trainer:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    # The trainer takes CUDA whenever it exists; hide it for a CPU measurement.
    hide = device == "cpu" and torch.cuda.is_available()
    with (
        mock.patch("torch.cuda.is_available", return_value=False)
        if hide
        else (contextlib.nullcontext())
    ):
        return Trainer(config)


def _token_counts(batch: dict) -> tuple[int, int]:
    """(tokens the body processes, real tokens) of one microbatch, over all its parts."""
    processed = real = 0
    for part in PARTS:
        if part in batch:
            ids = batch[part]["input_ids"]  # [B, T] padded or [1, N] packed
            processed += ids.numel()
            mask = batch[part].get("attention_mask")
            real += ids.numel() if mask is None else int(mask.sum())
    return processed, real


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(
    packing: bool,
    steps: int,
    device: str = "cpu",
    *,
    loss: str = "dpo",
    batch_size: int = 16,
    warmup_steps: int = 3,
) -> dict:
    """Time ``steps`` optimizer steps (after ``warmup_steps`` untimed) of the trainer.

    A step is what ``Trainer.train`` does per step: collate the microbatch, policy and
    reference forward, fused loss, backward, clipping, AdamW. Returns ``seconds_per_step``,
    ``tokens_per_step`` (tokens through the body, padding included), ``real_tokens_per_step``,
    ``padding_fraction``, ``peak_memory_bytes`` (``PeakMemory``: CUDA allocator peak or CPU
    RSS high-water above the start) and ``packed_attention`` (the mode, None when padded).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    with tempfile.TemporaryDirectory() as out_dir:
        config = TrainConfig(
            loss=loss,
            packing=packing,
            batch_size=batch_size,
            max_steps=warmup_steps + steps,
            sft_warmup_steps=20,  # the default model's SFT start; not timed
            output_dir=out_dir,
            progress=False,
        )
        trainer = _trainer(config, device)
        stream = trainer._stream()
        params = [p for p in trainer.model.parameters() if p.requires_grad]

        def step() -> tuple[int, int]:
            trainer.optimizer.zero_grad(set_to_none=True)
            batch = next(stream)
            trainer.compute(batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            trainer.optimizer.step()
            trainer.scheduler.step()
            return _token_counts(batch)

        for _ in range(warmup_steps):
            step()
        processed = real = 0
        with PeakMemory(trainer.device) as probe:
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                p, r = step()
                processed, real = processed + p, real + r
            _sync(device)
            elapsed = time.perf_counter() - start
    return {
        "packing": packing,
        "packed_attention": trainer.packed_attention,
        "device": device,
        "loss": loss,
        "steps": steps,
        "seconds_per_step": elapsed / steps,
        "tokens_per_step": processed / steps,
        "real_tokens_per_step": real / steps,
        "padding_fraction": 1.0 - real / processed,
        "peak_memory_bytes": probe.peak_extra_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.packing", description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--loss", choices=("dpo", "ipo", "kto", "typo"), default="dpo")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved runs per layout; the fastest is shown"
    )
    args = parser.parse_args(argv)
    runs = {False: [], True: []}
    for _ in range(args.repeats):  # interleaved, so a busy machine slows both layouts alike
        for packing in (False, True):
            torch.manual_seed(0)
            runs[packing].append(
                measure(
                    packing, args.steps, args.device, loss=args.loss, batch_size=args.batch_size
                )
            )
    print(
        f"{args.loss}, batch {args.batch_size}, {args.steps} steps x {args.repeats} runs on "
        f"{args.device} ({torch.get_num_threads()} threads); s/step: fastest run (median)"
    )
    header = (
        f"{'layout':<20}{'s/step':>9}{'(median)':>10}{'tokens/step':>13}{'padding':>9}"
        f"{'peak MiB':>10}"
    )
    print(header)
    print("-" * len(header))
    best = {}
    for packing, rows in runs.items():
        times = sorted(r["seconds_per_step"] for r in rows)
        best[packing] = times[0]
        row = rows[0]
        layout = f"packed ({row['packed_attention']})" if packing else "padded"
        print(
            f"{layout:<20}{times[0]:>9.4f}{times[len(times) // 2]:>10.4f}"
            f"{row['tokens_per_step']:>13.1f}{row['padding_fraction']:>9.1%}"
            f"{max(r['peak_memory_bytes'] for r in rows) / 2**20:>10.1f}"
        )
    print(f"packed / padded time (fastest runs): {best[True] / best[False]:.2f}")
    print("tokens/step: tokens through the body per pass over the microbatch (all its parts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
