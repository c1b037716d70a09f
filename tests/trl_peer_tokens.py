"""TRL's own DPO loss code on per-token log-probs (every loss type, lists with weights,
LD-DPO, WPO, f-divergences), differentiable back to our hidden states.

``DPOTrainer._compute_loss`` runs with a stand-in trainer whose policy and reference
"models" return given per-token log-prob grids (and WPO's ``log Σ p²``), so the loss, its
metrics and - through the grids - its gradients come from TRL's code.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.trl_peer import _dpo_module, _trainer


class _TokenModel:
    """A fused-lm-head stand-in returning ``[rows, T]`` per-token grids."""

    training = True
    is_gradient_checkpointing = False
    _modules: dict = {}  # read by accelerate when TRL checks for a PEFT model

    def __init__(self, token_logps, log_sum_sq=None):
        self.token_logps, self.log_sum_sq = token_logps, log_sum_sq

    def __call__(self, **kwargs):
        grid = self.token_logps.float()
        zeros = torch.zeros(grid.shape)
        return SimpleNamespace(
            log_probs=grid,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
            log_sum_sq_probs=None if self.log_sum_sq is None else self.log_sum_sq.float(),
            aux_loss=None,
        )


def trl_dpo_tokens(
    token_logps: torch.Tensor,  # [rows, T] policy, 0 where not scored; may require grad
    ref_token_logps: torch.Tensor,  # [rows, T]
    scored: torch.Tensor,  # bool [rows, T]
    *,
    beta: float,
    loss_type=("sigmoid",),
    loss_weights=None,
    label_smoothing: float = 0.0,
    ld_alpha: float | None = None,
    log_sum_sq: torch.Tensor | None = None,  # [rows, T] per-token log Σ p²: WPO on
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
):
    """``(loss tensor, metrics)`` from TRL 1.16's ``DPOTrainer._compute_loss``."""
    rows, seq_len = scored.shape
    loss_type = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    model = _TokenModel(token_logps, log_sum_sq)
    trainer = _trainer(
        model=model,
        ref_model=_TokenModel(ref_token_logps.detach()),
        beta=beta,
        loss_types=loss_type,
        loss_weights=list(loss_weights or [1.0] * len(loss_type)),
        label_smoothing=label_smoothing,
        ld_alpha=ld_alpha,
        precompute_ref_logps=False,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        use_weighting=log_sum_sq is not None,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=discopop_tau),
    )
    # TRL's mask is on input_ids [rows, T+1]; the scored grid is its [:, 1:] shift.
    completion_mask = torch.zeros(rows, seq_len + 1, dtype=torch.long)
    completion_mask[:, 1:] = scored.long()
    inputs = {
        "input_ids": torch.zeros(rows, seq_len + 1, dtype=torch.long),
        "attention_mask": torch.ones(rows, seq_len + 1, dtype=torch.long),
        "completion_mask": completion_mask,
    }
    loss = _dpo_module.DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}
