"""``fastalign`` command line: train, sample, plot, memory.

fastalign train --loss dpo                  # embedded tiny model + data, CPU, ~1 min
fastalign train --loss kto --model PATH --dataset data.jsonl --lora-rank 16
fastalign sample --model PATH --dataset prefs.jsonl --out with_samples.jsonl
fastalign plot runs/dpo-20261124-120000
fastalign memory Qwen/Qwen3-30B-A3B --batch-size 2 --seq-len 4096 --sharding fsdp --world-size 8
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from . import memory


def _train_parser(sub) -> None:
    from .trainer.flags import HELP
    from .trainer.loop import LOSSES, REFERENCES, TrainConfig
    from .trainer.report import REPORT_TO

    p = sub.add_parser("train", help="preference-train a causal LM with a fused loss")
    p.add_argument("--loss", required=True, choices=LOSSES, help=HELP["loss"])
    p.add_argument("--reference", choices=REFERENCES, default="copy", help=_help("reference"))
    choices = {"kto_kl_offset": (1, -1), "report_to": REPORT_TO}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("loss", "reference", "extra"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=_help(f.name)
            )
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            p.add_argument(
                flag, type=kind, default=f.default, choices=choices.get(f.name), help=_help(f.name)
            )


def _help(name: str) -> str:
    """A flag's help with its default (argparse fills %(default)s; None reads as in HELP)."""
    from .trainer.flags import HELP

    return HELP[name] if "(default" in HELP[name] else HELP[name] + " (default: %(default)s)"


def _train(args) -> int:
    from .trainer.loop import TrainConfig, Trainer

    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    trainer = Trainer(config)
    if trainer.rank == 0:
        print(f"run directory: {trainer.output_dir}", flush=True)
    summary = trainer.train()
    if trainer.rank != 0:  # under torchrun, one report
        return 0
    if summary.get("interrupted"):
        checkpoint = summary["checkpoint"]
        print(
            f"stopped by {summary['interrupted']} after step {summary['steps']}; saved "
            f"{checkpoint} (continue with --resume-from {checkpoint})",
            file=sys.stderr,
        )
        return 128 + summary["signal"]
    for stage in ("before", "after"):
        acc = summary.get(f"{stage}/eval/rewards/accuracies")
        margin = summary.get(f"{stage}/eval/rewards/margins")
        if acc is not None:
            print(f"held-out reward accuracy {stage} training: {acc:.3f} (chance 0.5)")
        elif margin is not None:
            print(
                f"held-out reward margin (desirable − undesirable) {stage} training: {margin:.3f}"
            )
    return 0


def _sample(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .trainer import validation as V
    from .trainer.report import silence_third_party_progress
    from .trainer.sample import sample_completions

    silence_third_party_progress()
    _check_sample_args(args)
    columns = ("prompt", "chosen", "rejected")
    dataset = V.load_dataset(args.dataset, "paired", args.seed, columns)["train"]
    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    samples = sample_completions(
        model,
        tokenizer,
        dataset["prompt"],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    dataset = dataset.add_column(args.column, samples)
    dataset.to_json(args.out)
    print(f"wrote {len(dataset)} rows with column {args.column!r} to {args.out}")
    return 0


def _check_sample_args(args) -> None:
    """``fastalign sample``'s numbers, output file and model path, before anything loads."""
    from .checks import check_number
    from .trainer.validation import check_model_path

    check_number(args.max_new_tokens, "--max-new-tokens", low=1, integer=True)
    check_number(args.temperature, "--temperature", low=0, low_open=True)
    check_number(args.top_k, "--top-k", low=0, integer=True)
    check_number(args.top_p, "--top-p", low=0, high=1, low_open=True)
    if not args.column:
        raise ValueError("--column must be a non-empty column name")
    out = Path(args.out)
    if out.suffix not in (".json", ".jsonl") or out.is_dir():
        raise ValueError(f"--out {args.out}: expected a .json or .jsonl file to write")
    if not out.parent.is_dir():
        raise ValueError(f"--out {args.out}: no such directory {out.parent}")
    check_model_path(args.model, "--model")


def _metrics(path: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``; ValueError naming the file (and line)."""
    if not path.exists():
        raise ValueError(f"{path} not found (is {path.parent} a fastalign run directory?)")
    from .trainer.validation import jsonl_objects

    records = []
    for number, record in jsonl_objects(path.read_text(), str(path)):
        if "step" not in record:
            raise ValueError(f"{path}, line {number}: not a metrics record (no 'step')")
        records.append(record)
    if not records:
        raise ValueError(f"{path} has no records yet (no logging step reached): nothing to plot")
    return records


def plot_panels(records: list[dict]) -> dict[str, list[str]]:
    """Panel title -> the metric keys drawn in it, over every record (training records and the
    ``eval/*`` ones logged between them): ``eval/K`` shares ``K``'s panel, an eval metric
    without a training twin gets its own."""
    keys = list(dict.fromkeys(k for r in records for k in r if k != "step"))
    panels = {k: [k] for k in keys if not k.startswith("eval/")}
    for key in keys:
        if key.startswith("eval/"):
            panels.setdefault(key.removeprefix("eval/"), []).append(key)
    return panels


def _plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(args.run_dir)
    records = _metrics(run / "metrics.jsonl")
    panels = plot_panels(records)
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels.items()):
        for key in keys:  # each key over the records that hold it: no gaps at eval steps
            steps = [r["step"] for r in records if key in r]
            label = "eval" if key.startswith("eval/") else "train"
            ax.plot(steps, [r[key] for r in records if key in r], marker=".", label=label)
        if len(keys) > 1:
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(args.out) if args.out else run / "metrics.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="fastalign", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    s = sub.add_parser("sample", help="draw reference samples (a TYPO dataset column)")
    s.add_argument("--model", required=True, help="reference model: local path or hub name")
    s.add_argument(
        "--dataset", required=True, help="preference data (text or conversational prompts)"
    )
    s.add_argument("--out", required=True, help=".json/.jsonl file to write")
    s.add_argument("--column", default="sample", help="new column (default: %(default)s)")
    default = " (default: %(default)s)"
    s.add_argument("--max-new-tokens", type=int, default=128, help="tokens per sample" + default)
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature" + default)
    s.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0: off" + default)
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass" + default)
    s.add_argument("--seed", type=int, default=0, help="sampling seed" + default)
    pl = sub.add_parser("plot", help="draw a run's metric curves to PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out", default=None)
    m = sub.add_parser(
        "memory", help="per-GPU memory of a training step: eager logits vs fused (estimate)"
    )
    memory.add_arguments(m)
    args = parser.parse_args(argv)
    command = {"train": _train, "sample": _sample, "plot": _plot, "memory": memory.run}
    try:
        return command[args.command](args)
    except ValueError as err:  # bad input: named, before any work
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as err:
        from .trainer.checkpoint import CheckpointError
        from .trainer.loop import DivergedError  # a run that diverged: one line, exit 1

        if isinstance(err, RuntimeError) and not isinstance(err, (CheckpointError, DivergedError)):
            raise
        print(f"error: {err}", file=sys.stderr)  # e.g. disk full, no permission to write
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
