"""fastalign's TRL DPOTrainer in two CPU processes over gloo (DDP) equals one process.

Loss, grad norm, every logged metric and the SGD step equal the single process's and stock
TRL's DDP run's (1e-6; measured: metrics <1e-7, step ~2e-7 of its norm). Per-sequence losses
only (sigmoid + IPO): TRL's ``sft`` term is a token mean per rank, which DDP's mean of rank
losses does not reproduce, with or without fastalign. ``bf16=False`` is needed: TRL's
``_BaseConfig.__post_init__`` (trl/trainer/base_config.py) defaults ``bf16`` to True, and
accelerate's ``Accelerator.prepare_model`` then wraps ``model.forward`` in a bf16
``torch.autocast`` even on CPU: each decoder Linear then runs in bf16 per rank batch, and the
two ranks' averaged gradients differ from one batch's by ~2e-3 per decoder matrix, ~9e-4 of
the whole step (measured with bf16, stock TRL and fastalign alike; fp32: ~2e-7).
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("trl")

from tests import trl_harness as H  # noqa: E402
from tests.distributed import free_port, set_rank_env  # noqa: E402

CONFIG = dict(max_steps=1, optim="sgd", learning_rate=0.5, loss_type=["sigmoid", "ipo"],
              loss_weights=[1.0, 0.5], seed=3, bf16=False)  # fmt: skip
METRICS = ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "entropy", "logits/rejected", "mean_token_accuracy",
           "num_tokens")  # fmt: skip


def _train(trainer_cls, batch_size: int, out_dir: str):
    """One SGD step; ``(first log entry, parameters after the step, fastalign calls)``."""
    from datasets import Dataset

    from fastalign.integrations import trl as fa

    fa.ROUTING.clear()
    args = H.trl.DPOConfig(output_dir=out_dir, per_device_train_batch_size=batch_size,
                           report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                           **CONFIG)  # fmt: skip
    model = H.tiny_llama(0)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = trainer_cls(
        model=model,
        ref_model=H.tiny_llama(1),
        args=args,
        train_dataset=Dataset.from_dict({key: rows[:4] for key, rows in H.PAIRED.items()}),
        processing_class=H.TOKENIZER,
    )
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    steps = {name: p.detach() - initial[name] for name, p in model.named_parameters()}
    return trainer.state.log_history[0], steps, fa.ROUTING["fastalign"]


def _worker(rank, world, port, out_dir, results):
    set_rank_env(rank, world, port)
    from fastalign.integrations import trl as fa

    try:
        results[rank] = dict(
            stock=_train(H.trl.DPOTrainer, 2, out_dir), fast=_train(fa.DPOTrainer, 2, out_dir)
        )
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _step_error(steps, want) -> float:
    """``‖Δ − Δ_want‖ / ‖Δ_want‖`` over all parameters."""
    error = sum(float((steps[name] - step).square().sum()) for name, step in want.items())
    return (error / sum(float(step.square().sum()) for step in want.values())) ** 0.5


def test_two_gloo_processes_match_one(tmp_path):
    from fastalign.integrations import trl as fa

    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), results), nprocs=2, join=True)
    single_log, single_steps, routed = _train(fa.DPOTrainer, 4, str(tmp_path))
    assert routed == 2  # policy and reference, one call each
    for rank in (0, 1):
        stock_log, stock_steps, stock_routed = results[rank]["stock"]
        assert stock_routed == 0
        log, steps, routed = results[rank]["fast"]
        assert routed == 2  # each rank scored its own rows with fastalign
        for key in METRICS:
            assert log[key] == pytest.approx(single_log[key], rel=1e-6, abs=1e-9), key
            assert log[key] == pytest.approx(stock_log[key], rel=1e-6, abs=1e-9), key
        assert _step_error(steps, stock_steps) < 1e-6
        # fp32 (bf16=False): both DDP steps equal one process's (measured ~2e-7)
        assert _step_error(stock_steps, single_steps) < 1e-6
        assert _step_error(steps, single_steps) < 1e-6
