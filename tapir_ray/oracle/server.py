"""`tapir-ray oracle serve`: an OpenAI-compatible server on 127.0.0.1 (`/v1/models`,
`/v1/chat/completions`, and the Files and Batches endpoints of the Batch API: server_batch.py).

Backends behind one HTTP front:
- `hf`: a real local model (transformers), the offline teacher and judge of the demo. Requests that
  arrive together are generated as one left-padded batch.
- `scripted`: deterministic, role-aware replies for tests and benchmarks, with optional latency,
  enforced RPM/TPM (429 with Retry-After when exceeded, as hosted APIs do) and injectable faults
  (500s, timeouts, malformed bodies, dropped connections). It counts every request it receives and
  every distinct request it answered more than once, at `GET /stats`, so tests can prove that no
  call that had returned was sent again.
- `reference`: the scripted front (limits, faults, statistics) with a perfect teacher, classifier,
  expander and judge for the programmatically checkable task families of
  tapir_ray.oracle.reference (the verifiable quality benchmark); scripted replies elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import math
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tapir_ray.oracle.prompts import unfenced

log = logging.getLogger(__name__)


def estimate_tokens(text: str) -> int:
    """A provider-independent token estimate (≈4 characters per token), used for TPM budgets."""
    return max(1, math.ceil(len(text) / 4))


def request_tokens(body: dict[str, Any]) -> tuple[int, int]:
    prompt = sum(estimate_tokens(str(m.get("content", ""))) + 4 for m in body.get("messages", []))
    return prompt, int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)


def _digest(*parts: str) -> int:
    return int(hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12], 16)


# --- scripted replies -----------------------------------------------------------------------------


_LABEL_WORDS = {
    "Math": ("calculate", "sum", "equation", "solve", "number", "math", "+", "percent", "area"),
    "Code Generation": (
        "write a function",
        "python",
        "code",
        "program",
        "script",
        "sql",
        "javascript",
    ),
    "Code Debug": ("bug", "debug", "fix the code", "error in"),
    "Reasoning": ("why", "reason", "logic", "deduce", "explain"),
    "Writing": ("write a story", "poem", "essay", "compose", "letter"),
    "Paraphrase": ("rewrite", "paraphrase", "rephrase"),
    "Grammar": ("grammar", "correct the sentence", "punctuation"),
}


def score_of(answer: str) -> int:
    """The scripted judge's score: richer answers score higher, deterministically."""
    words = len(set(answer.lower().split()))
    return max(1, min(10, 1 + words // 6))


def _inside(user: str, label: str) -> str:
    """The text fenced as `label`, or "" (the scripted replies read absent texts as empty)."""
    return unfenced(user, label) or ""


def scripted_reply(messages: list[dict[str, Any]]) -> str:
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    if "Rating: [[k]]" in system:
        answer = _inside(user, "ANSWER")
        return f"The answer was read against the instruction.\nRating: [[{score_of(answer)}]]"
    if "Scores: [[a, b]]" in system:
        a, b = _inside(user, "ANSWER A"), _inside(user, "ANSWER B")
        return f"Both answers were compared.\nScores: [[{score_of(a)}, {score_of(b)}]]"
    if "Better: [[A]]" in system:
        a, b = score_of(_inside(user, "ANSWER A")), score_of(_inside(user, "ANSWER B"))
        return (
            f"Both answers were compared.\nBetter: [[{'A' if a > b else 'B' if b > a else 'tie'}]]"
        )
    if "keys name and definition, and nothing else" in system:  # CITING: induce question types
        found = []
        for line in re.findall(r"^- (.+)$", user, flags=re.M):
            text = line.lower()
            label = next(
                (k for k, words in _LABEL_WORDS.items() if any(w in text for w in words)), "General"
            )
            if label not in found:
                found.append(label)
        return json.dumps(
            [
                {"name": f"{k} questions", "definition": f"Instructions about {k.lower()}."}
                for k in found
            ]
        )
    if "merged_from" in system:  # CITING: merge synonyms (same first word)
        merged: dict[str, dict] = {}
        for name, definition in re.findall(r"^- ([^:]+): (.*)$", user, flags=re.M):
            key = name.split()[0].lower()
            entry = merged.setdefault(
                key, {"name": name, "definition": definition, "merged_from": []}
            )
            entry["merged_from"].append(name)
        return json.dumps(list(merged.values()))
    if "grading rubrics" in system:  # CITING: a rubric for one question type
        name = re.search(r"Question type: (.+)", user)
        return (
            "1. Articulate: the answer is clear and well organised.\n"
            "2. In-depth: the answer explains why, not only what.\n"
            "3. Comprehensive: the answer covers every part of the question.\n"
            f"4. It meets what {name.group(1) if name else 'this type'} asks for."
        )
    if "revise answers so that they meet a rubric" in system:  # CITING: a minimal revision
        answer = _inside(user, "ANSWER").strip()
        suffix = "In short: every criterion of the rubric is addressed."
        return answer if answer.endswith(suffix) else f"{answer} {suffix}".strip()
    if "<answer></answer>" in system:
        labels = re.findall(r"^- (.+)$", user.split("<<<INSTRUCTION", 1)[0], flags=re.M)
        text = _inside(user, "INSTRUCTION").lower()
        for label, words in _LABEL_WORDS.items():
            if label in labels and any(w in text for w in words):
                return f"<answer>{label}</answer>"
        pick = labels[_digest(text) % len(labels)] if labels else "Others"
        return f"<answer>{pick}</answer>"
    if "Output only the new instruction" in system:
        category = re.search(r"Task type: (.+)", user)
        n = _digest(user) % 100_000
        return f"Write a new {category.group(1) if category else 'general'} task number {n} about topic {n % 97}."
    topic = " ".join(user.split()[:12])
    n = _digest(user)
    return (
        f"Here is a careful answer to: {topic}. First, consider the key facts involved (note {n % 1000}). "
        "Second, apply them step by step with clear reasoning and concrete examples. "
        "Finally, summarise the result so that it is accurate, complete and well structured."
    )


def scripted_logprobs(text: str, top_n: int, sharp: bool = False) -> list[dict[str, Any]]:
    """Per-token logprobs; at a rating digit the alternatives spread around the chosen score
    (`sharp`: all the probability on it)."""
    out = []
    for token in re.findall(r"\d+|[^\s\d]+|\s+", text):
        if token.isdigit() and 1 <= int(token) <= 10:
            k = int(token)
            probs = collections.Counter({k: 1.0 if sharp else 0.6})
            for near in () if sharp else (k - 1, k + 1):
                probs[min(10, max(1, near))] += 0.2
            alts = [{"token": str(s), "logprob": math.log(p)} for s, p in sorted(probs.items())][
                : max(1, top_n)
            ]
            out.append({"token": token, "logprob": math.log(probs[k]), "top_logprobs": alts})
        else:
            out.append(
                {"token": token, "logprob": 0.0, "top_logprobs": [{"token": token, "logprob": 0.0}]}
            )
    return out


def reference_or_scripted(messages: list[dict[str, Any]]) -> str:
    """The reference oracle's reply (tapir_ray.oracle.reference) where the prompt is about one of
    its task families' instructions, the scripted reply otherwise."""
    from tapir_ray.oracle.reference import reference_reply

    text = reference_reply(messages)
    return text if text is not None else scripted_reply(messages)


# --- limits and faults (scripted backend) ---------------------------------------------------------


@dataclass
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    window_s: float = 60.0
    events: collections.deque = field(default_factory=collections.deque)  # (time, tokens)

    def admit(self, tokens: int, now: float) -> float:
        """0 if admitted (and recorded), else seconds until it would be."""
        while self.events and now - self.events[0][0] >= self.window_s:
            self.events.popleft()
        wait = 0.0
        if self.rpm is not None and len(self.events) >= self.rpm:
            wait = max(wait, self.events[len(self.events) - self.rpm][0] + self.window_s - now)
        if self.tpm is not None:
            used = sum(t for _, t in self.events)
            if used + tokens > self.tpm:
                freed, i = 0, 0
                while i < len(self.events) and used - freed + tokens > self.tpm:
                    freed += self.events[i][1]
                    i += 1
                wait = max(
                    wait, self.events[i - 1][0] + self.window_s - now if i else self.window_s
                )
        if wait > 0:
            return wait
        self.events.append((now, tokens))
        return 0.0


@dataclass
class Faults:
    fail_rate: float = 0.0  # 500
    timeout_rate: float = 0.0  # never answers in time
    malformed_rate: float = 0.0  # 200 with a body that is not JSON
    drop_rate: float = 0.0  # connection closed without a response
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def draw(self) -> str | None:
        roll = self.rng.random()
        for kind, rate in (
            ("fail", self.fail_rate),
            ("timeout", self.timeout_rate),
            ("malformed", self.malformed_rate),
            ("drop", self.drop_rate),
        ):
            if roll < rate:
                return kind
            roll -= rate
        return None


# Per-request faults, asked for by an explicit marker in a message's text, `[fault:NAME]` or
# `[fault:NAME=VALUE]`, so a test can make every reply class providers send:
#   status=CODE       that HTTP status (401 echoes the bearer value the request carried)
#   fail_times=N      503 for the request's first N attempts, then an answer
#   retry_after=S     429 with Retry-After: S on the first attempt, then an answer
#   empty_choices     200 with "choices": []          no_message   200 whose choice has no message
#   null_usage        200 with "usage": null          refusal      200, finish_reason content_filter
#   filler_logprobs   200 whose rating position's top log-probabilities are all −9999
#   hang_times=N      no reply at all for the request's first N attempts (the client's timeout)
#   drop_times=N      the connection closed without a reply for the first N attempts
#   wait_for=N        the reply waits until N more requests have reached the server (a slow
#                     completion that ends once the others are sent), or after 30 s a 422
FAULT_MARK = re.compile(r"\[fault:([a-z_]+)(?:=([0-9.]+))?\]")


def request_faults(messages: list[dict[str, Any]]) -> dict[str, str]:
    text = "\n".join(str(m.get("content", "")) for m in messages)
    return {name: value for name, value in FAULT_MARK.findall(text)}


# --- the HTTP front -------------------------------------------------------------------------------


class OracleServer:
    def __init__(
        self,
        backend: str = "scripted",
        *,
        model_name: str = "local",
        model_path: str | None = None,
        latency_ms: tuple[float, float] = (0.0, 0.0),
        limits: Limits | None = None,
        faults: Faults | None = None,
        max_batch: int = 8,
        api_key: str | None = None,
        batch_processing_s: float = 0.0,
        batch_window_s: float = 86_400.0,
    ):
        from tapir_ray.oracle.server_batch import BatchFront

        self.backend = backend
        self.api_key = api_key  # when set, requests must carry it as a bearer token
        self.model_name = model_name
        self.latency_ms = latency_ms
        self.limits = limits or Limits()
        self.faults = faults or Faults()
        self.stats: dict[str, Any] = {
            "requests": 0,
            "ok": 0,
            "by_status": collections.Counter(),
            "rate_limited": 0,
            "tokens_admitted": 0,
            "first_admitted": None,
            "last_admitted": None,
            "admitted_per_s": collections.Counter(),  # whole seconds since the first admission
        }
        self.answered: collections.Counter = collections.Counter()
        self.attempts: collections.Counter = collections.Counter()  # every request, by its key
        self.outage_until = 0.0
        self.response_ids: dict[str, list[str]] = collections.defaultdict(list)
        # Kept as they happen, so `GET /stats` costs the same after millions of requests (a
        # benchmark polls it twice a second; counting them on each call grew with the run).
        self.repeats = 0  # answers beyond the first to the same request
        self.repeated: list[str] = []  # the first 100 requests answered more than once
        self.rng = random.Random(0)
        self.generator = HFGenerator(model_path, max_batch=max_batch) if backend == "hf" else None
        self._reply = reference_or_scripted if backend == "reference" else scripted_reply
        self.batch = BatchFront(self, processing_s=batch_processing_s, window_s=batch_window_s)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 2**20)  # a batch input file is up to 200 MB
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_post("/stats/reset", self.reset_stats)
        app.router.add_post("/outage", self.outage)
        app.router.add_get("/health", lambda r: web.json_response({"ok": True}))
        self.batch.routes(app)
        if self.generator is not None:
            app.on_startup.append(lambda _: self.generator.start())
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": self.model_name, "object": "model", "owned_by": "tapir-ray"}],
            }
        )

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                **self.stats,
                "by_status": dict(self.stats["by_status"]),
                "distinct": len(self.answered),
                "repeats": self.repeats,
                # The response ids of each request answered more than once (a client that cached
                # an answer never asks again, so none of these ids may be in a client's cache).
                "repeated_ids": [self.response_ids[key] for key in self.repeated],
                **self.batch.stats,
            }
        )

    async def outage(self, request: web.Request) -> web.Response:
        """POST /outage?seconds=S: every chat request is answered 503 for the next S seconds."""
        self.outage_until = time.monotonic() + float(request.query.get("seconds", "60"))
        return web.json_response({"ok": True})

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats.update(
            requests=0, ok=0, by_status=collections.Counter(), rate_limited=0,
            tokens_admitted=0, first_admitted=None, last_admitted=None,
            admitted_per_s=collections.Counter(),
        )  # fmt: skip
        self.answered.clear()
        self.attempts.clear()
        self.response_ids.clear()
        self.repeats, self.repeated = 0, []
        return web.json_response({"ok": True})

    def _error(self, status: int, message: str, headers: dict | None = None) -> web.Response:
        self.stats["by_status"][str(status)] += 1
        kind = {
            429: "rate_limit_exceeded",
            400: "invalid_request_error",
            401: "invalid_api_key",
        }.get(status, "server_error")
        return web.json_response(
            {"error": {"message": message, "type": kind, "code": status}},
            status=status,
            headers=headers,
        )

    def _authorized(self, request: web.Request) -> bool:
        return not self.api_key or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        if not self._authorized(request):
            return self._error(401, "invalid API key")
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return self._error(400, "request body is not JSON")
        return await self._complete(body, request.headers.get("Authorization", ""), request)

    async def _complete(
        self, body: dict[str, Any], authorization: str, request: web.Request | None = None
    ) -> web.StreamResponse:
        """One chat completion, over HTTP (`request`) or as a line of a batch (None: the
        transport's faults — drops, hangs, broken bodies — and the rate limit do not apply)."""
        if not isinstance(body, dict):
            return self._error(400, "request body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._error(400, "messages must be a non-empty list")
        prompt_tokens, max_tokens = request_tokens(body)
        wait = self.limits.admit(prompt_tokens + max_tokens, time.monotonic()) if request else 0.0
        if wait > 0:
            self.stats["rate_limited"] += 1
            return self._error(429, "rate limit exceeded", headers={"Retry-After": f"{wait:.3f}"})
        now = time.time()
        self.stats["tokens_admitted"] += prompt_tokens + max_tokens
        self.stats["first_admitted"] = self.stats["first_admitted"] or now
        self.stats["last_admitted"] = now
        self.stats["admitted_per_s"][int(now - self.stats["first_admitted"])] += 1
        key = hashlib.sha256(
            json.dumps(
                [
                    messages,
                    {k: body.get(k) for k in ("temperature", "max_tokens", "top_p", "seed")},
                ],
                sort_keys=True,
            ).encode()
        ).hexdigest()
        self.attempts[key] += 1
        if time.monotonic() < self.outage_until:
            return self._error(503, "service unavailable (outage)")
        marked = request_faults(messages)
        early = self._marked_error(marked, self.attempts[key], authorization)
        if early is not None:
            return early
        if "wait_for" in marked:
            want, since = self.stats["requests"] + int(float(marked["wait_for"])), time.monotonic()
            while self.stats["requests"] < want:
                if time.monotonic() - since > 30:  # a loaded 2-CPU node can take seconds
                    return self._error(422, f"scripted: {want - self.stats['requests']} of "
                                            f"{marked['wait_for']} requests did not come in 30 s")  # fmt: skip
                await asyncio.sleep(0.05)
        if "hang_times" in marked and self.attempts[key] <= int(float(marked["hang_times"])):
            await asyncio.sleep(3600)
        if "drop_times" in marked and self.attempts[key] <= int(float(marked["drop_times"])):
            if request is not None:
                request.transport.close()
            return web.Response(status=500)
        fault = self.faults.draw() if request is not None else None
        low, high = self.latency_ms
        if high > 0 and request is not None:
            await asyncio.sleep(self.rng.uniform(low, high) / 1000)
        if fault == "fail":
            return self._error(500, "injected server error")
        if fault == "timeout":
            await asyncio.sleep(3600)
        if fault == "drop":
            request.transport.close()
            self.stats["by_status"]["dropped"] += 1
            return web.Response(status=500)
        if fault == "malformed":
            self.stats["by_status"]["malformed"] += 1
            return web.Response(status=200, text='{"choices": [', content_type="application/json")

        want_logprobs = bool(body.get("logprobs"))
        top_n = int(body.get("top_logprobs") or 0)
        # vLLM's semantics: a final assistant turn is continued only when the request says so.
        continue_final = messages[-1].get("role") == "assistant" and bool(
            body.get("continue_final_message")
        )
        if self.generator is not None:
            (
                text,
                completion_tokens,
                prompt_tokens,
                finish,
                logprobs,
            ) = await self.generator.generate(
                messages,
                max_tokens=max_tokens,
                temperature=float(body.get("temperature") or 0.0),
                top_n=top_n if want_logprobs else 0,
                continue_final=continue_final,
            )
        else:
            reply = self._reply
            text = reply(messages)
            if messages[-1].get("role") == "assistant":
                text = reply(messages[:-1])
                prefill = str(messages[-1].get("content", ""))
                if continue_final and prefill and prefill in text:  # the continuation
                    text = text.split(prefill, 1)[1]
            completion_tokens, finish = estimate_tokens(text), "stop"
            # The reference judge is certain of its verdicts; the scripted one spreads them.
            sharp = self.backend == "reference"
            logprobs = scripted_logprobs(text, top_n, sharp=sharp) if want_logprobs else None
        if "filler_logprobs" in marked and logprobs is not None:
            for entry in logprobs:
                if entry["token"].isdigit():
                    entry["top_logprobs"] = [
                        {"token": t["token"], "logprob": -9999.0} for t in entry["top_logprobs"]
                    ]
        if "refusal" in marked:
            text, finish = "", "content_filter"
        self.answered[key] += 1
        if self.answered[key] > 1:
            self.repeats += 1
            if self.answered[key] == 2 and len(self.repeated) < 100:
                self.repeated.append(key)
        response_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        self.response_ids[key].append(response_id)
        self.stats["ok"] += 1
        self.stats["by_status"]["200"] += 1
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs}
        if "no_message" in marked:
            del choice["message"]
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return web.json_response(
            {
                "id": response_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model_name,
                "choices": [] if "empty_choices" in marked else [choice],
                "usage": None if "null_usage" in marked else usage,
            }
        )

    def _marked_error(
        self, marked: dict[str, str], attempt: int, authorization: str
    ) -> web.Response | None:
        if "status" in marked:
            code = int(marked["status"])
            if code == 401:  # as some providers do: the rejected credential is echoed back
                return self._error(401, f"Incorrect API key provided: {authorization}")
            return self._error(code, f"scripted status {code}")
        if "fail_times" in marked and attempt <= int(float(marked["fail_times"])):
            return self._error(503, f"scripted failure {attempt} of {marked['fail_times']}")
        if "retry_after" in marked and attempt == 1:
            self.stats["rate_limited"] += 1
            return self._error(
                429, "rate limit exceeded", headers={"Retry-After": marked["retry_after"]}
            )
        return None


