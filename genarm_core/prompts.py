"""Prompt and response tokenisation, shared by decoding, scoring and training so that all three
see identical token sequences."""
from __future__ import annotations


def as_messages(prompt, system_prompt: str | None = None) -> list[dict]:
    """A prompt is a string (one user turn) or a list of chat messages."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
    if system_prompt and messages and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_ids(tokenizer, prompt, chat_template: bool | str = True, system_prompt: str | None = None) -> list[int]:
    """Token ids that precede the model's answer: the chat template with the generation prompt
    (the tokenizer's, or a profile's own Jinja template when `chat_template` is a string), else
    the raw text (with the tokenizer's own special tokens)."""
    template = chat_template if isinstance(chat_template, str) else None
    if template or (chat_template and getattr(tokenizer, "chat_template", None)):
        text = tokenizer.apply_chat_template(as_messages(prompt, system_prompt), tokenize=False,
                                             add_generation_prompt=True, chat_template=template)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if not isinstance(prompt, str):
        prompt = "\n".join(m["content"] for m in prompt)
    return tokenizer(prompt)["input_ids"]


def response_ids(tokenizer, response: str, eos_id: int | None) -> list[int]:
    """The answer's tokens as the model would generate them, ended by EOS (when given)."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + ([eos_id] if eos_id is not None else [])


def prompt_is_empty(prompt) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    return not prompt or all(not str(m.get("content", "")).strip() for m in prompt)
