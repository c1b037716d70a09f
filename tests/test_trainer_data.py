"""Trainer data: every TRL dataset format tokenizes to exactly the ``input_ids``/``labels``
TRL 1.16's own DPOTrainer/KTOTrainer processing and collators produce."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer  # noqa: E402

from fastalign.trainer import data as D  # noqa: E402

# A Qwen2-style template that injects a default system prompt, and a Llama-2-style one that
# starts with {{ bos_token }} (the tokenizer then adds BOS to plain text as well).
QWEN_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ ' ' + m['content'] + eos_token }}{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% endif %}{% endfor %}"
)
CORPUS = [
    "The sky is blue. The grass is green. What color is the sky? It is blue.",
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nHi! How can I help?",
    "[INST] Where is the sun? [/INST] In the sky, far away. Two plus two is four.",
] * 4


def _tokenizer(style: str):
    """A byte-level BPE trained here (real merges, no download) in one of two styles."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    if style == "qwen":  # no BOS; EOS is the end-of-turn token
        return PreTrainedTokenizerFast(
            tokenizer_object=core,
            pad_token="<pad>",
            eos_token="<|im_end|>",
            chat_template=QWEN_TEMPLATE,
        )
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", special.index("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=BOS_TEMPLATE,
    )


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


PAIRED = {
    "plain": [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five, far away."},
    ],
    "conversational": [
        {"prompt": _user("What color is the sky?"), "chosen": _assistant("It is blue."),
         "rejected": _assistant("Green.")},
        {"prompt": [{"role": "system", "content": "Be short."}, *_user("Where is the sun?")],
         "chosen": _assistant("In the sky."), "rejected": _assistant("Hello there")},
    ],
    "implicit-plain": [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "Where is the sun? In the sky.", "rejected": "Where is the sun? Far away."},
    ],
    "implicit-conversational": [
        {"chosen": _user("What color is the sky?") + _assistant("Blue."),
         "rejected": _user("What color is the sky?") + _assistant("It is green.")},
        {"chosen": _user("Hello there") + _assistant("Hi!") + _user("Two plus two?")
         + _assistant("Four."),
         "rejected": _user("Hello there") + _assistant("Hi!") + _user("Two plus two?")
         + _assistant("Five.")},
    ],
}  # fmt: skip
UNPAIRED = {
    "plain": [
        {"prompt": "The sky is", "completion": " blue.", "label": True},
        {"prompt": "Two plus two is", "completion": " five.", "label": False},
        {"prompt": "Where is the sun?", "completion": " In the sky.", "label": True},
    ],
    "conversational": [
        {"prompt": _user("What color is the sky?"), "completion": _assistant("Blue."),
         "label": True},
        {"prompt": _user("Two plus two?"), "completion": _assistant("Five."), "label": False},
        {"prompt": [{"role": "system", "content": "Be short."}, *_user("Hello there")],
         "completion": _assistant("Hi! How can I help?"), "label": True},
    ],
}  # fmt: skip
UNPAIRED.update({f"from-{name}": rows for name, rows in PAIRED.items()})  # KTO unpairs these


def _trl_dataset(trainer_cls, rows, tokenizer, batch_size):
    """TRL's own _prepare_dataset, run on a stand-in trainer (no model is needed for it)."""
    stub = SimpleNamespace(
        _tokenizer=tokenizer, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0
    )
    args = SimpleNamespace(
        dataset_num_proc=None,
        max_length=None,
        truncation_mode="keep_start",
        per_device_train_batch_size=batch_size,
    )
    return trainer_cls._prepare_dataset(stub, Dataset.from_list(rows), tokenizer, args, "train")


def _labels(ids, completion_mask):
    return ids.masked_fill(completion_mask == 0, -100)


