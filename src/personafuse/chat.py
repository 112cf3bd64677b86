"""The chat prompt, written once: what every caller (generation, training, serving, evaluation,
the data teachers) sends a causal LM for a query or a conversation, and the token ids that end a
reply.

* :func:`as_messages` — a query string or a message list as checked ``{"role", "content"}`` dicts;
* :func:`prompt_text` — the model's chat template with the generation prompt; for a tokenizer without
  one, a plain transcript (:func:`plain_transcript`); a :class:`RawPrompt` as it is;
* :func:`encode_prompts` — a left-padded batch of those texts for ``generate``;
* :func:`prompt_ids` — one prompt's ids (training masks them out of the labels; the server counts them);
* :func:`eos_token_ids` — the tokenizer's EOS and every EOS id of the model's generation config;
* :class:`Generation` — a reply as every generator returns it (model, evaluation subjects).

One definition matters: a prompt built one way in training and another at inference is a model
trained on text it never sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class RawPrompt(str):
    """Text sent to the model exactly as it is: a completion prompt, no chat template and no
    system prompt (benchmarks whose reference prompts a raw completion: lm-eval's default for
    GSM8K and GPQA, SafetyBench's and Shop-MMLU's own scripts). Tokenised with the tokenizer's
    special tokens, as lm-eval and ``transformers`` do by default."""


# A prompt is a plain user message, a whole chat (list of {"role", "content"}), or raw text.
Prompt = str | list[dict[str, str]]


def as_messages(prompt: Prompt, system: str | None = None) -> list[dict[str, str]]:
    """The prompt as chat messages; ``system`` is put first unless the chat already has one."""
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    else:
        msgs = [dict(m) for m in prompt]
        for i, m in enumerate(msgs):
            if "role" not in m or "content" not in m:
                raise ValueError(f"message {i} needs 'role' and 'content' keys, got {sorted(m)}")
    if system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_transcript(messages: Sequence[dict[str, str]]) -> str:
    """Prompt text for a tokenizer without a chat template (plain LMs): a lone user message as it
    is, a longer chat as ``role: content`` lines ending with ``assistant:``."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def prompt_text(tokenizer: Any, prompt: Prompt, system: str | None = None) -> str:
    """The text the model reads before its reply."""
    if isinstance(prompt, RawPrompt):
        return str(prompt)
    msgs = as_messages(prompt, system)
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return plain_transcript(msgs)


def adds_special_tokens(tokenizer: Any, prompt: Prompt | None = None) -> bool:
    """Whether prompt text is tokenised with the tokenizer's special tokens."""
    # A rendered chat template already holds its special tokens; a plain transcript or a raw
    # prompt gets the tokenizer's own (BOS), as a plain LM saw its text in pre-training.
    return isinstance(prompt, RawPrompt) or not has_chat_template(tokenizer)


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], system: str | None = None) -> Any:
    """Left-padded ``input_ids`` / ``attention_mask`` (PyTorch) for batched generation."""
    texts = [prompt_text(tokenizer, p, system) for p in prompts]
    special = {adds_special_tokens(tokenizer, p) for p in prompts}
    if len(special) > 1:  # one tokenizer call has one setting
        raise ValueError("a batch mixes raw prompts with chat prompts; send them in separate calls")
    return tokenizer(
        texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=special.pop() if special else True
    )


def prompt_ids(tokenizer: Any, prompt: Prompt, system: str | None = None) -> list[int]:
    """Token ids of one prompt, exactly as :func:`encode_prompts` writes them (without padding)."""
    return tokenizer(prompt_text(tokenizer, prompt, system), add_special_tokens=adds_special_tokens(tokenizer, prompt))["input_ids"]


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Ids that end a reply: the tokenizer's EOS, then each EOS id of the model's generation config
    (Llama 3 and Qwen2.5 stop on several), without repeats."""
    ids: list[int] = []
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None) if model is not None else None
    for i in [getattr(tokenizer, "eos_token_id", None), *(gen if isinstance(gen, list | tuple) else [gen])]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


@dataclass
class Generation:
    """One reply: its text and the ten routing weights it was generated under (``{pole: w}``;
    ``None`` for a model without experts), token counts where the generator knows them, and why it
    stopped (``"stop"``: an EOS id or stop text; ``"length"``: the token limit)."""

    text: str
    weights: dict[str, float] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    extra: dict[str, Any] = field(default_factory=dict)
