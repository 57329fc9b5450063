"""What a provider's 200 carried, read the same way for online replies (client.py) and for the
lines of a batch's output file (batch.py); which statuses are worth asking again."""

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


class _Malformed(Exception):
    """A 200 whose body is not a usable completion."""


def _reply(resp: Any, prompt_estimate: int) -> Reply:
    """Read a completion, tolerating what providers leave out; a body with no message is malformed."""
    choices = getattr(resp, "choices", None)
    if not choices:
        raise _Malformed("a 200 reply with no choices")
    choice = choices[0]
    message = getattr(choice, "message", None)
    if message is None:
        raise _Malformed("a 200 reply whose choice has no message")
    text = message.content or ""
    usage = getattr(resp, "usage", None)
    prompt_tokens = getattr(usage, "prompt_tokens", None)
    completion_tokens = getattr(usage, "completion_tokens", None)
    usage_dict = {
        # Missing usage is estimated (≈4 characters a token) so the cost is never counted as zero.
        "prompt_tokens": int(prompt_tokens) if prompt_tokens is not None else prompt_estimate,
        "completion_tokens": int(completion_tokens)
        if completion_tokens is not None
        else estimate_tokens(text),
    }
    logprobs = None
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if content:
        logprobs = [{a.token: a.logprob for a in (t.top_logprobs or [])} for t in content]
    return Reply(text, usage_dict, logprobs, choice.finish_reason, getattr(resp, "id", None))