class HFGenerator:
    """Batches concurrent chat requests into left-padded `generate` calls on one local model."""

    def __init__(self, model_path: str | None, max_batch: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tapir_ray.assets import resolve_model
        from tapir_ray.runtime import best_dtype

        path = resolve_model(model_path or "bundled:smollm2-135m")
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=best_dtype()).eval()
        self.torch = torch
        self.max_batch = max_batch
        self.queue: asyncio.Queue = asyncio.Queue()

    async def start(self) -> None:
        asyncio.get_running_loop().create_task(self._worker())

    async def generate(self, messages, *, max_tokens: int, temperature: float, top_n: int,
                       continue_final: bool = False):  # fmt: skip
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((messages, continue_final, max_tokens, temperature, top_n, future))
        return await future

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            await asyncio.sleep(0.01)  # let requests that arrive together join the batch
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                results = await loop.run_in_executor(None, self._run, batch)
            except Exception as exc:  # a failed batch fails its requests, never the server
                for item in batch:
                    item[-1].set_exception(exc)
                continue
            for item, result in zip(batch, results, strict=True):
                item[-1].set_result(result)

    def _run(self, batch):
        from tapir_ray.chat import neutral_messages

        torch = self.torch
        prompts = [
            # A final assistant turn is continued when the request asks (vLLM's
            # continue_final_message), else closed and a new one opened, as vLLM does.
            # Special-token strings inside the texts stay text (never role markers).
            self.tokenizer.apply_chat_template(
                neutral_messages(self.tokenizer, m),
                tokenize=False,
                add_generation_prompt=not cont,
                continue_final_message=cont,
            )  # fmt: skip
            for m, cont, *_ in batch
        ]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        max_new = max(b[2] for b in batch)
        temperature = batch[0][3]
        top_n = max(b[4] for b in batch)
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
                output_scores=top_n > 0,
                return_dict_in_generate=True,
            )
        results = []
        width = enc["input_ids"].shape[1]
        eos = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        for i, (_, _, limit, _, n, _) in enumerate(batch):
            ids = out.sequences[i, width:].tolist()[:limit]
            stop = next((j for j, t in enumerate(ids) if t in eos), None)
            finish = "stop" if stop is not None else "length"
            ids = ids[:stop] if stop is not None else ids
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            logprobs = None
            if n > 0:
                logprobs = []
                for step, token in enumerate(ids):
                    lp = torch.log_softmax(out.scores[step][i].float(), dim=-1)
                    top = torch.topk(lp, n)
                    logprobs.append(
                        {
                            "token": self.tokenizer.decode([token]),
                            "logprob": float(lp[token]),
                            "top_logprobs": [
                                {"token": self.tokenizer.decode([int(t)]), "logprob": float(v)}
                                for v, t in zip(top.values, top.indices, strict=True)
                            ],
                        }
                    )
            prompt_tokens = int(enc["attention_mask"][i].sum())
            results.append((text, len(ids), prompt_tokens, finish, logprobs))
        return results


def serve(
    server: OracleServer,
    host: str = "127.0.0.1",
    port: int = 8000,
    ready_file: str | None = None,
    parent_pid: int | None = None,
) -> None:
    """Run until interrupted; with `ready_file`, write the bound port there once listening; with
    `parent_pid`, exit when that process is gone (a run killed with SIGKILL leaves no server)."""

    async def main() -> None:
        runner = web.AppRunner(server.app(), access_log=None)
        await runner.setup()
        # A deep accept queue: many clients connecting at once must not wait out SYN retries.
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]
        log.info(
            "oracle server (%s backend) listening on http://%s:%d/v1", server.backend, host, bound
        )
        print(f"oracle server ({server.backend}) on http://{host}:{bound}/v1", flush=True)
        if ready_file:
            with open(ready_file + ".tmp", "w") as f:
                f.write(str(bound))
            import os

            os.replace(ready_file + ".tmp", ready_file)
        while parent_pid is None or _alive(parent_pid):
            await asyncio.sleep(2.0)
        log.info("the process that started this server (%d) is gone: stopping", parent_pid)
        await runner.cleanup()

    asyncio.run(main())


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
