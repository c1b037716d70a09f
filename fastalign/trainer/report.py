"""What a run shows and records: one progress bar (throughput, ETA, the loss's own figure),
third-party progress bars silenced, metrics to TensorBoard or Weights & Biases."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPORT_TO = ("none", "tensorboard", "wandb")
_EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb"}  # pip extra per --report-to value


def silence_third_party_progress() -> None:
    """Turn off the progress bars of datasets (``Generating train split``, ``Filter``,
    ``Map``, ``Creating json from Arrow format``...), transformers (``Loading weights``,
    ``Writing model shards``) and huggingface_hub (downloads), so only the trainer's own bar
    is printed. Warnings and errors still are."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover - huggingface_hub always comes with transformers
        return
    disable_progress_bars()


def check_report_to(report_to: str) -> None:
    """Raise ValueError naming ``report_to`` when it is unknown or its package is missing."""
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to must be one of {REPORT_TO}, got {report_to!r}")
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise ValueError(
            f"--report-to {report_to} needs the {report_to} package: "
            f"pip install 'fastalign[{_EXTRA[report_to]}]' (or --report-to none)"
        )


class Reporter:
    """Sends each logged record (the ``metrics.jsonl`` names: ``loss``, ``rewards/...``,
    ``eval/...``) to TensorBoard (``<run>/tensorboard``) or Weights & Biases (offline unless
    ``WANDB_MODE`` says otherwise, files under ``<run>/wandb``); ``"none"`` does nothing.

    Example:
        >>> reporter = Reporter("none", "runs/x", {"loss": "dpo"})
        >>> reporter.log({"loss": 0.69}, step=1); reporter.close()
    """

    def __init__(self, report_to: str, run_dir: str | Path, config: dict):
        check_report_to(report_to)
        self.report_to = report_to
        self._writer = None
        self._run = None
        run_dir = Path(run_dir)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self._writer.add_text("config", repr(config))
        elif report_to == "wandb":
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "fastalign"),
                name=run_dir.name,
                dir=str(run_dir),
                config=config,
                mode=os.environ.get("WANDB_MODE", "offline"),
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` (finite numbers only) at ``step``."""
        values = {
            k: float(v)
            for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
        }
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()
        elif self._run is not None:
            self._run.log(values, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        elif self._run is not None:
            self._run.finish()


def bar_figures(metrics: dict[str, float]) -> dict[str, str]:
    """The short figures of the progress bar: the loss, then the loss's own signal —
    reward accuracy for paired losses; for KTO, whose batches have no pairs, the reward
    margin (desirable − undesirable) and the KL estimate z0."""
    out = {"loss": f"{metrics['loss']:.4f}"}
    if "rewards/accuracies" in metrics:
        out["acc"] = f"{metrics['rewards/accuracies']:.2f}"
    else:
        if "rewards/margins" in metrics:
            out["margin"] = f"{metrics['rewards/margins']:.3f}"
        if "kl" in metrics:
            out["kl"] = f"{metrics['kl']:.3f}"
    if "aux_loss" in metrics:
        out["aux"] = f"{metrics['aux_loss']:.3f}"
    return out


def _short(rate: float) -> str:
    return f"{rate / 1000:.1f}k" if rate >= 1000 else f"{rate:.0f}"


class Throughput:
    """Tokens per second and the time left, over the steps since the last :meth:`rates`.

    ``add(tokens, scored)`` after each microbatch (``tokens``: real input tokens,
    ``scored``: completion tokens the loss scores); ``rates(steps, steps_left)`` gives
    ``tokens_per_second``, ``scored_tokens_per_second`` and ``eta_seconds`` (``steps_left``
    at the pace of the last ``steps`` steps): wall-clock figures, the only ones of a record
    a resumed run does not reproduce.
    """

    def __init__(self):
        self.num_tokens = self.num_scored = 0
        self._tokens = self._scored = 0
        self._start = self._since = time.perf_counter()

    def bar(self) -> dict[str, str]:
        """Input and scored tokens per second since the start, for the progress bar."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        return {
            "tok_s": _short(self.num_tokens / elapsed),
            "scored_s": _short(self.num_scored / elapsed),
        }

    def add(self, tokens: int, scored: int) -> None:
        self.num_tokens += tokens
        self.num_scored += scored
        self._tokens += tokens
        self._scored += scored

    def rates(self, steps: int, steps_left: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._since, 1e-9)
        out = {
            "tokens_per_second": self._tokens / elapsed,
            "scored_tokens_per_second": self._scored / elapsed,
            "eta_seconds": elapsed / max(steps, 1) * steps_left,
        }
        self._tokens = self._scored = 0
        self._since = now
        return out


def batch_token_counts(batch: dict) -> tuple[int, int]:
    """``(tokens, scored)`` of a collated batch: real (unpadded) input tokens of every part
    (policy, KTO's mismatched pairs, TYPO's samples) and the policy's scored tokens."""
    tokens = 0
    for part in ("policy", "kl", "sample"):
        if part in batch:
            p = batch[part]
            tokens += (
                int(p["attention_mask"].sum()) if "attention_mask" in p else p["input_ids"].numel()
            )
    scored = int((batch["policy"]["labels"] != -100).sum())
    return tokens, scored


class RunLog:
    """The trainer's one bar and its records: each step's metrics go to the bar; every
    ``logging_steps`` their mean, with throughput and ETA, goes to ``metrics.jsonl`` and
    ``--report-to``. Only ``rank0`` shows or writes anything.

    ``config`` is the run's TrainConfig (``loss``, ``max_steps``, ``logging_steps``,
    ``progress``, ``report_to``); ``step`` the step training starts from; ``window`` the
    steps logged since the last record (the trainer's list, kept in checkpoints so a resumed
    run writes the same records; emptied in place).
    """

    def __init__(
        self, run_dir: Path, config, step: int, rank0: bool = True, window: list | None = None
    ):
        self.config, self.rank0 = config, rank0
        self.path = Path(run_dir) / "metrics.jsonl"
        self.throughput = Throughput()
        self.window: list[dict[str, float]] = [] if window is None else window
        self.reporter = Reporter(config.report_to if rank0 else "none", run_dir, asdict(config))
        self.bar = None
        if config.progress and rank0:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=config.max_steps, initial=step, desc=config.loss, dynamic_ncols=True
            )

    def add_batch(self, batch: dict) -> None:
        """Count a microbatch's tokens (see :func:`batch_token_counts`)."""
        self.throughput.add(*batch_token_counts(batch))

    def step(self, metrics: dict[str, float]) -> None:
        """One optimizer step's metrics (with ``step``): the bar, and a record when due."""
        self.window.append(metrics)
        if self.bar is not None:
            self.bar.set_postfix({**bar_figures(metrics), **self.throughput.bar()}, refresh=False)
            self.bar.update(1)
        step, cfg = metrics["step"], self.config
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            window = list(self.window)
            self.window.clear()
            record = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
            record.update(self.throughput.rates(len(window), cfg.max_steps - step))
            self.record({**record, "step": step})

    def record(self, record: dict[str, float]) -> None:
        """One line of ``metrics.jsonl`` (with ``step``), also sent to ``--report-to``."""
        if self.rank0:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.reporter.log(record, step=int(record["step"]))

    def close(self, final: dict[str, float] | None = None, step: int = 0) -> None:
        """Close the bar and the reporter, sending it ``final`` (the after-training
        evaluation) first; also on an error (``final`` None)."""
        if self.bar is not None:
            self.bar.close()
        if final and self.rank0:
            self.reporter.log(final, step=step)
        self.reporter.close()
