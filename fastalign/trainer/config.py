"""The settings of a training run, one field per ``fastalign train`` flag."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # The loss's variant(s) and options (fastalign/trainer/loss_table.py says which loss reads
    # which); None: the loss's default. DPO: --loss-type sigmoid,sft --loss-weights 1,0.5.
    loss_type: str | None = None
    loss_weights: str | None = None  # DPO: comma-separated, one per --loss-type entry
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None  # DPO: weight of the chosen rows' NLL
    ld_alpha: float | None = None  # DPO: LD-DPO's α
    use_weighting: bool = False  # DPO: WPO weights
    f_divergence_type: str | None = None  # DPO: f-DPO's divergence
    f_alpha_divergence_coef: float | None = None
    discopop_tau: float | None = None
    gamma: float | None = None  # SimPO's margin γ; CPO's simpo_gamma
    nll_weight: float | None = None  # SimPO: weight of the chosen rows' NLL
    cpo_alpha: float | None = None  # CPO: weight of the chosen rows' NLL
    alphapo_alpha: float | None = None  # CPO: AlphaPO's reward shape
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
    save_steps: int = 0  # 0: only at the end (and on SIGINT/SIGTERM)
    save_total_limit: int = 2  # checkpoint-N directories kept (oldest deleted); 0: all
    bf16: bool = False  # autocast on CUDA
    activation_checkpointing: bool = False
    fsdp: bool = False  # FSDP2 (fully_shard) under torchrun instead of DDP
    sft_warmup_steps: int = 300  # embedded default only: SFT the tiny model first
    resume_from: str | None = None
    backend: str = "auto"
    packing: bool = False  # each microbatch one row, no padding, attention kept per sequence
    progress: bool = True
    eval_dataset: str | None = None  # file or load_dataset name: its test (else train) split
    eval_steps: int = 0  # > 0: evaluate every eval_steps steps (metrics under eval/...)
    kto_kl_offset: int = 1  # KTO mismatched pairs (x_i, y_(i+offset)): +1 paper, -1 TRL
    router_aux_loss: bool = True  # MoE: add router_aux_loss_coef x load-balancing loss
    router_aux_loss_coef: float | None = None  # None: the model config's own coefficient
    lora_alpha: float | None = None  # None: 2 x lora_rank
    lora_dropout: float = 0.0
    disable_dropout: bool = True  # as TRL: the model's own dropout off (not --lora-dropout)
    lora_target_modules: str = "all-linear"  # or comma-separated module names
    report_to: str = "none"  # none | tensorboard | wandb
    extra: dict = field(default_factory=dict)
