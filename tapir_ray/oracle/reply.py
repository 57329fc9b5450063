"""What a request's body holds and what a provider's 200 carried, the same for online requests
(client.py) and for the lines of a batch's files (batch.py); which statuses are worth asking again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tapir_ray.oracle.server import estimate_tokens

RETRY_STATUSES = {408, 409, 429}  # and every 5xx


@dataclass
class Reply:
    """What a 200 carried: the text, usage (estimated where the body had none), logprobs."""

    text: str
    usage: dict[str, int]
    logprobs: list[dict[str, float]] | None
    finish_reason: str | None
    response_id: str | None


def request_body(model: str, messages: list[dict], params: dict[str, Any]) -> dict[str, Any]:
    """A chat completion request's JSON body; `extra_body` (vLLM's options) is merged into it, as
    the openai library does."""
    extra = params.get("extra_body") or {}
    return {"model": model, "messages": messages,
            **{k: v for k, v in params.items() if k != "extra_body"}, **extra}  # fmt: skip


class _Malformed(Exception):
    """A 200 whose body is not a usable completion."""


def _reply(body: Any, prompt_estimate: int) -> Reply:
    """Read a completion body (the JSON object), tolerating what providers leave out; a body with
    no message is malformed. Read as plain JSON: the openai library's typed models cost more CPU
    per reply than the rest of a request (see client.py)."""
    if not isinstance(body, dict):
        raise _Malformed("a 200 reply whose body is not a JSON object")
    choices = body.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise _Malformed("a 200 reply with no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise _Malformed("a 200 reply whose choice has no message")
    text = message.get("content") or ""
    if not isinstance(text, str):
        raise _Malformed("a 200 reply whose message content is not text")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    usage_dict = {
        # Missing usage is estimated (≈4 characters a token) so the cost is never counted as zero.
        "prompt_tokens": int(prompt_tokens) if prompt_tokens is not None else prompt_estimate,
        "completion_tokens": int(completion_tokens)
        if completion_tokens is not None
        else estimate_tokens(text),
    }
    logprobs = None
    content = (choice.get("logprobs") or {}).get("content")
    if content:
        logprobs = [
            {a["token"]: a["logprob"] for a in (t.get("top_logprobs") or [])} for t in content
        ]
    return Reply(text, usage_dict, logprobs, choice.get("finish_reason"), body.get("id"))
