"""TRL's DPO trainer step, stock vs fastalign (``fastalign.integrations.trl``): time and memory.

``python -m benchmarks.trl_step --preset cpu`` (or ``gpu``): for a full fine-tune (trainable
lm_head, separate reference model) and a LoRA run (frozen head, adapter-off reference), two
trainers on identical model copies take ``training_step`` (forward + backward of policy and
reference) in turn, interleaved, and each step's wall time and peak memory above the step's
start are recorded (CUDA allocator peak, or CPU peak RSS). Writes JSON + Markdown to
``benchmarks/results/``. On a CPU the script re-runs itself with ``MALLOC_MMAP_THRESHOLD_``
set so that glibc maps every large tensor and unmaps it when freed: peak RSS then follows live
tensors, not whatever an earlier step left in the heap (which would flatter the second side).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.run import RESULTS, device_name, versions
from fastalign.profiling import PeakMemory

# Llama-style shapes: "cpu" is small enough for 2 cores, "gpu" has Llama-3-8B's lm_head
PRESETS = {
    "cpu": dict(vocab=32000, hidden=256, layers=2, intermediate=512, prompt=96, completion=64,
                pairs=4, bf16=False),
    "gpu": dict(vocab=128256, hidden=4096, layers=2, intermediate=14336, prompt=1024,
                completion=1024, pairs=4, bf16=True),
}  # fmt: skip

MEMORY_PROBE = {"cuda": "CUDA allocator", "cpu": "CPU peak RSS, large tensors mmapped"}


def _model(shape: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastalign.trainer.default import default_tokenizer

    tokenizer = default_tokenizer()
    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=max(1, shape["hidden"] // 64),
        max_position_embeddings=shape["prompt"] + shape["completion"] + 8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device), tokenizer


def _dataset(shape: dict):
    """Digit strings (one token per character) of the preset's prompt/completion lengths."""
    from datasets import Dataset

    rng = random.Random(0)

    def text(length):
        return "".join(rng.choice("0123456789+=") for _ in range(length))

    rows = shape["pairs"]
    return Dataset.from_dict(
        dict(
            prompt=[text(shape["prompt"]) for _ in range(rows)],
            chosen=[text(shape["completion"] - 1) for _ in range(rows)],
            rejected=[text(shape["completion"] - 1) for _ in range(rows)],
        )
    )


def _trainers(shape: dict, device: str, lora: bool):
    """``{"trl": stock DPOTrainer, "fastalign": fastalign's}`` on identical model copies."""
    import peft
    import trl

    from fastalign.integrations import trl as fa

    model, tokenizer = _model(shape, device)
    args = trl.DPOConfig(
        output_dir="/tmp/fastalign-trl-step",
        per_device_train_batch_size=shape["pairs"],
        max_length=None,
        report_to=[],
        use_cpu=device == "cpu",
        bf16=shape["bf16"],
        save_strategy="no",
    )
    peft_config = peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj"]) if lora else None
    ref = None if lora else copy.deepcopy(model)
    trainers = {}
    for name, cls in (("trl", trl.DPOTrainer), ("fastalign", fa.DPOTrainer)):
        trainers[name] = cls(
            model=copy.deepcopy(model),
            ref_model=copy.deepcopy(ref),
            args=args,
            train_dataset=_dataset(shape),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    return trainers


def _step(trainer, batch, device: str) -> tuple[float, int]:
    """One ``training_step``: ``(seconds, peak extra bytes)``."""
    trainer.model.zero_grad(set_to_none=False)
    with PeakMemory(device) as probe:
        start = time.perf_counter()
        trainer.training_step(trainer.model, batch)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, probe.peak_extra_bytes


def measure(shape: dict, device: str, lora: bool, repeats: int) -> dict:
    """Interleaved steps of both trainers on the same batch; medians and all samples."""
    trainers = _trainers(shape, device, lora)
    samples = {name: {"seconds": [], "peak_bytes": []} for name in trainers}
    batches = {}
    for name, trainer in trainers.items():
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by train()'s loop otherwise
        batch = next(iter(trainer.get_train_dataloader()))
        batches[name] = trainer._prepare_inputs(batch)
        _step(trainer, batches[name], device)  # warm-up: .grad buffers, kernels
    for _ in range(repeats):
        for name, trainer in trainers.items():
            seconds, peak = _step(trainer, batches[name], device)
            samples[name]["seconds"].append(seconds)
            samples[name]["peak_bytes"].append(peak)
    completion = batches["trl"]["completion_mask"][:, 1:]
    summary = {
        name: {
            "median_seconds": statistics.median(s["seconds"]),
            "median_peak_mib": statistics.median(s["peak_bytes"]) / 2**20,
            **s,
        }
        for name, s in samples.items()
    }
    return dict(
        setup="lora (frozen head)" if lora else "full (trainable head)",
        rows=int(completion.shape[0]),
        positions=int(completion.numel()),
        scored_tokens=int(completion.sum()),
        results=summary,
    )


def markdown(record: dict) -> str:
    lines = [
        f"# TRL DPO trainer step, stock vs fastalign — {record['device']}",
        "",
        f"{record['date']}, preset `{record['preset']}`: {json.dumps(record['shape'])}; "
        f"{record['repeats']} interleaved `training_step`s each (policy + reference forward, "
        "policy backward; no optimizer step), medians. Memory: peak above the step's start "
        f"({MEMORY_PROBE[record['device_type']]}).",
        "",
        "| setup | rows x positions (scored) | TRL s | fastalign s | speed-up | TRL MiB | "
        "fastalign MiB | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in record["cells"]:
        stock, fast = cell["results"]["trl"], cell["results"]["fastalign"]
        lines.append(
            f"| {cell['setup']} | {cell['rows']} x {cell['positions'] // cell['rows']} "
            f"({cell['scored_tokens']}) | {stock['median_seconds']:.3f} | "
            f"{fast['median_seconds']:.3f} | "
            f"{stock['median_seconds'] / fast['median_seconds']:.2f}x | "
            f"{stock['median_peak_mib']:.0f} | {fast['median_peak_mib']:.0f} | "
            f"{fast['median_peak_mib'] / max(stock['median_peak_mib'], 1e-9):.2f} |"
        )
    lines += ["", f"Versions: {json.dumps(record['versions'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if args.preset == "gpu" else "cpu")
    if device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.trl_step", *argv], env)
    shape = PRESETS[args.preset]
    cells = []
    for lora in (False, True):
        cells.append(measure(shape, device, lora, args.repeats))
        print(json.dumps({k: v for k, v in cells[-1].items() if k != "results"}), flush=True)
    name = device_name(device)
    record = dict(
        device=name,
        device_type=device,
        preset=args.preset,
        shape=shape,
        repeats=args.repeats,
        date=datetime.date.today().isoformat(),
        threads=torch.get_num_threads(),
        versions=versions(),
        cells=cells,
    )
    slug = name.lower().replace(" ", "-").replace("_", "-")
    stem = args.out / f"{slug}_trl-step_{record['date']}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    stem.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
