"""One oracle call, done properly: cache, shared rate limit, retries, parse-and-repair, ledger.

    cache hit? → answer, no request, no cost
    reserve from the endpoint's limiter → send (openai async client, many in flight)
      429            → pause the whole endpoint for Retry-After, retry
      5xx, timeout,
      dropped conn.,
      broken body    → exponential backoff with jitter, retry up to max_retries
      400/401/403/404,
      content policy → no retry
    parse the reply → on failure one repair request, then the dead-letter
    usage → reconcile the limiter's token estimate; cost → ledger

Whatever finally fails becomes a DeadLetter (row id, role, status, reason): never a default value.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import openai

from tapir_ray.config import EndpointConfig
from tapir_ray.oracle.cache import ResponseCache, cache_key
from tapir_ray.oracle.ledger import empty_entry
from tapir_ray.oracle.prompts import ParseError
from tapir_ray.oracle.server import estimate_tokens

NO_RETRY = (
    openai.BadRequestError,
    openai.AuthenticationError,
    openai.PermissionDeniedError,
    openai.NotFoundError,
)
RETRY = (
    openai.InternalServerError,
    openai.APITimeoutError,
    openai.APIConnectionError,
    openai.APIResponseValidationError,
)
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.5, 30.0


@dataclass
class Answer:
    text: str
    parsed: Any
    usage: dict[str, int]
    cached: bool
    logprobs: list[dict[str, float]] | None = None


@dataclass
class DeadLetter:
    row_id: str
    role: str
    status: str
    reason: str
    attempts: int


@dataclass
class Delta:
    """What this actor adds to the ledger between two flushes."""

    counts: dict[str, Any] = field(default_factory=empty_entry)

    def add(self, key: str, n: float = 1) -> None:
        self.counts[key] += n


def _retry_after(exc: openai.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after") if exc.response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _is_refusal(exc: openai.APIStatusError) -> bool:
    text = json.dumps(exc.body) if exc.body is not None else str(exc)
    return "content_policy" in text or "content_filter" in text


class OracleClient:
    def __init__(
        self,
        endpoint: EndpointConfig,
        base_url: str,
        *,
        limiter,
        cache: ResponseCache | None,
        seed: int = 0,
        identity: str | None = None,
    ):
        self.endpoint = endpoint
        self.base_url = base_url
        # What the cache keys on: the endpoint's URL, or a stable name for a server whose port
        # changes between runs (the local oracle), so a resumed run still finds its answers.
        self.identity = identity or base_url
        self.limiter = limiter
        self.cache = cache
        self.client = openai.AsyncOpenAI(
            base_url=base_url, api_key=endpoint.api_key(), timeout=endpoint.timeout_s, max_retries=0
        )
        self.sem = asyncio.Semaphore(endpoint.max_concurrency)
        self.rng = random.Random(seed)
        self.delta = Delta()
        self._inflight: dict[str, asyncio.Future] = {}

    def _cost(self, usage: dict[str, int]) -> float:
        ep = self.endpoint
        return (
            usage.get("prompt_tokens", 0) * ep.price_input_per_m
            + usage.get("completion_tokens", 0) * ep.price_output_per_m
        ) / 1e6

    async def _send(
        self, messages: list[dict], params: dict[str, Any]
    ) -> tuple[str, dict, list | None, str, str]:
        """One request with retries; returns (text, usage, logprobs, finish_reason, response id)."""
        prompt_estimate = sum(estimate_tokens(str(m.get("content", ""))) + 4 for m in messages)
        estimate = prompt_estimate + int(params.get("max_tokens") or 256)
        attempt = 0
        while True:
            wait = await self.limiter.reserve.remote(estimate)
            if wait > 0:
                await asyncio.sleep(wait)
            self.delta.add("requests")
            started = time.monotonic()
            try:
                async with self.sem:
                    resp = await self.client.chat.completions.create(
                        model=self.endpoint.model, messages=messages, **params
                    )
                choice = resp.choices[0]
                usage = (
                    {
                        "prompt_tokens": resp.usage.prompt_tokens,
                        "completion_tokens": resp.usage.completion_tokens,
                    }
                    if resp.usage
                    else {"prompt_tokens": prompt_estimate, "completion_tokens": 0}
                )
                # Endpoints charge prompt + max_tokens against TPM at admission: only the prompt
                # estimate is corrected by what the server reports.
                self.limiter.reconcile.remote(prompt_estimate, usage["prompt_tokens"])
                self.delta.counts["latencies"].append(time.monotonic() - started)
                if choice.finish_reason == "content_filter":
                    raise _Final(
                        "content_filter", "the endpoint refused the request (content policy)"
                    )
                logprobs = None
                if choice.logprobs is not None and choice.logprobs.content:
                    logprobs = [
                        {a.token: a.logprob for a in t.top_logprobs}
                        for t in choice.logprobs.content
                    ]
                self.limiter.succeeded.remote()
                return choice.message.content or "", usage, logprobs, choice.finish_reason, resp.id
            except openai.RateLimitError as exc:
                status, delay = "429", _retry_after(exc) or self._backoff(attempt)
                reason = "rate limited (429)"
                self.delta.add("rate_limited")
                self.limiter.rate_limited.remote(delay)
            except NO_RETRY as exc:
                kind = "content_policy" if _is_refusal(exc) else str(exc.status_code)
                raise _Final(kind, _message(exc)) from None
            except RETRY as exc:
                status = str(getattr(exc, "status_code", None) or type(exc).__name__)
                reason, delay = (
                    _message(exc) if isinstance(exc, openai.APIStatusError) else type(exc).__name__,
                    self._backoff(attempt),
                )
            except (
                json.JSONDecodeError,
                ValueError,
                TypeError,
                AttributeError,
            ) as exc:  # a body that is not a completion
                status, delay = "malformed", self._backoff(attempt)
                reason = f"malformed response ({type(exc).__name__})"
            if attempt >= self.endpoint.max_retries:
                raise _Final(status, f"{reason}; gave up after {attempt + 1} attempts")
            attempt += 1
            self.delta.add("retries")
            await asyncio.sleep(delay)

    async def _send_once(
        self, key: str, convo: list[dict], params: dict[str, Any]
    ) -> tuple[tuple, bool]:
        """Identical requests in flight at the same time are sent once and share the answer (a
        batch can repeat a prompt: a self-revision that changed nothing is judged like its draft).
        Returns (the _send result, whether it was shared)."""
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending), True
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._send(convo, params)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so an unshared failure does not warn
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(result)
        return result, False

    def _backoff(self, attempt: int) -> float:
        return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt) * self.rng.uniform(0.5, 1.0)

    async def call(
        self,
        row_id: str,
        role: str,
        messages: list[dict],
        params: dict[str, Any],
        parse: Callable[[str], Any] | None = None,
        *,
        allowed: Callable[[], bool] = lambda: True,
    ) -> Answer | DeadLetter:
        parse = parse or (lambda text: text)
        self.delta.add("sent")
        convo = list(messages)
        # A request ending in an assistant turn is a prefill (continue_final_message): the reply
        # continues it, so the text parsed and returned is the prefill plus the continuation.
        prefill = (
            messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
        )
        for repair in (False, True):
            key = cache_key(self.identity, self.endpoint.model, convo, params)
            hit = self.cache.get(key) if self.cache else None
            if hit is not None:
                self.delta.add("cache_hits")
                text, usage, logprobs, cached = hit["text"], hit["usage"], hit.get("logprobs"), True
            else:
                if not allowed():
                    from tapir_ray.oracle.ledger import BudgetExceeded

                    raise BudgetExceeded("oracle.max_usd reached")
                try:
                    (text, usage, logprobs, _, response_id), shared = await self._send_once(
                        key, convo, params
                    )
                except _Final as final:
                    self.delta.add("dead_lettered")
                    return DeadLetter(row_id, role, final.status, final.reason, 0)
                cached = shared
                if shared:  # an identical request in flight answered it: paid for once
                    self.delta.add("cache_hits")
                else:
                    self.delta.add("prompt_tokens", usage.get("prompt_tokens", 0))
                    self.delta.add("completion_tokens", usage.get("completion_tokens", 0))
                    self.delta.add("usd", self._cost(usage))
                    if self.cache:
                        self.cache.put(key, {"text": text, "usage": usage, "logprobs": logprobs, "response_id": response_id})  # fmt: skip
            text = prefill + text
            try:
                parsed = (
                    parse(text) if logprobs is None else _parse_with_logprobs(parse, text, logprobs)
                )
            except ParseError as exc:
                if repair:
                    self.delta.add("dead_lettered")
                    return DeadLetter(
                        row_id, role, "unparsable", f"unparsable reply after one repair: {exc}", 2
                    )
                asked = messages[:-1] if prefill else messages
                convo = [*asked, {"role": "assistant", "content": text},
                         {"role": "user", "content": f"Your reply could not be read ({exc}). Reply again in exactly the requested format."},
                         *([{"role": "assistant", "content": prefill}] if prefill else [])]  # fmt: skip
                continue
            self.delta.add("succeeded")
            return Answer(text=text, parsed=parsed, usage=usage, cached=cached, logprobs=logprobs)
        raise AssertionError("unreachable")


def _parse_with_logprobs(parse, text, logprobs):
    """Parsers that take `logprobs` (the G-Eval score) get them; others parse the text alone."""
    if "logprobs" in inspect.signature(parse).parameters:
        return parse(text, logprobs=logprobs)
    return parse(text)


class _Final(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    return str(exc)[:300]
