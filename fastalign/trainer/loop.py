"""A small, readable preference-training loop around the fused losses.

``Trainer(TrainConfig(...)).train()``: loads a causal LM (or the embedded default), a
reference policy (frozen copy, PEFT adapter disabled, or precomputed log-probs), the data in
TRL's formats, then runs AdamW with warmup+cosine, gradient accumulation and clipping, logs
TRL-named metrics to ``metrics.jsonl``, checkpoints and resumes exactly. Under ``torchrun``
it wraps the hidden-state forward in DDP, or with ``fsdp`` shards with FSDP2 (see ``fsdp.py``),
and all-reduces KTO's z0. With ``packing`` each microbatch is one padding-free row scored
through ``cu_seqlens``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import losses
from . import data as D
from . import report
from .model import (
    HiddenStates,
    adapters_disabled,
    add_router_loss,
    head_params,
    lm_head,
    logit_transform,
    lora_config,
    prepare_packing,
    router_aux_loss,
)

LOSSES = ("dpo", "ipo", "kto", "typo")
REFERENCES = ("copy", "peft", "precomputed")


@dataclass
class TrainConfig:
    """Every knob of a run; the CLI flags map one to one (``--max-steps`` → max_steps)."""

    loss: str = "dpo"
    model: str | None = None  # path or hub name; None: the embedded tiny default
    dataset: str | None = None  # .json/.jsonl path or load_dataset name; None: embedded
    output_dir: str | None = None
    reference: str = "copy"  # copy | peft | precomputed
    ref_model: str | None = None  # a separate reference checkpoint (default: copy of policy)
    lora_rank: int = 0  # > 0: train a LoRA adapter (peft) instead of all weights
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    lam: float = 0.05  # TYPO
    sample_column: str = "sample"  # TYPO: reference samples
    desirable_weight: float | None = None  # KTO; None: kto_class_weights on the data
    undesirable_weight: float | None = None
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_prompt_length: int = 256
    max_completion_length: int = 256
    seed: int = 0
    logging_steps: int = 10
    save_steps: int = 0  # 0: only at the end
    bf16: bool = False  # autocast on CUDA
    activation_checkpointing: bool = False
    fsdp: bool = False  # FSDP2 (fully_shard) under torchrun instead of DDP
    sft_warmup_steps: int = 300  # embedded default only: SFT the tiny model first
    resume_from: str | None = None
    backend: str = "auto"
    packing: bool = False  # each microbatch one row, no padding, attention kept per sequence
    progress: bool = True
    # issue 14: evaluation, KTO pairing, MoE router loss, LoRA targets, reporting
    eval_dataset: str | None = None  # file or load_dataset name: its test (else train) split
    eval_steps: int = 0  # > 0: evaluate every eval_steps steps (metrics under eval/...)
    kto_kl_offset: int = 1  # KTO mismatched pairs (x_i, y_(i+offset)): +1 paper, -1 TRL
    router_aux_loss: bool = True  # MoE: add router_aux_loss_coef x load-balancing loss
    router_aux_loss_coef: float | None = None  # None: the model config's own coefficient
    lora_alpha: float | None = None  # None: 2 x lora_rank
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"  # or comma-separated module names
    report_to: str = "none"  # none | tensorboard | wandb
    extra: dict = field(default_factory=dict)


class DivergedError(RuntimeError):
    """The loss became non-finite; no checkpoint was written from the diverged state."""


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _hidden(body, part: dict) -> torch.Tensor:
    """Body hidden states of one (sub-)batch: padded ``[B, T, H]``, or packed ``[N, H]``."""
    if "cu_seqlens" in part:
        return body(
            part["input_ids"], position_ids=part["position_ids"], cu_seqlens=part["cu_seqlens"]
        )
    return body(part["input_ids"], part["attention_mask"])


class Trainer:
    def __init__(self, config: TrainConfig):
        if config.loss not in LOSSES:
            raise ValueError(f"unknown loss {config.loss!r}; choose one of {', '.join(LOSSES)}")
        if config.reference not in REFERENCES:
            raise ValueError(f"unknown reference {config.reference!r}; choose {REFERENCES}")
        if config.reference == "precomputed" and config.loss == "kto":
            raise ValueError(
                "KTO's mismatched pairs change with every microbatch: use --reference copy or "
                "peft (precomputed reference log-probs are for dpo/ipo)"
            )
        if config.kto_kl_offset not in (1, -1):
            raise ValueError(f"kto_kl_offset must be 1 or -1, got {config.kto_kl_offset!r}")
        report.check_report_to(config.report_to)
        report.silence_third_party_progress()
        self.config = config
        self.kind = "unpaired" if config.loss == "kto" else "paired"
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if config.fsdp:  # FSDP needs a process group, even a one-process torchrun has one
            if "WORLD_SIZE" not in os.environ:
                raise ValueError("--fsdp shards over a process group: launch with torchrun")
            self.distributed = True
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.device = torch.device(
            f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.output_dir = Path(config.output_dir or f"runs/{config.loss}-{stamp}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _seed_everything(config.seed)
        self._setup_model()
        self._setup_data()
        self._setup_reference()
        self._setup_optimizer()
        self.step = 0
        if config.resume_from:
            self._load_checkpoint(Path(config.resume_from))

    # ------------------------------------------------------------------ setup
    def _setup_model(self) -> None:
        cfg = self.config
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.is_default = cfg.model is None
        source = cfg.model
        if cfg.resume_from:
            source = str(Path(cfg.resume_from) / "model")
        if self.is_default and not cfg.resume_from:
            from .default import default_model, default_tokenizer

            self.tokenizer = default_tokenizer()
            self.model = default_model(self.tokenizer, seed=cfg.seed)
        else:
            tok_source = cfg.model if cfg.model else str(Path(cfg.resume_from) / "model")
            self.tokenizer = AutoTokenizer.from_pretrained(tok_source)
            self.model = AutoModelForCausalLM.from_pretrained(source)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        lm_head(self.model)  # a clear error for models without one
        self._place(self.model)
        if cfg.activation_checkpointing:
            # Non-reentrant, on every decoder layer; before any fully_shard (transformers
            # checkpoints the layer's ``forward``, so FSDP2's hooks stay outside the recompute).
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        self.transform = logit_transform(self.model.config)
        self.packed_attention = self._prepare_packing(self.model)

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

    def _setup_data(self) -> None:
        cfg = self.config
        dataset = D.load(cfg.dataset, self.kind, seed=cfg.seed)
        for split in dataset:
            D.check_columns(dataset[split], self.kind, name=f"dataset[{split!r}]")
        sample_column = None
        if cfg.loss == "typo" and cfg.lam > 0:
            if cfg.sample_column not in dataset["train"].column_names:
                if not self.is_default:
                    raise ValueError(
                        f"TYPO needs reference samples in column {cfg.sample_column!r}; "
                        "generate them with `fastalign sample` or pass --lam 0"
                    )
                dataset = self._default_samples(dataset)
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
        self.train_set = self.train_set.add_column("index", list(range(len(self.train_set))))
        self.test_set = dataset["test"] if "test" in dataset else None
        if cfg.eval_dataset:
            evaluation = D.load(cfg.eval_dataset, self.kind, seed=cfg.seed)
            split = "test" if "test" in evaluation else "train"
            D.check_columns(evaluation[split], self.kind, name=f"eval_dataset[{split!r}]")
            self.test_set = evaluation[split]
        if cfg.loss == "kto":
            labels = self.train_set["label"]
            n_d, n_u = sum(labels), len(labels) - sum(labels)
            if n_d == 0 or n_u == 0:
                weights = (1.0, 1.0)
            else:
                weights = losses.kto_class_weights(n_d, n_u)
            self.desirable_weight = cfg.desirable_weight or weights[0]
            self.undesirable_weight = cfg.undesirable_weight or weights[1]

    def _default_samples(self, dataset):
        """TYPO on the embedded default: one reference sample per prompt, drawn once."""
        from .sample import sample_completions

        def add(split):
            prompts = split["prompt"]
            samples = sample_completions(
                self.model, self.tokenizer, prompts, max_new_tokens=3, seed=self.config.seed
            )
            return split.add_column(self.config.sample_column, samples)

        return type(dataset)({name: add(split) for name, split in dataset.items()})

    def _setup_reference(self) -> None:
        cfg = self.config
        if self.is_default and not cfg.resume_from and cfg.sft_warmup_steps > 0:
            self._sft_warmup(cfg.sft_warmup_steps)
        self.ref_model = None
        self.ref_logps = None
        if cfg.lora_rank > 0:
            from peft import get_peft_model

            self.model = get_peft_model(
                self.model,
                lora_config(
                    cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules
                ),
            )
        ref_dir = self.output_dir / "reference"
        if cfg.reference == "copy":
            if cfg.ref_model:
                from transformers import AutoModelForCausalLM

                self.ref_model = AutoModelForCausalLM.from_pretrained(cfg.ref_model)
            elif cfg.resume_from and (ref_dir / "config.json").exists():
                from transformers import AutoModelForCausalLM

                self.ref_model = AutoModelForCausalLM.from_pretrained(ref_dir)
            else:
                self.ref_model = copy.deepcopy(self.model)
                if hasattr(self.ref_model, "merge_and_unload"):
                    self.ref_model = self.ref_model.merge_and_unload()
                if self.rank == 0:
                    self.ref_model.save_pretrained(ref_dir)
            self._place(self.ref_model)
            self.ref_model.eval().requires_grad_(False)
            self.ref_packed_attention = self._prepare_packing(self.ref_model)
        elif cfg.reference == "peft":
            if not hasattr(self.model, "disable_adapter"):
                raise ValueError("--reference peft needs a LoRA adapter: pass --lora-rank > 0")
        else:
            self.ref_logps = {
                name: self._precompute_reference(ref_dir / f"ref_logps_{name}.pt", split)
                for name, split in (("train", self.train_set), ("test", self.test_set))
                if split is not None
            }
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

    def _sft_warmup(self, steps: int) -> None:
        """Embedded default only: teach the tiny random model the task format with SFT on
        the chosen answers, so the reference policy is a sensible starting point."""
        if self.kind == "paired":
            pairs = [(r["prompt"], r["chosen"]) for r in self.train_set]
        else:
            pairs = [(r["prompt"], r["completion"]) for r in self.train_set if r["label"]]
        encoded = [D.encode(p, c, self.tokenizer, 16, 8) for p, c in pairs]
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(self.config.seed)
        body = HiddenStates(self.model)
        for _ in range(steps):
            idx = torch.randint(len(encoded), (16,), generator=generator).tolist()
            batch = D.rows_to_batch([encoded[i] for i in idx], self.collator.pad_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            weight, bias = head_params(self.model)
            out = losses._common.score_streams(  # plain NLL through the fused op
                [
                    losses._common.StreamInput(
                        body(batch["input_ids"], batch["attention_mask"]),
                        weight,
                        batch["labels"],
                        bias=bias,
                    )
                ],
                shift=True,
                backend=self.config.backend,
            )[0]
            loss = -out.logps.sum() / out.num_tokens.sum().clamp_min(1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def _precompute_reference(self, path: Path, dataset) -> torch.Tensor:
        """Reference log-probs of every row of ``dataset`` ``[n, 2]`` (chosen, rejected),
        computed once with the initial policy and cached at ``path``."""
        if path.exists():
            return torch.load(path)
        body = HiddenStates(self.model, self.packed_attention).eval()
        weight, bias = head_params(self.model)
        device = weight.device  # the CPU for a real model still to be sharded by FSDP
        out = torch.zeros(len(dataset), 2)
        for start in range(0, len(dataset), self.config.batch_size):
            rows = [
                dataset[i] for i in range(start, min(start + self.config.batch_size, len(dataset)))
            ]
            batch = {k: v.to(device) for k, v in self.collator(rows)["policy"].items()}
            hidden = _hidden(body, batch)
            stream = losses._common.StreamInput(
                hidden, weight, batch["labels"], bias=bias, cu_seqlens=batch.get("cu_seqlens")
            )
            logps = losses._common.score_streams(
                [stream],
                shift=True,
                backend=self.config.backend,
                **self.transform,
            )[0].logps.cpu()
            n = len(rows)
            out[start : start + n, 0], out[start : start + n, 1] = logps[:n], logps[n:]
        body.train()
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            torch.save(out, path)
        return out

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

    # ------------------------------------------------------------------ one batch
    def _reference_hidden(self, part: dict) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_body is not None:
                return _hidden(self.ref_body, part)
            with adapters_disabled(self.model):
                return _hidden(self.body, part)

    def compute(self, batch: dict, train: bool = True):
        """The loss output for one collated batch (policy forward with autograd)."""
        if self.fsdp_root is None:
            return self._compute(batch, train)
        # Body and fused loss inside the FSDP root's forward: see fsdp.RootForward.
        out = self.fsdp_root(self._compute, batch, train)
        if not torch.is_grad_enabled():
            # No backward will reshard the root (reshard_after_forward=False for the root):
            # free it now, so the next forward gathers the parameters after optimizer steps.
            self.fsdp_root.reshard()
        return out

    def _compute(self, batch: dict, train: bool = True):
        # The policy forward, the body's first, records the MoE router loss (TRL adds it to
        # the loss of the policy's forward only, never the reference's or the KL pairs').
        self.body.aux_loss = None
        return add_router_loss(self._loss(batch, train), self.body)

    def _loss(self, batch: dict, train: bool = True):
        cfg = self.config
        policy = {k: v.to(self.device) for k, v in batch["policy"].items()}
        body = self.train_body if train else self.body
        autocast = torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and self.device.type == "cuda"
        )
        with autocast:
            hidden = _hidden(body, policy)
        weight, bias = head_params(self.model)
        hidden = hidden.to(weight.dtype)
        common = dict(bias=bias, shift=True, backend=cfg.backend, **self.transform)
        if "cu_seqlens" in policy:  # packed: hidden [N, H], labels [N]
            common["cu_seqlens"] = policy["cu_seqlens"]
        ref = {}
        if cfg.loss != "typo":
            if self.ref_logps is not None:
                rows = self.ref_logps["train" if train else "test"][batch["index"]]
                ref["ref_logps"] = torch.cat([rows[:, 0], rows[:, 1]]).to(self.device)
            else:
                ref["ref_hidden"] = self._reference_hidden(policy).to(weight.dtype)
                if self.ref_model is not None:  # the frozen copy's own lm_head
                    ref["ref_weight"], ref["ref_bias"] = head_params(self.ref_model)
        labels = policy["labels"]
        if cfg.loss == "dpo":
            return losses.dpo_loss_fused(
                hidden,
                weight,
                labels,
                beta=cfg.beta,
                loss_type=cfg.loss_type,
                label_smoothing=cfg.label_smoothing,
                **ref,
                **common,
            )
        if cfg.loss == "ipo":
            return losses.ipo_loss_fused(hidden, weight, labels, beta=cfg.beta, **ref, **common)
        if cfg.loss == "typo":
            sample = {}
            if "sample" in batch:
                s = {k: v.to(self.device) for k, v in batch["sample"].items()}
                sample = dict(
                    sample_hidden=_hidden(body, s),
                    sample_labels=s["labels"],
                    sample_cu_seqlens=s.get("cu_seqlens"),
                )
            return losses.typo_loss_fused(
                hidden, weight, labels, lam=cfg.lam if sample else 0.0, **sample, **common
            )
        kl = {}
        if "kl" in batch:
            k = {n: v.to(self.device) for n, v in batch["kl"].items()}
            with torch.no_grad():
                kl_hidden = _hidden(self.body, k)
            kl = dict(
                kl_hidden=kl_hidden,
                kl_labels=k["labels"],
                kl_ref_hidden=self._reference_hidden(k),
                kl_cu_seqlens=k.get("cu_seqlens"),
            )
        else:
            kl = dict(kl=0.0)
        with warnings.catch_warnings():
            # λ_D, λ_U were set on the whole data set (kto_class_weights, which warns there);
            # one microbatch's desirable/undesirable mix says nothing about that ratio.
            warnings.filterwarnings("ignore", message="λ_D·n_D/", category=UserWarning)
            return losses.kto_loss_fused(
                hidden,
                weight,
                labels,
                batch["desirable"].to(self.device),
                beta=cfg.beta,
                desirable_weight=self.desirable_weight,
                undesirable_weight=self.undesirable_weight,
                **ref,
                **kl,
                **common,
            )

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
    def save(self, path: Path) -> None:
        model_state, optimizer_state = None, self.optimizer.state_dict()
        if self.fsdp_root is not None:  # a collective: all ranks gather, rank 0 writes
            from .fsdp import full_state

            model_state, optimizer_state = full_state(self.model, self.optimizer)
        if self.rank != 0:
            return
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path / "model", state_dict=model_state)
        self.tokenizer.save_pretrained(path / "model")
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(),
                "step": self.step,
                "config": asdict(self.config),
            },
            path / "trainer_state.pt",
        )

    def _load_checkpoint(self, path: Path) -> None:
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        if self.fsdp_root is not None:  # full, parameter-name keyed (fsdp.full_state)
            from .fsdp import load_optimizer

            load_optimizer(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = state["step"]

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        cfg = self.config
        before = self.evaluate() if self.step == 0 else {}
        stream = self._stream()
        log = report.RunLog(self.output_dir, cfg, self.step, rank0=self.rank == 0)
        after = None
        try:
            while self.step < cfg.max_steps:
                log.step(self._train_step(stream, log))
                if cfg.eval_steps and self.step % cfg.eval_steps == 0 and (held := self.evaluate()):
                    log.record({**held, "step": self.step})
                if cfg.save_steps and self.step % cfg.save_steps == 0:
                    self.save(self.output_dir / f"checkpoint-{self.step}")
            self.save(self.output_dir / "final")
            after = self.evaluate()
        finally:
            log.close(after, self.step)
        summary = {
            **{f"before/{k}": v for k, v in before.items()},
            **{f"after/{k}": v for k, v in after.items()},
            "steps": self.step,
        }
        if self.rank == 0:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _train_step(self, stream, log: report.RunLog) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` microbatches; its metrics."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        step_metrics = []
        for micro in range(cfg.grad_accum):
            batch = next(stream)
            out = self.compute(batch)
            if not torch.isfinite(out.loss):
                raise DivergedError(
                    f"non-finite loss {float(out.loss)} at step {self.step + 1}, microbatch "
                    f"{micro} (rows {batch['index'].tolist()}); no checkpoint was written"
                )
            (out.loss / cfg.grad_accum).backward()
            log.add_batch(batch)
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
