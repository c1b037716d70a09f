"""A small, readable preference-training loop around the fused losses.

``Trainer(TrainConfig(...)).train()``: checks every setting and the data first
(``validation.py``), loads a causal LM (or the embedded default), a reference policy (frozen
copy, PEFT adapter disabled, or precomputed log-probs; ``reference.py``), then runs AdamW with
warmup+cosine, gradient accumulation and clipping, logs TRL-named metrics to ``metrics.jsonl``
and writes atomic checkpoints that resume exactly into any directory (``checkpoint.py``); the
first SIGINT/SIGTERM saves and stops. Under ``torchrun`` it wraps the hidden-state forward in
DDP, or with ``fsdp`` shards with FSDP2 (see ``fsdp.py``), and all-reduces KTO's z0. With
``packing`` each microbatch is one padding-free row scored through ``cu_seqlens``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import losses
from ..options import LogpOptions
from . import checkpoint as C
from . import data as D
from . import policy as P
from . import reference as R
from . import report
from . import validation as V
from .compute import BatchLoss
from .config import TrainConfig
from .interrupt import StopRequest, agreed_signal
from .loss_table import loss_spec
from .model import (
    HiddenStates,
    enable_activation_checkpointing,
    lm_head,
    prepare_packing,
    router_aux_loss,
)
from .validation import LOSSES, REFERENCES

__all__ = ["LOSSES", "REFERENCES", "DivergedError", "TrainConfig", "Trainer"]


class DivergedError(RuntimeError):
    """The loss became non-finite; no checkpoint was written from the diverged state."""


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer(BatchLoss):
    """A preference-training run: ``Trainer(TrainConfig(...)).train()``."""

    def __init__(self, config: TrainConfig):
        V.check_config(config)
        report.silence_third_party_progress()
        self.config = config
        self.spec = loss_spec(config.loss)  # what this loss needs (data, reference, rows)
        self.kind = self.spec.data
        self.resume_state = V.check_resume(config) if config.resume_from else None
        self._init_distributed()
        if self.resume_state is not None and self.resume_state.get("world", 1) != self.world:
            raise ValueError(
                f"--resume-from {config.resume_from} was saved by {self.resume_state['world']} "
                f"processes, this run has {self.world}: the data order would differ"
            )
        dataset = V.load_dataset(config.dataset, self.kind, config.seed, V.text_columns(config))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.output_dir = Path(config.output_dir or f"runs/{config.loss}-{stamp}")
        V.check_output_dir(self.output_dir, config.resume_from)
        missing = [p for p in (self.output_dir, *self.output_dir.parents) if not p.exists()]
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._setup(dataset)
        except BaseException:
            if missing and self.rank == 0:  # leave no empty or half-made run directory
                shutil.rmtree(missing[-1], ignore_errors=True)
            raise

    def _init_distributed(self) -> None:
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or self.config.fsdp
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.device = torch.device(
            f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        )

    def _setup(self, dataset) -> None:
        if self.rank == 0:
            C.remove_stale_temporaries(self.output_dir)
        _seed_everything(self.config.seed)
        self.is_default = self.config.model is None
        self._setup_tokenizer()
        self._setup_data(dataset)
        self._setup_model()
        self._setup_reference()
        self._setup_parallel()
        self._setup_optimizer()
        self.step, self.window, self.before = 0, [], None
        if self.resume_state is not None:
            C.restore_run(self, self.resume_state)

    # ------------------------------------------------------------------ setup
    def _setup_tokenizer(self) -> None:
        if self.is_default:
            from .default import default_tokenizer

            self.tokenizer = default_tokenizer()
        else:
            from transformers import AutoTokenizer

            self.tokenizer = P.from_pretrained(AutoTokenizer, self.config.model, "--model")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _setup_data(self, dataset) -> None:
        cfg = self.config
        sample_column = None
        self.needs_default_samples = False
        if self.spec.samples and cfg.lam > 0:
            if cfg.sample_column not in dataset["train"].column_names:
                if not self.is_default:
                    raise ValueError(
                        f"TYPO needs reference samples in column {cfg.sample_column!r}; "
                        "generate them with `fastalign sample` or pass --lam 0"
                    )
                self.needs_default_samples = True
            sample_column = cfg.sample_column
        self.collator = D.Collator(
            self.tokenizer,
            self.kind,
            cfg.max_prompt_length,
            cfg.max_completion_length,
            sample_column,
            packing=cfg.packing,
            kl_offset=cfg.kto_kl_offset,
        )
        self.train_set = D.drop_empty(dataset["train"], self.collator, self.kind)
        V.check_rows_for_batch(len(self.train_set), cfg, self.world)
        self.train_set = self.train_set.add_column("index", list(range(len(self.train_set))))
        self.test_set = dataset["test"] if "test" in dataset else None
        if cfg.eval_dataset:
            self.test_set = V.load_eval_dataset(cfg, self.kind)
        if self.kind == "unpaired":  # KTO's class weights λ_D, λ_U from the data set
            labels = self.train_set["label"]
            n_d, n_u = sum(labels), len(labels) - sum(labels)
            weights = (1.0, 1.0) if n_d == 0 or n_u == 0 else losses.kto_class_weights(n_d, n_u)
            self.desirable_weight = (
                weights[0] if cfg.desirable_weight is None else cfg.desirable_weight
            )
            self.undesirable_weight = (
                weights[1] if cfg.undesirable_weight is None else cfg.undesirable_weight
            )

    def _setup_model(self) -> None:
        """The policy: fresh (the default, SFT-warmed), or from ``--model``, or as the resumed
        checkpoint left it (a LoRA adapter restored as trainable on its base)."""
        from transformers import AutoModelForCausalLM

        cfg = self.config
        resume = Path(cfg.resume_from) if cfg.resume_from else None
        if self.is_default and resume is None:
            from .default import default_model

            self.model = default_model(self.tokenizer, seed=cfg.seed)
        else:
            self.model = P.from_pretrained(AutoModelForCausalLM, *self._policy_source(resume))
        lm_head(self.model)  # a clear error for models without one
        self._place(self.model)
        if cfg.activation_checkpointing:
            # Non-reentrant, on every decoder layer; before any fully_shard (transformers
            # checkpoints the layer's ``forward``, so FSDP2's hooks stay outside the recompute).
            enable_activation_checkpointing(self.model)
        self.logp_options = LogpOptions.from_config(
            self.model.config, shift=True, backend=cfg.backend
        )
        self.packed_attention = self._prepare_packing(self.model)
        if self.needs_default_samples:  # TYPO on the default: from the initial random model
            initial = self.model if resume is None else None  # None: rebuilt from the seed
            self.train_set, self.test_set = (
                P.default_samples(initial, self.tokenizer, split, self.config, self.device)
                for split in (self.train_set, self.test_set)
            )
        if self.is_default and resume is None and cfg.sft_warmup_steps > 0:
            self._sft_warmup()
        if cfg.disable_dropout:  # before LoRA: an explicit --lora-dropout still applies
            P.disable_dropout(self.model)
        if cfg.lora_rank > 0:
            self.model = P.with_lora(self.model, cfg, resume)

    def _policy_source(self, resume: Path | None) -> tuple[str | Path, str]:
        """Where the policy (a LoRA run: its base) loads from, and the flag that named it."""
        if resume is None or (self.config.lora_rank and not self.is_default):
            return self.config.model, "--model"
        # A LoRA checkpoint holds the adapter in model/, and the embedded default's base
        # (SFT-warmed, so not reproducible from --model) in base/.
        return resume / ("base" if self.config.lora_rank else "model"), "--resume-from"

    def _place(self, model) -> None:
        """Move ``model`` to the training device, except a real model under FSDP: that stays
        on the CPU (a whole 30B model does not fit one GPU) and fully_shard moves each
        group's shard to the GPU as it shards it."""
        if not self.config.fsdp or self.is_default:
            model.to(self.device)

    def _prepare_packing(self, model) -> str | None:
        """The packed-attention mode of ``model`` (None without packing); see prepare_packing."""
        if not self.config.packing:
            return None
        half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
        # flash-attn has no fp32 kernels: only switch to it when the body runs in half precision
        return prepare_packing(model, prefer_flash=half or self.config.bf16)

    def _sft_warmup(self) -> None:
        if self.kind == "paired":
            pairs = [(r["prompt"], r["chosen"]) for r in self.train_set]
        else:
            pairs = [(r["prompt"], r["completion"]) for r in self.train_set if r["label"]]
        cfg = self.config
        P.sft_warmup(
            self.model,
            pairs,
            self.tokenizer,
            self.collator.pad_id,
            steps=cfg.sft_warmup_steps,
            seed=cfg.seed,
            backend=cfg.backend,
        )

    def _needs_reference(self) -> bool:
        """Whether the loss reads a reference policy (the loss table's verdict)."""
        return self.spec.reference(self.config)

    def _setup_reference(self) -> None:
        if not self._needs_reference():  # reference-free: no copy made, loaded or saved
            self.reference, self.ref_model, self.ref_logps = R.Reference(), None, None
            return
        record = self.resume_state["reference"] if self.resume_state else None
        splits = {"train": self.train_set}
        if self.test_set is not None:
            splits["test"] = self.test_set
        self.reference = R.for_run(
            self.config, self.model, splits, self.output_dir, self.rank, record, self._score
        )
        self.ref_model, self.ref_logps = self.reference.model, self.reference.logps
        if self.ref_model is not None:
            self._place(self.ref_model)
            self.ref_model.eval().requires_grad_(False)
            if self.config.disable_dropout:  # --ref-model or a reloaded copy: as the policy
                P.disable_dropout(self.ref_model)
            self.ref_packed_attention = self._prepare_packing(self.ref_model)

    def _score(self, split) -> torch.Tensor:
        """Reference log-probs ``[n, 2]`` of ``split`` under the initial policy."""
        return R.score_dataset(
            self.model,
            split,
            self.collator,
            batch_size=self.config.batch_size,
            packed_attention=self.packed_attention,
            options=self.logp_options,
        )

    def _setup_parallel(self) -> None:
        cfg = self.config
        coef = cfg.router_aux_loss_coef if cfg.router_aux_loss else 0.0
        self.body = HiddenStates(
            self.model, self.packed_attention, router_loss=router_aux_loss(self.model, coef)
        )
        self.ref_body = None
        if self.ref_model is not None:
            self.ref_body = HiddenStates(self.ref_model, self.ref_packed_attention)
        self.train_body = self.body
        self.fsdp_root = None
        if cfg.fsdp:
            from . import fsdp

            mp_policy = fsdp.mixed_precision(self.device, cfg.bf16)
            self.fsdp_root = fsdp.shard(self.model, self.ref_model, mp_policy)
        elif self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # DDP wraps the hidden-state forward; the lm_head weight, read by the fused loss,
            # is a parameter of the same module, so its gradient is all-reduced too.
            self.train_body = DistributedDataParallel(self.body)

    def _setup_optimizer(self) -> None:
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        warmup = max(1, int(cfg.warmup_ratio * cfg.max_steps))

        def schedule(step):
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, cfg.max_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    # ------------------------------------------------------------------ data order
    def _batches(self, epoch: int):
        """Deterministic per-epoch order (seed + epoch), sharded over ranks."""
        order = torch.randperm(
            len(self.train_set), generator=torch.Generator().manual_seed(self.config.seed + epoch)
        )
        order = order[self.rank :: self.world].tolist()
        size = self.config.batch_size
        for start in range(0, len(order) - size + 1, size):
            rows = [self.train_set[i] for i in order[start : start + size]]
            batch = self.collator(rows)
            batch["index"] = torch.tensor([r["index"] for r in rows])
            yield batch

    def _stream(self):
        """Endless microbatches, resumable from ``self.step``."""
        per_epoch = max(1, (len(self.train_set) // self.world) // self.config.batch_size)
        consumed = self.step * self.config.grad_accum
        epoch, skip = divmod(consumed, per_epoch)
        while True:
            for i, batch in enumerate(self._batches(epoch)):
                if i >= skip:
                    yield batch
            epoch, skip = epoch + 1, 0

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (reward accuracy for paired losses) on the test split."""
        if self.test_set is None or len(self.test_set) < 2:
            return {}
        self.model.eval()
        totals, count = {}, 0
        rows = list(self.test_set)
        for start in range(0, len(rows) - 1, self.config.batch_size):
            chunk = rows[start : start + self.config.batch_size]
            if len(chunk) < 2:
                continue
            batch = self.collator(chunk)
            batch["index"] = torch.arange(start, start + len(chunk))
            out = self.compute(batch, train=False)
            for name, value in {"loss": float(out.loss), **out.metrics()}.items():
                totals[name] = totals.get(name, 0.0) + value * len(chunk)
            count += len(chunk)
        self.model.train()
        return {f"eval/{k}": v / count for k, v in totals.items()}

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Path) -> Path | None:
        """Write a checkpoint atomically (see ``checkpoint.save_run``); None on ranks > 0."""
        return C.save_run(self, path)

    def _save_step(self) -> Path | None:
        path = self.save(self.output_dir / f"checkpoint-{self.step}")
        if self.rank == 0:
            C.rotate(self.output_dir, self.config.save_total_limit)
        return path

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train to ``max_steps``; returns the summary (``before/…``, ``after/…``, ``steps``).

        On a first SIGINT/SIGTERM the current step finishes, ``checkpoint-N`` is saved and the
        summary has ``interrupted`` (the signal's name), ``signal`` and ``checkpoint``."""
        cfg = self.config
        if self.before is None:
            self.before = self.evaluate()
        stream = self._stream()
        self.run_log = log = report.RunLog(
            self.output_dir, cfg, self.step, rank0=self.rank == 0, window=self.window
        )
        after = None
        try:
            with StopRequest() as stop:
                while self.step < cfg.max_steps:
                    log.step(self._train_step(stream))
                    signum = agreed_signal(stop.signum, self.distributed, self.device)
                    if signum:
                        return self._stopped(signum)
                    if (
                        cfg.eval_steps
                        and self.step % cfg.eval_steps == 0
                        and (held := self.evaluate())
                    ):
                        log.record({**held, "step": self.step})
                    if cfg.save_steps and self.step % cfg.save_steps == 0:
                        self._save_step()
                self.save(self.output_dir / "final")  # a signal now lets it finish
            after = self.evaluate()
        finally:
            log.close(after, self.step)
        summary = {
            **{f"before/{k}": v for k, v in self.before.items()},
            **{f"after/{k}": v for k, v in after.items()},
            "steps": self.step,
        }
        if self.rank == 0:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _train_step(self, stream) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` microbatches; its metrics."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        step_metrics = []
        for micro in range(cfg.grad_accum):
            batch = next(stream)
            out = self.compute(batch)
            if not torch.isfinite(out.loss):
                raise DivergedError(
                    f"non-finite loss {float(out.loss.detach())} at step {self.step + 1}, "
                    f"microbatch {micro} (rows {batch['index'].tolist()}); no checkpoint was "
                    "written: lower --learning-rate (or --max-grad-norm), or resume from an "
                    "earlier checkpoint-N"
                )
            (out.loss / cfg.grad_accum).backward()
            self.run_log.add_batch(batch)  # tokens/s
            step_metrics.append({"loss": float(out.loss.detach()), **out.metrics()})
        # On FSDP's DTensor gradients this is the global norm of the sharded gradients.
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm
        )
        if self.fsdp_root is not None:
            from .fsdp import total_norm

            grad_norm = total_norm(grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        merged = {
            k: float(np.mean([m[k] for m in step_metrics if k in m])) for k in step_metrics[0]
        }
        merged.update(
            grad_norm=float(grad_norm),
            learning_rate=self.scheduler.get_last_lr()[0],
            step=self.step,
        )
        return merged

    def _stopped(self, signum: int) -> dict:
        """Save ``checkpoint-N`` after a stop signal; the summary says where."""
        import signal

        path = self.output_dir / f"checkpoint-{self.step}"
        if not C.is_complete(path):
            self._save_step()
        name = signal.Signals(signum).name
        return {"steps": self.step, "interrupted": name, "signal": signum, "checkpoint": str(path)}
