"""Run TRL's own DPO/KTO loss-and-metric code on given per-sequence log-probs.

TRL computes its losses inside ``*Trainer._compute_loss``; we call that method with a
minimal stand-in trainer and a model whose fused-head output carries our log-probs, so the
comparison uses TRL's code and not a re-implementation of it.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch

_dpo_module = __import__("trl.trainer.dpo_trainer", fromlist=["DPOTrainer"])
_kto_module = __import__("trl.trainer.kto_trainer", fromlist=["KTOTrainer"])


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(model):
        return model


def _model(logps: torch.Tensor):
    """A callable returning fused-head outputs whose per-token log-probs sum to ``logps``."""

    def forward(**kwargs):
        rows = logps.shape[0]
        return SimpleNamespace(
            log_probs=logps.reshape(rows, 1).float(),
            entropy=torch.zeros(rows, 1),
            mean_logits=torch.zeros(rows, 1),
            is_top1=torch.zeros(rows, 1, dtype=torch.bool),
            aux_loss=None,
        )

    forward.training = True
    return forward


def _trainer(**attrs):
    base = dict(
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        ref_model=None,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    base.update(attrs)
    return SimpleNamespace(**base)


def _inputs(rows: int, **extra) -> dict:
    """A batch of ``rows`` two-token completions (ids and masks only; the model ignores them)."""
    ones = torch.ones(rows, 2, dtype=torch.long)
    batch = dict(
        input_ids=torch.zeros_like(ones), attention_mask=ones, completion_mask=ones.clone()
    )
    return {**batch, **extra}


def trl_dpo(chosen, rejected, ref_chosen, ref_rejected, *, beta, loss_type="sigmoid", eps=0.0):
    """``(loss, metrics)`` from TRL's DPOTrainer._compute_loss (precomputed reference)."""
    logps = torch.cat([chosen, rejected])
    model = _model(logps)
    rows = logps.shape[0]
    trainer = _trainer(
        model=model,
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=eps,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        use_weighting=False,
    )
    inputs = _inputs(
        rows, ref_chosen_logps=ref_chosen.float(), ref_rejected_logps=ref_rejected.float()
    )
    loss = _dpo_module.DPOTrainer._compute_loss(trainer, model, inputs, False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_kto(logps, ref_logps, desirable, kl_logps, ref_kl_logps, *, beta, w_d=1.0, w_u=1.0):
    """``(loss, metrics)`` from TRL's KTOTrainer._compute_loss (precomputed reference)."""
    model = _model(logps)
    rows = logps.shape[0]
    trainer = _trainer(
        model=model,
        beta=beta,
        loss_type="kto",
        calculate_KL=True,
        precompute_ref_logps=True,
        desirable_weight=w_d,
        undesirable_weight=w_u,
        _compute_kl_logps=lambda model, batch: kl_logps.float(),
    )
    inputs = _inputs(
        rows,
        label=desirable.clone(),
        ref_logps=ref_logps.float(),
        ref_KL_logps=ref_kl_logps.float(),
    )
    loss = _kto_module.KTOTrainer._compute_loss(trainer, model, inputs, False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}
