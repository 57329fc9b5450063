"""One oracle call, done properly: cache, shared rate limit, retries, parse-and-repair, ledger.

Every reply ends as an Answer or a DeadLetter, never an exception out of the stage, a hang or a
made-up value:

    cache hit? → the cached reply (an answer, or a refusal that was paid for): no request, no cost
    reserve from the endpoint's limiter (the waiting requests together, one call)
      → send (aiohttp, many in flight on kept-alive connections)
      429                   → pause the whole endpoint for Retry-After (capped), retry
      408, 409, 5xx,
      timeout, dropped conn. → capped exponential backoff with jitter (Retry-After honoured, capped)
      a broken 200 body     → the same, a few times (then a dead letter "malformed")
      ... until the request's deadline (endpoint.retry_deadline_s) or endpoint.max_retries
      any other 4xx         → dead letter at once (400, 401, 402, 403, 404, 413, 422, policy)
    a 200 reply: usage missing → estimated from the text; finish_reason content_filter → a refusal
    (billed: cached and costed, then a dead letter, so no resume pays for it again)
    parse the reply → on a ParseError one repair request, then the dead letter
    usage → reconcile the limiter's token estimate; cost → ledger

A reply that was received is in the cache (with its usage and cost) before its row leaves here.
Reasons never carry a credential: they are redacted of the key and of anything shaped like one.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tapir_ray.config import EndpointConfig, redact
from tapir_ray.oracle import batch
from tapir_ray.oracle.cache import ResponseCache, cache_key
from tapir_ray.oracle.ledger import BudgetExceeded, empty_entry
from tapir_ray.oracle.limiter import LOAD_STALE_S
from tapir_ray.oracle.prompts import CONTINUE_PARAMS, ParseError
from tapir_ray.oracle.reply import RETRY_STATUSES, Reply, _Malformed, _reply, request_body
from tapir_ray.oracle.server import estimate_tokens

log = logging.getLogger(__name__)

BACKOFF_BASE_S, BACKOFF_CAP_S = 0.5, 30.0
MALFORMED_ATTEMPTS = 3  # a 200 whose body is not a completion: asked again this many times at most
RESERVE_HORIZON_S = 2.0  # how far ahead a request may hold a place in the endpoint's pacing
MIN_POLL_S = 0.25  # a refused reservation is asked again no sooner (the horizon is 8 times this)
RESERVE_BATCH = 256  # waiting requests of one client reserved in one call to the limiter
# A client calls its limiter at most once in this long: requests that arrive a few at a time (a
# round's judge, fed as the student engine writes answers) are reserved together instead of a
# call each, which had the limiter actor at a quarter of a core for 200 verdicts/s. Each request
# waits at most this much more, a few per cent of a hosted API's reply time.
RESERVE_INTERVAL_S = 0.02


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


class _Status(Exception):
    """A reply whose status is not 2xx: its status, headers and body, which the retry and
    dead-letter rules read."""

    def __init__(self, status: int, headers: Any, raw: bytes):
        self.status_code, self.headers = status, headers
        self.text = raw.decode("utf-8", "replace")
        try:
            self.body = json.loads(self.text)
        except ValueError:
            self.body = None
        super().__init__(f"HTTP {status}")


def _retry_after(exc: _Status) -> float | None:
    value = exc.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _env_proxy(url: str) -> tuple[Any, Any]:
    """The proxy HTTP(S)_PROXY and NO_PROXY name for `url` (and its credentials), read once when a
    client's session is made, as the openai library's client reads them when it is made. aiohttp's
    own `trust_env` reads the environment and ~/.netrc again for every request, in a thread:
    measured at about a third of an oracle actor's CPU."""
    from aiohttp.helpers import get_env_proxy_for_url
    from yarl import URL

    try:
        return get_env_proxy_for_url(URL(url))
    except LookupError:  # no proxy for this URL's scheme, or NO_PROXY names its host
        return None, None


