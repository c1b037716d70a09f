"""Validate ``fastalign.memory.estimate`` against measured peaks of tiny Llama training steps.

``python -m benchmarks.memory_check [--device cpu|cuda] [--out FILE.json]``: for each setup
(a tiny random-init ``LlamaConfig``, a loss, a batch) and each path (eager full logits, TRL
style, vs fastalign's fused loss), one fresh subprocess builds policy + frozen reference copy,
runs a warm-up step (so AdamW states exist), then measures one full step — forward, no-grad
reference, loss, backward, ``AdamW.step`` — and prints the measured and estimated peaks.
CPU: fp32, RSS high-water mark with ``MALLOC_MMAP_THRESHOLD_=65536`` plus the bytes of the
tensors alive at entry; CUDA: bf16, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace

# A fresh process per cell, with every allocation over 64 KiB mmapped, so that freed
# memory leaves the resident set and the RSS high-water mark tracks live tensors.
CELL_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TRANSFORMERS_VERBOSITY="error")
TOLERANCE = 0.15
BETA = 0.1


@dataclass(frozen=True)
class Setup:
    """A tiny Llama (``LlamaConfig`` fields), a loss and a batch (pairs, or KTO examples)."""

    name: str
    config: dict = field(hash=False)
    loss: str = "dpo"
    batch_size: int = 2
    seq_len: int = 128
    activation_checkpointing: bool = False
    # The fused losses' gradient path, measured and estimated alike. Default: theirs, "auto"
    # (the store path where the lm_head trains and one gradient unit's logits fit the
    # budget; see fastalign/store.py); ``--grad-mode recompute`` checks the recompute path.
    grad_mode: str = "auto"


def _llama(vocab, hidden, layers, heads, kv_heads, intermediate) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=4096,
    )


SETUPS = {
    # V ≫ H: the eager [N, V] logits dominate everything else.
    "logits": Setup("logits", _llama(32000, 64, 2, 4, 2, 128), "dpo", 2, 128),
    # V small, wide MLP, 4 layers: saved activations dominate.
    "activations": Setup("activations", _llama(512, 256, 4, 8, 4, 1024), "dpo", 2, 256),
    # the same model with activation checkpointing: layer inputs + one recomputed layer.
    "checkpointed": Setup("checkpointed", _llama(512, 256, 4, 8, 4, 1024), "dpo", 2, 256, True),
    # KTO: B examples with grad, a mismatched KL batch without, reference for both.
    "kto": Setup("kto", _llama(16000, 128, 2, 4, 2, 256), "kto", 4, 128),
}
QUICK = ("logits", "activations")


# ----------------------------------------------------------------------------- one cell
def _eager_logps(model, input_ids):
    """TRL's ``concatenated_forward``: full logits, fp32 log_softmax, gather, masked sum."""
    import torch

    from fastalign.eager import IGNORE_INDEX, logits_logps

    logits = model(input_ids=input_ids, use_cache=False).logits  # [R, T, V]
    labels = torch.roll(input_ids, shifts=-1, dims=1)  # position t scores token t + 1
    labels[:, -1] = IGNORE_INDEX
    return logits_logps(logits, labels).logps


def _hidden(model, input_ids):
    return model.model(input_ids=input_ids, use_cache=False).last_hidden_state  # [R, T, H]


def _eager_loss(setup, policy, ref, input_ids, kl_ids, desirable):
    """The eager (TRL-style) loss of ``setup.loss``: the policy with grad, then the no-grad
    streams (KTO: its KL rows first, as TRL computes them)."""
    import torch

    from fastalign import eager

    if setup.loss == "kto":
        with torch.no_grad():
            kl_s = _eager_logps(policy, kl_ids)
        s = _eager_logps(policy, input_ids)
        with torch.no_grad():
            ref_s, kl_ref = _eager_logps(ref, input_ids), _eager_logps(ref, kl_ids)
        return eager.kto_loss(s, ref_s, kl_s, kl_ref, desirable, BETA)
    s = _eager_logps(policy, input_ids)
    if setup.loss == "typo":
        return eager.typo_loss(s)
    with torch.no_grad():
        ref_s = _eager_logps(ref, input_ids)
    return eager.dpo_loss(s, ref_s, BETA)


def _fused_loss(setup, policy, ref, input_ids, kl_ids, desirable):
    """fastalign's fused loss of ``setup.loss`` on the models' final hidden states."""
    import torch

    import fastalign

    weight = policy.lm_head.weight
    hidden = _hidden(policy, input_ids)
    options = fastalign.LogpOptions(shift=True, grad_mode=setup.grad_mode)
    if setup.loss == "typo":
        # the pairwise term alone, as the eager path computes it (no sampled rows)
        return fastalign.typo_loss_fused(hidden, weight, input_ids, lam=0.0, options=options).loss
    with torch.no_grad():
        ref_hidden = _hidden(ref, input_ids)
    common = dict(ref_hidden=ref_hidden, ref_weight=ref.lm_head.weight, options=options)
    if setup.loss != "kto":
        return fastalign.dpo_loss_fused(hidden, weight, input_ids, **common).loss
    with torch.no_grad():
        kl_hidden, kl_ref_hidden = _hidden(policy, kl_ids), _hidden(ref, kl_ids)
    kl = dict(kl_hidden=kl_hidden, kl_labels=kl_ids, kl_ref_hidden=kl_ref_hidden)
    return fastalign.kto_loss_fused(hidden, weight, input_ids, desirable, **kl, **common).loss


