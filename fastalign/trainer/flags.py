"""Help text of every ``fastalign train`` flag, keyed by the TrainConfig field it sets
(the CLI appends each flag's default)."""

from __future__ import annotations

HELP = {
    "loss": "preference loss: dpo, ipo, kto (unpaired data), typo, simpo, orpo or cpo",
    "model": "policy: a local path or Hugging Face hub name (default: the embedded tiny "
    "Llama, SFT-warmed on the embedded data)",
    "dataset": ".json/.jsonl file or load_dataset name in a TRL format: prompt/chosen/"
    "rejected, chosen/rejected with an implicit prompt, or for kto prompt/completion/label; "
    "text or conversational (default: embedded one-digit addition)",
    "output_dir": "run directory (default: runs/<loss>-<date>-<time>)",
    "reference": "copy: frozen copy of the policy (or --ref-model); peft: the policy with its "
    "LoRA adapter disabled; precomputed: one pass, cached",
    "ref_model": "separate reference checkpoint for --reference copy (default: a copy of the "
    "policy)",
    "lora_rank": "> 0: train a LoRA adapter of this rank instead of all weights",
    "beta": "β: strength of the implicit KL penalty toward the reference",
    "loss_type": "dpo: one of TRL's 15 types or a comma list (sigmoid,sft); kto: kto or "
    "apo_zero_unpaired; cpo: sigmoid, hinge, ipo, simpo or alphapo (default: sigmoid / kto)",
    "loss_weights": "dpo: comma-separated weights, one per --loss-type entry (default: 1 each)",
    "label_smoothing": "dpo/simpo/cpo: ε (cDPO on dpo's sigmoid, where TRL ignores it; the "
    "flip rate of robust; EXO's and AOT's ε)",
    "rpo_alpha": "dpo: weight of the chosen rows' per-token NLL (RPO; = appending sft)",
    "ld_alpha": "dpo: LD-DPO's α in [0, 1] for tokens past the shorter completion",
    "use_weighting": "dpo: WPO weights from the policy's log Σ p² (same launch)",
    "f_divergence_type": "dpo: f-DPO divergence: reverse_kl, forward_kl, js_divergence or "
    "alpha_divergence",
    "f_alpha_divergence_coef": "dpo: α of alpha_divergence (default: 0.5)",
    "discopop_tau": "dpo: DiscoPOP's τ (default: 0.05)",
    "gamma": "simpo: target margin γ; cpo: simpo_gamma (default: 0.5)",
    "nll_weight": "simpo: weight of the chosen rows' per-token NLL (default: 0)",
    "cpo_alpha": "cpo: weight of the chosen rows' per-token NLL (default: 1)",
    "alphapo_alpha": "cpo: AlphaPO reward shape α (default: 0, log-prob rewards)",
    "lam": "typo: weight λ of the term on reference samples (0: no samples needed)",
    "sample_column": "typo: dataset column with reference samples (see fastalign sample)",
    "desirable_weight": "kto: λ_D (default: class balancing on the data, λ_D·n_D = λ_U·n_U; "
    "TRL's default is 1.0)",
    "undesirable_weight": "kto: λ_U (default: class balancing on the data; TRL's default is 1.0)",
    "learning_rate": "AdamW peak learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup_ratio": "fraction of --max-steps of linear warmup before the cosine decay",
    "max_steps": "optimizer steps to train",
    "batch_size": "sequences (pairs for paired losses) per microbatch on each process",
    "grad_accum": "microbatches accumulated per optimizer step",
    "max_grad_norm": "gradient clipping norm",
    "max_prompt_length": "prompt tokens kept (the end of longer prompts)",
    "max_completion_length": "completion tokens kept (the start of longer completions)",
    "seed": "seed of initialisation, data order and sampling",
    "logging_steps": "steps averaged into each metrics.jsonl line",
    "save_steps": "checkpoint every N steps (0: only at the end)",
    "save_total_limit": "checkpoint-N directories kept, the oldest deleted first (0: all)",
    "bf16": "bfloat16 autocast of the model body on CUDA",
    "activation_checkpointing": "recompute decoder layers in backward to save memory",
    "fsdp": "under torchrun: shard the model with FSDP2 instead of DDP",
    "sft_warmup_steps": "embedded default model only: SFT steps on the chosen answers first",
    "resume_from": "checkpoint directory to resume from (exactly: data order, RNG, optimizer)",
    "backend": "fused log-prob backend: auto (Triton on CUDA, torch elsewhere), triton, torch",
    "packing": "each microbatch as one padding-free row, attention kept per sequence",
    "progress": "show the progress bar",
    "eval_dataset": "held-out data (file or load_dataset name; its test split, else train) "
    "(default: the dataset's test split, if any)",
    "eval_steps": "evaluate every N steps, metrics under eval/... (0: before and after only)",
    "kto_kl_offset": "kto: mismatched pairs (x_i, y_(i+offset)) for the KL estimate: 1 as the "
    "paper and HALOs, -1 as TRL",
    "router_aux_loss": "MoE models: add router_aux_loss_coef × the router load-balancing loss "
    "(as TRL and transformers do)",
    "router_aux_loss_coef": "MoE models only: coefficient of the router loss (default: the "
    "model config's router_aux_loss_coef)",
    "lora_alpha": "with --lora-rank: LoRA α (default: 2 × --lora-rank)",
    "lora_dropout": "with --lora-rank: LoRA dropout",
    "disable_dropout": "turn the model's own dropout off in the policy and reference, as TRL's "
    "disable_dropout=True (every dropout module and the attention dropout); "
    "--no-disable-dropout keeps the model config's rates; --lora-dropout applies either way",
    "lora_target_modules": "with --lora-rank: modules given adapters: all-linear (every linear "
    "layer but the lm_head) or comma-separated names, e.g. q_proj,v_proj",
    "report_to": "also send metrics to: none, tensorboard or wandb (offline unless WANDB_MODE "
    "is set); needs pip install 'fastalign[tensorboard]' / '[wandb]'",
}