@pytest.mark.parametrize("style", ["qwen", "bos"])
@pytest.mark.parametrize("name", list(PAIRED))
def test_paired_rows_tokenize_as_trl(style, name):
    tokenizer = _tokenizer(style)
    rows = PAIRED[name]
    trl_rows = _trl_dataset(DPOTrainer, rows, tokenizer, len(rows))
    want = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(list(trl_rows))
    ours = D.normalize(Dataset.from_list(rows), "paired")
    got = D.Collator(tokenizer, "paired", 10_000, 10_000)(list(ours))["policy"]
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert torch.equal(got["labels"], _labels(want["input_ids"], want["completion_mask"]))
    scored = tokenizer.decode(got["input_ids"][0][got["labels"][0] != -100])
    assert "assistant" not in scored and "system" not in scored  # no template text scored
    if style == "bos":  # exactly one BOS per row, even with a {{ bos_token }} template
        assert (got["input_ids"] == tokenizer.bos_token_id).sum(1).tolist() == [1] * len(
            got["input_ids"]
        )


@pytest.mark.parametrize("style", ["qwen", "bos"])
@pytest.mark.parametrize("name", list(UNPAIRED))
def test_unpaired_rows_and_kl_pairs_tokenize_as_trl(style, name):
    tokenizer = _tokenizer(style)
    rows = UNPAIRED[name]
    trl_rows = list(_trl_dataset(KTOTrainer, rows, tokenizer, 4))
    want = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id)(trl_rows)
    ours = list(D.normalize(Dataset.from_list(rows), "unpaired"))
    assert [r["label"] for r in ours] == want["label"].tolist()
    got = D.Collator(tokenizer, "unpaired", 10_000, 10_000, kl_offset=-1)(ours)
    assert torch.equal(got["policy"]["input_ids"], want["input_ids"])
    assert torch.equal(got["policy"]["labels"], _labels(want["input_ids"], want["completion_mask"]))
    assert torch.equal(got["desirable"], want["label"])
    kl_want = _labels(want["KL_input_ids"], want["KL_completion_mask"])
    assert torch.equal(got["kl"]["input_ids"], want["KL_input_ids"])
    assert torch.equal(got["kl"]["labels"], kl_want)


def test_plain_text_gets_bos_only_where_the_tokenizer_adds_it():
    for style, first in (("qwen", None), ("bos", "<s>")):
        tokenizer = _tokenizer(style)
        encoded = D.encode("The sky is", " blue.", tokenizer, 100, 100)
        head = tokenizer.convert_ids_to_tokens(encoded.prompt[0])
        assert (head == first) if first else head not in ("<s>", "<pad>")
        assert encoded.completion[-1] == tokenizer.eos_token_id


def test_extract_prompt_backs_off_a_space_and_splits_messages():
    row = D.extract_prompt({"chosen": "Sky is blue", "rejected": "Sky is red"})
    assert row == {"prompt": "Sky is", "chosen": " blue", "rejected": " red"}
    row = D.extract_prompt(PAIRED["implicit-conversational"][1])
    assert len(row["prompt"]) == 3 and row["chosen"] == _assistant("Four.")


def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_the_completion():
    tokenizer = _tokenizer("qwen")
    full = D.encode(_user("What color is the sky?"), _assistant("It is blue."), tokenizer, 99, 99)
    cut = D.encode(_user("What color is the sky?"), _assistant("It is blue."), tokenizer, 4, 3)
    assert cut.prompt == full.prompt[-4:] and cut.completion == full.completion[:3]


def test_mixed_formats_and_missing_templates_are_rejected():
    tokenizer = _tokenizer("qwen")
    with pytest.raises(ValueError, match="both be text or both be conversational"):
        D.encode("The sky is", _assistant("blue"), tokenizer, 9, 9)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        D.encode(_user("hi"), _assistant("hello"), tokenizer, 9, 9)


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_trainer_runs_on_implicit_conversational_data(loss, tmp_path):
    """chosen/rejected conversations only: the prompt is extracted (and KTO unpairs them)."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from fastalign.trainer.loop import TrainConfig, Trainer

    tokenizer = _tokenizer("qwen")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = PAIRED["implicit-conversational"] * 2
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = Trainer(
        TrainConfig(
            loss=loss, model=str(tmp_path / "model"), dataset=str(tmp_path / "data.jsonl"),
            output_dir=str(tmp_path / "run"), max_steps=1, batch_size=4, progress=False,
        )
    )  # fmt: skip
    assert len(trainer.train_set) == (4 if loss == "dpo" else 8)
    first = trainer.train_set[0]
    assert first["prompt"][0]["role"] == "user"
    assert trainer.train()["steps"] == 1