def _is_refusal(exc: _Status) -> bool:
    return "content_policy" in exc.text or "content_filter" in exc.text


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
        pool: tuple[str, int] | None = None,
    ):
        self.endpoint = endpoint
        self.base_url = base_url
        # What the cache keys on: the endpoint's URL, or a stable name for a server whose port
        # changes between runs (the local oracle), so a resumed run still finds its answers.
        self.identity = identity or base_url
        self.limiter = limiter
        self.cache = cache
        self.key = endpoint.api_key()
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"}
        # Made on the event loop that first sends (an aiohttp session belongs to one loop).
        self._http: aiohttp.ClientSession | None = None
        self._proxy: tuple[Any, Any] = (None, None)  # (URL, auth) from the environment, or none
        self._api = None  # the openai library's client, for the Batch API only (batch.py)
        # max_concurrency slots, more while the other actors of its stage (`pool`: its name and
        # all its actors' slots) leave theirs unused (share_load).
        self.slots = Slots(endpoint.max_concurrency)
        self.name, self.pool = uuid.uuid4().hex, pool
        # This client's requests waiting for a reservation, asked for together by one task in
        # arrival order; and what its replies reported since (see _reserve, _settle).
        self._waiting: list[tuple[float, asyncio.Future]] = []
        self._reserver: asyncio.Task | None = None
        self._reserved_at = float("-inf")  # when the last call to the limiter left
        self._settled = [0.0, 0.0, 0]
        self.rng = random.Random(seed)
        self.delta = Delta()
        self._inflight: dict[str, asyncio.Future] = {}
        self._warned_retry_after = False
        # Called after each paid reply is counted (a stage with a budget reports it at once, so
        # the budget stops sending within the requests already in flight).
        self.on_paid: Callable[[], Awaitable[None]] | None = None

    def _session(self) -> aiohttp.ClientSession:
        """The connections every request shares. aiohttp rather than the openai library: its
        request path (the library's layers over httpx and its connection pool) put one client at
        3.0 ms of CPU per judge request against 1.2-1.3 ms here (benchmarks/oracle_client_cpu.py),
        and its import added ~0.7 s of CPU to each oracle actor's start.
        Connections are kept alive for the next request: past the library's default of 100,
        each request would open a new one (a TLS handshake on a hosted API), and the bursts of
        new connections overflowed the server's accept queue."""
        if self._http is None or self._http.closed:
            connector = aiohttp.TCPConnector(
                limit=max(1000, self.endpoint.max_concurrency), keepalive_timeout=60.0,
                ssl=_ssl_context(),
            )  # fmt: skip
            self._http = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout_s),
            )  # fmt: skip
            self._proxy = _env_proxy(self.url)
        return self._http

    def api(self):
        """The openai library's async client (the Batch API's files and batches)."""
        if self._api is None:
            import openai

            self._api = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self.key, timeout=self.endpoint.timeout_s,
                max_retries=0,
            )  # fmt: skip
        return self._api

    async def aclose(self) -> None:
        """Closes the connections (an actor's are closed with its process)."""
        if self._http is not None:
            await self._http.close()
        if self._api is not None:
            await self._api.close()

    async def _post(self, body: dict[str, Any]) -> Any:
        """One chat completion request: the reply's JSON, or _Status for a status not 2xx."""
        session = self._session()
        async with session.post(self.url, data=json.dumps(body).encode(), headers=self.headers,
                                proxy=self._proxy[0], proxy_auth=self._proxy[1]) as resp:  # fmt: skip
            raw = await resp.read()
            if not 200 <= resp.status < 300:
                raise _Status(resp.status, resp.headers, raw)
        return json.loads(raw)

    def _cost(self, usage: dict[str, int]) -> float:
        ep = self.endpoint
        return (
            usage.get("prompt_tokens", 0) * ep.price_input_per_m
            + usage.get("completion_tokens", 0) * ep.price_output_per_m
        ) / 1e6

    def _redact(self, text: str) -> str:
        return redact(text, self.key)[:300]

    def _capped(self, retry_after: float) -> float:
        cap = self.endpoint.max_retry_after_s
        if retry_after > cap and not self._warned_retry_after:
            self._warned_retry_after = True
            log.warning(
                "%s asked to wait %.0f s (Retry-After); waiting %.0f s (max_retry_after_s)",
                self.base_url, retry_after, cap,
            )  # fmt: skip
        return min(retry_after, cap)

    async def _reserve(self, estimate: float) -> float:
        """The wait before this request may leave (its place in the endpoint's pacing)."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((estimate, future))
        if self._reserver is None or self._reserver.done():
            self._reserver = asyncio.ensure_future(self._reserve_waiting())
        return await future

    async def _reserve_waiting(self) -> None:
        """Reserves the waiting requests, many per call to the limiter; a refusal leaves the rest
        waiting in order. Reservations reach at most RESERVE_HORIZON_S ahead: with hundreds of
        requests waiting, reservations made minutes ahead would all still leave at the old rate
        after a 429 asked the endpoint to slow down."""
        try:
            while self._waiting:
                self._waiting = [(e, f) for e, f in self._waiting if not f.done()]  # cancelled
                if (pause := self._reserved_at + RESERVE_INTERVAL_S - time.monotonic()) > 0:
                    await asyncio.sleep(pause)  # more requests join this call meanwhile
                    self._waiting = [(e, f) for e, f in self._waiting if not f.done()]
                group = self._waiting[:RESERVE_BATCH]
                if not group:
                    break
                self._reserved_at = time.monotonic()
                waits = await self.limiter.reserve.remote(
                    [e for e, _ in group], RESERVE_HORIZON_S, self._take_settled()
                )
                granted = [w for w in waits if w >= 0]
                for (_, future), wait in zip(group, granted, strict=False):
                    if not future.done():
                        future.set_result(wait)
                del self._waiting[: len(granted)]
                if len(granted) < len(group):
                    # Refused: every waiting client would be told the same moment; asking again
                    # no sooner than MIN_POLL_S keeps them from a herd.
                    refused = waits[len(granted)]
                    await asyncio.sleep(max(-refused, MIN_POLL_S) * self.rng.uniform(1.0, 1.2))
        except BaseException as exc:  # the limiter is gone: every waiting request hears it
            for _, future in self._waiting:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            self._waiting.clear()
            if not isinstance(exc, Exception):
                raise

    def _settle(self, estimated: float, reported: float) -> None:
        """A reply's reported prompt tokens and its success, for the limiter's next call: endpoints
        charge prompt + max_tokens against TPM at admission, and only the prompt estimate is
        corrected by what the server reports."""
        self._settled[0] += estimated
        self._settled[1] += reported
        self._settled[2] += 1

    def _take_settled(self) -> tuple[float, float, int] | None:
        taken, self._settled = tuple(self._settled), [0.0, 0.0, 0]
        return taken if taken[2] else None

    async def share_load(self) -> None:
        """Tells the limiter this client's load and takes the concurrency it grants (see
        limiter.SharedConcurrency): a client left with rows at the end of a stage borrows the
        slots of the actors that finished."""
        if self.pool is None:  # a client on its own
            return
        ask = self.limiter.load.remote(*self.pool, self.name, self.slots.in_flight,
                                       self.slots.waiting, self.endpoint.max_concurrency)  # fmt: skip
        # A limiter that does not answer (busy, restarting) must not hold up the ledger reports
        # that share this loop: the client keeps the concurrency it has and asks again later.
        try:
            granted = await asyncio.wait_for(ask, LOAD_STALE_S)
        except asyncio.TimeoutError:
            return
        self.slots.resize(int(granted))

    def flush(self) -> None:
        """Hands the limiter what the replies since the last reservation reported."""
        if (taken := self._take_settled()) is not None:
            self.limiter.settled.remote(*taken)

    async def _send(
        self, messages: list[dict], params: dict[str, Any], allowed: Callable[[], bool]
    ) -> Reply:
        """One request with retries until its deadline; a final failure raises _Final."""
        prompt_estimate = sum(estimate_tokens(str(m.get("content", ""))) + 4 for m in messages)
        estimate = prompt_estimate + int(params.get("max_tokens") or 256)
        ep = self.endpoint
        deadline = time.monotonic() + ep.retry_deadline_s
        attempt = malformed = 0
        while True:
            retry_after = None
            try:
                # A slot first, then the endpoint's pacing: a reservation is made only when the
                # request can leave at its reserved time (reserving early and queueing on the slot
                # would send bunched bursts the endpoint answers with 429s).
                async with self.slots:
                    wait = await self._reserve(estimate)
                    if wait > 0:
                        await asyncio.sleep(wait)
                    # Checked again at the last moment: the budget stops everything not yet sent.
                    if not allowed():
                        raise BudgetExceeded("oracle.max_usd reached")
                    self.delta.add("requests")
                    started = time.monotonic()
                    body = await self._post(request_body(ep.model, messages, params))
                reply = _reply(body, prompt_estimate)
                self._settle(prompt_estimate, reply.usage["prompt_tokens"])
                self.delta.counts["latencies"].append(time.monotonic() - started)
                return reply
            except _Status as exc:
                code = exc.status_code
                if code not in RETRY_STATUSES and code < 500:
                    kind = "content_policy" if _is_refusal(exc) else str(code)
                    raise _Final(kind, self._redact(_message(exc))) from None
                status, reason = str(code), f"{self._redact(_message(exc))} ({code})"
                retry_after = _retry_after(exc)
                if code == 429:
                    self.delta.add("rate_limited")
                    retry_after = self._capped(retry_after or self._backoff(attempt))
                    self.limiter.rate_limited.remote(retry_after)
                elif retry_after is not None:
                    retry_after = self._capped(retry_after)
            except TimeoutError:  # aiohttp's timeouts are TimeoutErrors too
                status, reason = "timeout", f"no reply within {ep.timeout_s:g} s (timeout_s)"
            except aiohttp.ClientError as exc:  # refused, reset or dropped connections
                status, reason = "connection", self._redact(f"{type(exc).__name__}: {exc}")
            except (_Malformed, json.JSONDecodeError, ValueError, TypeError, AttributeError,
                    KeyError) as exc:  # fmt: skip
                malformed += 1
                status = "malformed"
                reason = f"malformed response ({exc if isinstance(exc, _Malformed) else type(exc).__name__})"
                if malformed >= MALFORMED_ATTEMPTS:
                    raise _Final(
                        status, f"{reason}; gave up after {attempt + 1} attempts"
                    ) from None
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            out_of_retries = ep.max_retries is not None and attempt >= ep.max_retries
            if out_of_retries or time.monotonic() + delay > deadline:
                raise _Final(status, f"{reason}; gave up after {attempt + 1} attempts")
            attempt += 1
            self.delta.add("retries")
            await asyncio.sleep(delay)

    async def _send_once(
        self, key: str, convo: list[dict], params: dict[str, Any], allowed: Callable[[], bool]
    ) -> tuple[Reply, bool]:
        """Identical requests in flight at the same time are sent once and share the answer (a
        batch can repeat a prompt: a self-revision that changed nothing is judged like its draft).
        Returns (the reply, whether it was shared)."""
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending), True
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._send(convo, params, allowed)
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

    async def _cached(self, key: str) -> dict | None:
        if self.cache is None or self.cache.surely_missing(key):
            return None  # a fresh request: no trip through a thread (a tenth of a request's CPU)
        return await asyncio.to_thread(self.cache.get, key)

    async def _fetch(
        self, key: str, convo: list[dict], params: dict[str, Any], allowed: Callable[[], bool]
    ) -> tuple[dict, bool]:
        """The reply to `convo` as a cache entry (text, usage, logprobs, usd, refusal), and
        whether no request was paid for it here. A new reply is in the cache before it returns."""
        hit = await self._cached(key)
        if hit is not None:
            self.delta.add("cache_hits")
            return hit, True
        if not allowed():
            raise BudgetExceeded("oracle.max_usd reached")
        collector = batch.CURRENT.get()
        if collector is not None:  # batch mode: the submitter caches the reply and counts its cost
            return await collector.request(key, convo, params), False
        reply, shared = await self._send_once(key, convo, params, allowed)
        entry = {"text": reply.text, "usage": reply.usage, "logprobs": reply.logprobs,
                 "response_id": reply.response_id, "usd": self._cost(reply.usage),
                 "refusal": reply.finish_reason == "content_filter"}  # fmt: skip
        if shared:  # an identical request in flight answered it: paid for once, by that one
            self.delta.add("cache_hits")
            return entry, True
        self.delta.add("prompt_tokens", reply.usage["prompt_tokens"])
        self.delta.add("completion_tokens", reply.usage["completion_tokens"])
        self.delta.add("usd", entry["usd"])
        # It was paid on arrival: the cache and the budget hear of it at once, and the reply is
        # cached whatever the ledger does (a killed driver takes its ledger with it while this
        # actor may still be receiving replies).
        writes = [self.cache.put_async(key, entry)] if self.cache is not None else []
        if self.on_paid is not None:
            writes.append(self.on_paid())
        for outcome in await asyncio.gather(*writes, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome
        return entry, False

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
        if prefill:  # without these options vLLM closes the turn and opens a new one
            extra = {**params.get("extra_body", {}), **CONTINUE_PARAMS["extra_body"]}
            params = {**params, "extra_body": extra}
        for repair in (False, True):
            key = cache_key(self.identity, self.endpoint.model, convo, params)
            try:
                entry, cached = await self._fetch(key, convo, params, allowed)
            except (_Final, batch.Failed) as final:
                self.delta.add("dead_lettered")
                return DeadLetter(row_id, role, final.status, final.reason, 0)
            if entry.get("refusal"):
                self.delta.add("dead_lettered")
                return DeadLetter(row_id, role, "content_filter",
                                  "the endpoint refused the request (content policy); the refusal is cached", 1)  # fmt: skip
            text, logprobs = prefill + entry["text"], entry.get("logprobs")
            try:
                parsed = _parse(parse, text, logprobs, messages)
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
            return Answer(
                text=text, parsed=parsed, usage=entry["usage"], cached=cached, logprobs=logprobs
            )
        raise AssertionError("unreachable")


class Slots:
    """A semaphore whose capacity can change while requests wait on it (asyncio's cannot)."""

    def __init__(self, capacity: int):
        self.capacity, self.in_flight = capacity, 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._wake()

    async def __aenter__(self) -> None:
        if self.in_flight < self.capacity and not self._waiters:
            self.in_flight += 1
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future  # the slot was taken for this request when it was woken
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # woken, then cancelled
                self._release()
            elif future in self._waiters:  # (a wake-up may have passed over it already)
                self._waiters.remove(future)
            raise

    async def __aexit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.capacity:
            future = self._waiters.popleft()
            if not future.done():
                self.in_flight += 1
                future.set_result(None)


def _parse(parse, text, logprobs, messages):
    """Parsers that take `logprobs` (the G-Eval score) or `messages` (the request, e.g. the rubric
    parser dropping echoed examples) get them; others parse the text alone."""
    wants = inspect.signature(parse).parameters
    extra = {}
    if "logprobs" in wants and logprobs is not None:
        extra["logprobs"] = logprobs
    if "messages" in wants:
        extra["messages"] = messages
    return parse(text, **extra)


class _Final(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _message(exc: _Status) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return f"Error code: {exc.status_code} - {exc.text[:200]}" if exc.text else str(exc)


def _ssl_context():
    """Certificates as the openai library (httpx) verifies them: certifi's bundle where installed."""
    import ssl

    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())
