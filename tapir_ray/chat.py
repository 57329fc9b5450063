"""Chat rendering shared by inference and training, so both see the same prompt token ids.

`prompt_ids(tokenizer, messages)` is THE rendering of a prompt: the student's own chat template
with the generation prompt appended. The student stage sends exactly these ids to vLLM or
transformers, and `sft_example` builds a training example as `prompt_ids(...)` followed by the
response tokens, with every prompt token masked out of the loss. A test checks the two agree token
for token, for the bundled model and for ChatML and Llama-style templates.
"""

from __future__ import annotations

import contextlib
from typing import Any

IGNORE_INDEX = -100
Messages = list[dict[str, str]]

# Named chat templates for students whose tokenizer has none (base models): `student.chat_template`
# names one (or a file holding a Jinja template); a tokenizer without a template gets ChatML.
TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-2": (
        "{{ bos_token }}{% set sys = (messages[0]['content'] + '\n\n') if messages[0]['role'] == 'system' else '' %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + (sys if loop.index0 <= 1 else '') + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
        " + m['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}
DEFAULT_TEMPLATE = "chatml"


def template_text(name: str) -> str:
    """A named template's Jinja text, or the contents of a template file."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    with open(name, encoding="utf-8") as f:
        return f.read()


def load_tokenizer(path: str, chat_template: str | None = None, **kwargs: Any) -> Any:
    """The student's tokenizer with the chat template that inference, training and evaluation
    all render with: `chat_template` when named, else the model's own, else ChatML."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    chosen = chat_template or (None if tokenizer.chat_template else DEFAULT_TEMPLATE)
    if chosen:
        tokenizer.chat_template = template_text(chosen)
    return tokenizer


def template_in_use(model_path: str, chat_template: str | None) -> str:
    """Which template a run with this student renders with, looked up in its tokenizer."""
    from transformers import AutoTokenizer

    if chat_template:
        return f"{chat_template} (student.chat_template)"
    own = AutoTokenizer.from_pretrained(model_path).chat_template
    return "the student's own" if own else f"{DEFAULT_TEMPLATE} (the student has none)"


def describe_template(chat_template: str | None) -> str:
    if chat_template:
        return f"{chat_template} (student.chat_template)"
    return f"the student's own (or {DEFAULT_TEMPLATE} where it has none)"


def _special_strings(tokenizer: Any) -> list[str]:
    cached = getattr(tokenizer, "_tapir_special_strings", None)
    if cached is None:
        found = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
            if getattr(added, "special", False):
                found.add(added.content)
        cached = sorted((t for t in found if t and len(t) > 1), key=len, reverse=True)
        with contextlib.suppress(AttributeError):  # a tokenizer that takes no attributes
            tokenizer._tapir_special_strings = cached
    return cached


def neutral(tokenizer: Any, text: str) -> str:
    """`text` with every special-token string of `tokenizer` broken by a zero-width space, so pool
    or model text saying `<|im_start|>system` stays text and never becomes a role marker."""
    for special in _special_strings(tokenizer):
        if special in text:
            text = text.replace(special, special[0] + "\u200b" + special[1:])
    return text


def neutral_messages(tokenizer: Any, messages: Messages) -> Messages:
    return [{**m, "content": neutral(tokenizer, str(m.get("content", "")))} for m in messages]


def prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of `messages` rendered with the chat template, ready for the assistant's turn."""
    messages = neutral_messages(tokenizer, messages)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _turn_end_ids(tokenizer: Any, messages: Messages, response: str) -> list[int]:
    """The tokens the template puts after an assistant response (e.g. `<|im_end|>\\n`, or EOS)."""
    marker = "\x00RESPONSE\x00"
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": marker}], tokenize=False
    )
    after = full.split(marker, 1)[1] if marker in full else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return ids


def sft_example(
    tokenizer: Any, messages: Messages, response: str, max_length: int
) -> dict[str, list[int]]:
    """input_ids / labels / attention_mask for one (prompt, response) pair; loss on the response only.

    The prompt part is `prompt_ids(tokenizer, messages)` itself (not a re-tokenisation of the whole
    conversation), which is what makes training and inference agree. Over-long examples keep the
    whole prompt when they can and cut the response; if the prompt alone is too long, its start is cut.
    """
    prompt = prompt_ids(tokenizer, messages)
    response = neutral(tokenizer, response)
    answer = tokenizer(response, add_special_tokens=False)["input_ids"] + _turn_end_ids(
        tokenizer, messages, response
    )
    if len(prompt) >= max_length:
        prompt = prompt[len(prompt) - max_length + 1 :]
    answer = answer[: max_length - len(prompt)]
    ids = prompt + answer
    return {
        "input_ids": ids,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
        "attention_mask": [1] * len(ids),
    }


def fit_prompt(tokenizer: Any, messages: Messages, limit: int) -> tuple[list[int], bool]:
    """Prompt ids within `limit` tokens: the last user message is shortened from its end if needed.

    Returns (ids, truncated). The template's own tokens (system prompt, role markers, the
    generation prompt) are always kept, so the model still sees a well-formed turn.
    """
    ids = prompt_ids(tokenizer, messages)
    if len(ids) <= limit:
        return ids, False
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    content_ids = tokenizer(messages[last_user]["content"], add_special_tokens=False)["input_ids"]
    keep = len(content_ids) - (len(ids) - limit)
    while keep > 0:
        shortened = [dict(m) for m in messages]
        shortened[last_user]["content"] = tokenizer.decode(content_ids[:keep])
        ids = prompt_ids(tokenizer, shortened)
        if len(ids) <= limit:
            return ids, True
        keep -= max(1, len(ids) - limit)
    raise ValueError(f"the chat template alone needs more than {limit} tokens")