def _loss_fn(path, setup, policy, ref, input_ids, kl_ids):
    """A closure computing ``path``'s loss of one step."""
    import torch

    desirable = torch.arange(input_ids.shape[0], device=input_ids.device) % 2 == 0
    loss = _eager_loss if path == "eager" else _fused_loss
    return lambda: loss(setup, policy, ref, input_ids, kl_ids, desirable)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def estimate_cell(setup: Setup, device: str):
    """``fastalign.memory.estimate`` for the step ``run_cell`` measures."""
    from fastalign.memory import estimate

    return estimate(
        dict(setup.config, model_type="llama"),
        batch_size=setup.batch_size,
        seq_len=setup.seq_len,
        loss=setup.loss,
        activation_checkpointing=setup.activation_checkpointing,
        dtype="float32" if device == "cpu" else "bfloat16",
        master_weights=False,
        # torch's AdamW keeps exp_avg and exp_avg_sq in the parameter dtype
        optimizer_state_bytes=2 * (4 if device == "cpu" else 2),
        device=device,
        adamw="fused" if device == "cuda" else "single",
        grad_mode=setup.grad_mode,
    )


def run_cell(setup: Setup, path: str, device: str) -> dict:
    """Build, warm up, measure one step; return measured and estimated bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastalign.profiling import PeakMemory

    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    config = LlamaConfig(**setup.config, attn_implementation="sdpa")
    policy = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    policy.train()
    if setup.activation_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rows = setup.batch_size if setup.loss == "kto" else 2 * setup.batch_size
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (rows, setup.seq_len), generator=gen)
    kl_ids = torch.randint(0, config.vocab_size, (rows, setup.seq_len), generator=gen)
    input_ids, kl_ids = input_ids.to(device), kl_ids.to(device)
    # CPU: torch's default (single-tensor); CUDA: fused, as the 30B recipe assumes.
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5, fused=device == "cuda")
    loss_fn = _loss_fn(path, setup, policy, ref, input_ids, kl_ids)

    def step():
        loss_fn().backward()
        optimizer.step()

    step()  # warm-up: optimizer states, allocator pools, lazy inits
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    with PeakMemory(device) as probe:
        step()
    if device == "cuda":
        measured = torch.cuda.max_memory_allocated()
    else:
        # RSS peak above entry + the tensors alive at entry (parameters, optimizer states).
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        alive = list(policy.parameters()) + list(ref.parameters()) + state
        measured = probe.peak_extra_bytes + _tensor_bytes(alive) + input_ids.nbytes + kl_ids.nbytes

    breakdown = estimate_cell(setup, device).path(path)
    return {
        "setup": setup.name,
        "path": path,
        "device": device,
        "loss": setup.loss,
        "grad_mode": setup.grad_mode,
        "measured_bytes": int(measured),
        "estimated_bytes": int(breakdown.peak),
        "error": breakdown.peak / measured - 1,
        "estimated_parts": breakdown.parts,
        "estimated_phases": breakdown.phases,
    }


# ----------------------------------------------------------------------------- driver
def measure(
    setup_name: str, path: str, device: str, timeout: float = 300, grad_mode: str = "auto"
) -> dict:
    """Run one cell in a fresh subprocess (allocator and RSS state of its own)."""
    cell = ["--cell", setup_name, path, device, "--grad-mode", grad_mode]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_check", *cell],
        capture_output=True,
        text=True,
        env=CELL_ENV,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"cell {setup_name}/{path} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_table(results: list[dict]) -> str:
    mib = 1 << 20
    header = (
        f"{'setup':<13}{'loss':<6}{'path':<7}{'measured MiB':>14}{'estimated MiB':>15}{'error':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r['setup']:<13}{r['loss']:<6}{r['path']:<7}{r['measured_bytes'] / mib:>14.1f}"
            f"{r['estimated_bytes'] / mib:>15.1f}{100 * r['error']:>8.1f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
    parser.add_argument(
        "--grad-mode",
        choices=("auto", "store", "recompute"),
        default="auto",
        help="the fused losses' gradient path, measured and estimated (default: theirs, auto)",
    )
    parser.add_argument("--cell", nargs=3, metavar=("SETUP", "PATH", "DEVICE"), help="internal")
    args = parser.parse_args(argv)
    if args.cell:
        setup, path, device = args.cell
        setup = replace(SETUPS[setup], grad_mode=args.grad_mode)
        print(json.dumps(run_cell(setup, path, device)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
            return 2
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"memory_check_{args.device}.json"
    )
    results = []
    for setup in args.setups:
        for path in ("eager", "fused"):
            started = time.perf_counter()
            results.append(measure(setup, path, args.device, grad_mode=args.grad_mode))
            row = format_table(results[-1:]).splitlines()[-1]
            print(f"{row}   ({time.perf_counter() - started:.0f} s)", flush=True)
            # written after every cell, so an interrupted run keeps what it measured
            with open(out, "w") as f:
                setups = [asdict(replace(SETUPS[s], grad_mode=args.grad_mode)) for s in args.setups]
                json.dump({"setups": setups, "results": results}, f, indent=2)
    print(format_table(results))
    print(f"wrote {out}")
    worst = max(abs(r["error"]) for r in results)
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
