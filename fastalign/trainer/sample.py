"""Reference samples for TYPO: completions drawn from the reference model with ``generate``.

Prompts are tokenized as training tokenizes them (see ``data.encode_many``): plain text with
the tokenizer's own special tokens, conversations through the chat template with the
generation prompt; a conversational prompt gets an assistant message back.
"""

from __future__ import annotations

import torch

from .data import is_conversational


def prompt_ids(tokenizer, prompt) -> list[int]:
    """The token ids a completion of ``prompt`` follows (text or list of messages).

    Example:
        >>> from fastalign.trainer.default import default_tokenizer
        >>> prompt_ids(default_tokenizer(), "1+1=")  # this tokenizer adds no BOS
        [5, 14, 5, 15]
    """
    if isinstance(prompt, str):
        return tokenizer(text=prompt)["input_ids"]
    if not is_conversational(prompt):
        raise TypeError(
            f"a prompt must be text or a list of chat messages, got {type(prompt).__name__}"
        )
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational prompts need a tokenizer with a chat template")
    out = tokenizer.apply_chat_template(
        prompt, tokenize=True, return_dict=True, add_generation_prompt=True
    )
    return list(out["input_ids"])


def _left_padded(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` ``[B, T]``, left-padded (generate appends on the right)."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, ids in enumerate(rows):
        if ids:
            input_ids[i, length - len(ids) :] = torch.tensor(ids)
            attention_mask[i, length - len(ids) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: list,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> list:
    """One sampled completion per prompt: decoded text (special tokens removed) for a text
    prompt, ``[{"role": "assistant", "content": text}]`` for a conversational one."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    texts = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = _left_padded([prompt_ids(tokenizer, p) for p in chunk], pad_id, device)
            generated = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_k=top_k or None,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = generated[:, enc["input_ids"].shape[1] :]
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [
        [{"role": "assistant", "content": text}] if is_conversational(p) else text
        for p, text in zip(prompts, texts)
    ]
