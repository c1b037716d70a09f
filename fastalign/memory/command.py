"""``fastalign memory``: the estimate's options, and its table (or JSON) on stdout."""

from __future__ import annotations

import argparse
import inspect
import json
import sys

from .. import tiles
from .estimator import estimate
from .presets import PRESETS
from .result import PATHS
from .step import GRAD_MODES, LOSSES, SHARDINGS
from .units import GIB, parse_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fastalign memory`` options (shared by this module's parser and ``fastalign.cli``)."""
    p.add_argument("model", help="preset name (" + ", ".join(PRESETS) + "), config.json or dir")
    p.add_argument("--batch-size", type=int, required=True, help="per-GPU micro-batch")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    p.add_argument("--loss", choices=LOSSES, default="dpo", help="the preference loss")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--sharding", choices=SHARDINGS, default="none")
    p.add_argument("--lora", type=int, default=None, metavar="RANK")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.add_argument(
        "--no-master-weights",
        action="store_true",
        help="params and grads in --dtype (default for half dtypes: fp32 master weights)",
    )
    p.add_argument(
        "--grad-mode",
        choices=GRAD_MODES,
        default="auto",
        help="the fused losses' gradient path: auto (their default: store with a trainable "
        "lm_head when one gradient unit's logits fit the budget), store (gradients formed in "
        "the forward) or recompute (logits recomputed in backward)",
    )
    p.add_argument(
        "--cuda-kernel",
        choices=tiles.CUDA_KERNELS,
        default=None,
        help="the Triton backend's CUDA kernels: gemm_fold (the default) or fused (GEMMs with "
        "the logsumexp/dz in their epilogue, opt-in); default: what FASTALIGN_CUDA_KERNEL selects",
    )
    p.add_argument("--gpu-memory", default="80GB", help="per-GPU memory, e.g. 80GB (GiB)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    """Estimate from parsed ``fastalign memory`` arguments and print the table."""
    # every option named as estimate's keyword goes to it as is (a new one: add_arguments only)
    keywords = inspect.signature(estimate).parameters
    options = {name: value for name, value in vars(args).items() if name in keywords}
    try:
        limit = parse_bytes(args.gpu_memory, "--gpu-memory")
        est = estimate(
            args.model, master_weights=False if args.no_master_weights else None, **options
        )
    except (ValueError, TypeError) as err:
        print(f"error: {_as_flags(str(err), keywords)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    print(est.format_table(limit))
    for path in PATHS:
        verdict = "fits" if est.fits(limit, path) else "does NOT fit"
        peak = est.total(path) / GIB
        print(f"{path}: peak {peak:.2f} GiB per GPU, {verdict} in {limit / GIB:.1f} GiB")
    print("assumptions:\n  " + "\n  ".join(est.assumptions))
    return 0


def _as_flags(message: str, keywords) -> str:
    """``estimate``'s error with its leading argument name as the CLI spells it
    (``batch_size must …`` → ``--batch-size must …``; ``config_or_name`` → ``MODEL``)."""
    for name in sorted(keywords, key=len, reverse=True):
        if message.startswith(name) and message[len(name) : len(name) + 1] in (" ", ":", ""):
            cli_name = "MODEL" if name == "config_or_name" else "--" + name.replace("_", "-")
            return cli_name + message[len(name) :]
    return message


def cli(argv: list[str] | None = None) -> int:
    """``python -m fastalign.memory MODEL --batch-size B --seq-len T ...``."""
    parser = argparse.ArgumentParser(
        prog="fastalign memory",
        description="Per-GPU memory of a preference-training step: eager logits vs fused.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
