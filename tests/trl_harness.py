"""Build TRL trainers (stock and fastalign) on a tiny Llama from a config, and one step of each.

Shared by the TRL integration tests and the DDP test: fp32 on CPU, a character tokenizer
(no download), a Llama-style model with vocab 97, hidden 32 and 2 layers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import trl
from datasets import Dataset
from transformers import LlamaForCausalLM

from fastalign.integrations import trl as fa
from fastalign.trainer.default import default_tokenizer, tiny_config

TOKENIZER = default_tokenizer()
PAIRED = dict(
    prompt=["1+2=", "3+4+5=", "9=", "2+2+2+2=", "7+1=", "4="],
    chosen=["3", "12", "9", "8", "8", "4"],
    rejected=["4 ", "11", "99", "6", "9+", "5"],
)
UNPAIRED = dict(
    prompt=["1+2=", "3+4+5=", "9=", "2+2+2+2=", "7+1=", "4="],
    completion=["3", "11", "9", "6", "8", "44"],
    label=[True, False, True, False, True, False],
)


def tiny_llama(seed=0, tied=False, bias=False, softcap=None, logit_scale=None):
    """A random 2-layer Llama (hidden 32, vocab 97); optional lm_head bias and logit transform
    (TRL's fused head reads ``final_logit_softcapping``/``logit_scale`` from the config)."""
    torch.manual_seed(seed)
    config = tiny_config(
        TOKENIZER, vocab_size=97, hidden_size=32, num_key_value_heads=2, tie_word_embeddings=tied
    )
    config.final_logit_softcapping = softcap
    config.logit_scale = logit_scale
    model = LlamaForCausalLM(config)
    if bias:
        head = torch.nn.Linear(32, 97, bias=True)
        head.weight.data.copy_(model.lm_head.weight)
        head.bias.data.normal_(0, 0.5)
        # Make the digits the likeliest tokens so the top-1 metric sees hits and misses
        head.bias.data[TOKENIZER.convert_tokens_to_ids(list("0123456789"))] += 4.0
        model.lm_head = head
    return model


@dataclass
class Step:
    """One training step's loss, logged metrics and parameter gradients."""

    input_ids: torch.Tensor
    loss: float
    metrics: dict[str, float]
    grads: dict[str, torch.Tensor]


def make_trainers(kind: str, config: dict, model_kwargs=None, ref=True, peft=None, with_eval=False):
    """``(stock, fastalign)`` trainers of ``kind`` ("dpo"/"kto") on identical model copies."""
    model_kwargs = model_kwargs or {}
    policy = tiny_llama(0, **model_kwargs)
    ref_model = tiny_llama(1, **model_kwargs) if ref else None
    config_cls, data = (trl.DPOConfig, PAIRED) if kind == "dpo" else (trl.KTOConfig, UNPAIRED)
    defaults = dict(
        output_dir="/tmp/fastalign-trl-test",
        per_device_train_batch_size=3,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-2,
        dataset_num_proc=None,
    )
    args = config_cls(**{**defaults, **config})
    trainers = []
    for cls in (
        (trl.DPOTrainer, fa.DPOTrainer) if kind == "dpo" else (trl.KTOTrainer, fa.KTOTrainer)
    ):
        torch.manual_seed(2)  # same PEFT adapter initialisation for both
        trainers.append(
            cls(
                model=copy.deepcopy(policy),
                ref_model=copy.deepcopy(ref_model),
                args=args,
                train_dataset=Dataset.from_dict(data),
                eval_dataset=Dataset.from_dict(data) if with_eval else None,
                processing_class=TOKENIZER,
                peft_config=peft,
            )
        )
    return tuple(trainers)


def one_step(trainer) -> Step:
    """Loss, metrics and gradients of the trainer's first batch through ``compute_loss``."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {
        name: p.grad.detach().clone()
        for name, p in trainer.model.named_parameters()
        if p.grad is not None
    }
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return Step(batch["input_ids"].clone(), loss.item(), metrics, grads)


def assert_same_step(stock: Step, fast: Step, rtol: float = 1e-6) -> None:
    """Loss and every metric to ``rtol``; each parameter's gradient to ``rtol`` in norm."""
    assert torch.equal(fast.input_ids, stock.input_ids)
    assert abs(fast.loss - stock.loss) <= rtol * abs(stock.loss) + 1e-9, (fast.loss, stock.loss)
    assert fast.metrics.keys() == stock.metrics.keys()
    for key, want in stock.metrics.items():
        got = fast.metrics[key]
        assert abs(got - want) <= rtol * abs(want) + 1e-9, (key, got, want)
    assert fast.grads.keys() == stock.grads.keys() and stock.grads
    for name, want in stock.grads.items():
        error = float((fast.grads[name] - want).norm())
        assert error <= rtol * float(want.norm()) + 1e-12, (name, error, float(want.norm()))
