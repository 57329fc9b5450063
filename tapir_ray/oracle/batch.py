"""Batch mode: an oracle stage's requests through the provider's Batch API, at the batch price.

The rows of one Ray Data batch go through `OracleClient.call` exactly as online (cache, prefill,
parse, repair, refusals, dead letters); only the network part differs. A request that misses the
cache waits in the call's `Collector`; once every row of the Ray Data batch waits, the
`BatchSubmitter` sends the waiting requests as Batch API JSONL (`custom_id` = the cache key),
split to the endpoint's limits, polls the batches, and maps the output and error files back by
`custom_id`: a reply is cached with its cost (at the batch price) before its row moves on, a final
error is a dead letter, and what a batch did not finish (expired, cancelled, a retryable status on
its line) is submitted again, up to `batch.max_attempts` times.

Nothing is submitted twice across a kill: each batch is recorded under `<run>/oracle-batches/`
(input file, batch id, the keys it holds, estimated cost) before it is waited for, and a resumed
stage whose requests are in a recorded batch attaches to it instead of submitting them again; the
completed part of an expired or cancelled batch is kept (it was billed). A submitted batch's
estimated cost is committed spend in the ledger until it is collected, so `oracle.max_usd` stops
submissions before they could pass it.

Ray Data's `ray.data.llm` has no Batch API processor, and the `openai` client stops at the HTTP
calls: what lies between (splitting, records, re-attaching, mapping results back) is ours.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from tapir_ray import storage
from tapir_ray.config import EndpointConfig
from tapir_ray.oracle.ledger import BudgetExceeded
from tapir_ray.oracle.reply import RETRY_STATUSES, _Malformed, _reply, request_body
from tapir_ray.oracle.server import estimate_tokens

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "expired", "cancelled", "failed")

# The Collector of the Ray Data batch a call belongs to (set around the calls' creation, so each
# call's task sees its own); None: online.
CURRENT: contextvars.ContextVar[Collector | None] = contextvars.ContextVar(
    "tapir_ray_batch", default=None
)


class Collector:
    """The requests of one Ray Data batch's rows that missed the cache: each waits here for its
    entry (or a final error) until the submitter has sent them all together."""

    def __init__(self) -> None:
        self.pending: dict[str, tuple[list[dict], dict[str, Any], asyncio.Future]] = {}
        self.waiting = 0
        self.changed = asyncio.Event()

    async def request(self, key: str, convo: list[dict], params: dict[str, Any]) -> dict:
        """The cache entry for `key` (cached and counted by the submitter)."""
        if key not in self.pending:
            self.pending[key] = (convo, params, asyncio.get_running_loop().create_future())
        future = self.pending[key][2]
        self.waiting += 1
        self.changed.set()
        try:
            return await asyncio.shield(future)
        finally:
            self.waiting -= 1

    def take(self) -> dict[str, tuple[list[dict], dict[str, Any], asyncio.Future]]:
        taken, self.pending = self.pending, {}
        return taken


@dataclass
class Failed(Exception):
    """A request's final outcome in a batch: a dead letter with this status and reason."""

    status: str
    reason: str


def request_line(key: str, model: str, convo: list[dict], params: dict[str, Any]) -> str:
    """One Batch API input line, its body as an online request's."""
    body = request_body(model, convo, params)
    return json.dumps({"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body},
                      ensure_ascii=False)  # fmt: skip


def split_lines(
    lines: list[tuple[str, str]], max_requests: int, max_bytes: int
) -> list[list[tuple[str, str]]]:
    """(key, line) pairs into files of at most max_requests lines and max_bytes bytes."""
    files: list[list[tuple[str, str]]] = [[]]
    size = 0
    for key, line in lines:
        n = len(line.encode()) + 1
        if files[-1] and (len(files[-1]) >= max_requests or size + n > max_bytes):
            files.append([])
            size = 0
        files[-1].append((key, line))
        size += n
    return [f for f in files if f]


class Registry:
    """`<run>/oracle-batches/`: one record per submitted batch (`NAME.json`: endpoint identity,
    stage, input file, batch id, keys, estimated cost) and, once collected, `NAME.done.json`
    (the final errors of its lines). Records are written before the batch is waited for."""

    def __init__(self, run_dir: str):
        self.root = storage.join(run_dir, "oracle-batches")
        self._records: dict[str, dict] = {}  # name → record with a batch id (they never change)

    def write(self, record: dict) -> None:
        storage.write_json_atomic(storage.join(self.root, f"{record['name']}.json"), record)

    def open_records(self, identity: str) -> list[dict]:
        """This endpoint's batches that were submitted and are not collected yet."""
        fs, path = storage.fs_and_path(self.root)
        if not fs.exists(path):
            return []
        names = {f.rsplit("/", 1)[-1] for f in fs.glob(f"{path}/*.json")}
        out = []
        for name in sorted(names):
            if name.endswith(".done.json") or name.replace(".json", ".done.json") in names:
                continue
            stem = name[: -len(".json")]
            record = self._records.get(stem) or storage.read_json(storage.join(self.root, name))
            if record.get("batch_id"):
                self._records[stem] = record
            if record.get("identity") == identity:
                out.append(record)
        return out

    def finish(self, name: str, final: dict[str, list[str]]) -> None:
        storage.write_json_atomic(storage.join(self.root, f"{name}.done.json"), {"final": final})
        self._records.pop(name, None)

    def outcome(self, name: str) -> dict | None:
        path = storage.join(self.root, f"{name}.done.json")
        return storage.read_json(path) if storage.exists(path) else None


class BatchSubmitter:
    """One per oracle actor: submits, re-attaches to and collects the actor's batches."""

    def __init__(self, client, *, identity: str, stage: str, round_: int, role: str, run_dir: str,
                 ledger, allowed) -> None:  # fmt: skip
        self.client = client  # the OracleClient: endpoint, cache, delta, costs, redaction
        self.api = client.api()  # the openai library's client, made for batch mode only
        self.ep: EndpointConfig = client.endpoint
        self.settings = self.ep.batch
        self.identity, self.stage, self.round, self.role = identity, stage, round_, role
        self.registry = Registry(run_dir)
        self.ledger = ledger
        self.allowed = allowed
        self.attempts: dict[str, int] = {}

    async def run(
        self, pending: dict[str, tuple[list[dict], dict[str, Any], asyncio.Future]]
    ) -> None:
        """Resolves every future of `pending`: a cache entry, Failed, or BudgetExceeded."""
        todo = dict(pending)
        try:
            while todo:
                outcomes = await self._round(todo)
                again = {}
                for key, (convo, params, future) in todo.items():
                    result = outcomes.get(key)
                    if result is None:  # not finished by its batch: submit it again
                        self.attempts[key] = self.attempts.get(key, 0) + 1
                        if self.attempts[key] < self.settings.max_attempts:
                            again[key] = (convo, params, future)
                            continue
                        result = Failed("batch_unfinished", f"not finished in {self.attempts[key]} "
                                        "batches (expired, cancelled or a retryable status)")  # fmt: skip
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                todo = again
        except BaseException as exc:
            for _, _, future in pending.values():
                if not future.done():
                    future.set_exception(
                        exc if isinstance(exc, BudgetExceeded | Failed) else Failed("batch_error", self.client._redact(f"{type(exc).__name__}: {exc}"))
                    )  # fmt: skip
            if not isinstance(exc, Exception):
                raise

    async def _round(self, todo: dict) -> dict[str, Any]:
        """Sends (or finds in flight) every request of `todo` once; key → entry, Failed,
        BudgetExceeded, or None (submit again)."""
        records = await asyncio.to_thread(self.registry.open_records, self.identity)
        held = {}
        for record in records:
            for key in record["keys"]:
                held.setdefault(key, record)
        attach = {r["name"]: r for k in todo if (r := held.get(k)) is not None}
        fresh = [k for k in todo if k not in held]
        outcomes: dict[str, Any] = {}
        lines = [(k, request_line(k, self.ep.model, todo[k][0], todo[k][1])) for k in fresh]
        for chunk in split_lines(lines, self.settings.max_requests, self.settings.max_bytes):
            record = await self._submit(chunk, outcomes)
            if record is not None:
                attach[record["name"]] = record
        results = await asyncio.gather(*(self._collect(r) for r in attach.values()))
        for found in results:
            for key, value in found.items():
                if key in todo and key not in outcomes:
                    outcomes[key] = value
        return outcomes

    def _estimate(self, line: str, max_tokens: int) -> float:
        body = json.loads(line)["body"]
        prompt = sum(estimate_tokens(str(m.get("content", ""))) + 4 for m in body["messages"])
        return (
            self.client._cost({"prompt_tokens": prompt, "completion_tokens": max_tokens})
            * self.settings.price_factor
        )

    async def _submit(self, chunk: list[tuple[str, str]], outcomes: dict) -> dict | None:
        name = f"{self.stage.replace('/', '-')}--{uuid.uuid4().hex[:12]}"
        costs = [
            self._estimate(line, int(json.loads(line)["body"].get("max_tokens") or 256))
            for _, line in chunk
        ]
        # The budget: only as many requests as fit what is left; the rest stop here, resumable.
        fits = len(chunk) if self.allowed() else 0
        while fits and not await self.ledger.commit.remote(name, sum(costs[:fits])):
            headroom = await self.ledger.headroom.remote()
            fits = min(
                fits - 1, sum(1 for total in itertools.accumulate(costs) if total <= headroom)
            )
        for key, _ in chunk[fits:]:
            outcomes[key] = BudgetExceeded("oracle.max_usd reached")
        chunk = chunk[:fits]
        if not chunk:
            return None
        data = "".join(line + "\n" for _, line in chunk).encode()
        uploaded = await self.api.files.create(file=(f"{name}.jsonl", data), purpose="batch")
        record = {"name": name, "identity": self.identity, "stage": self.stage, "round": self.round,
                  "role": self.role, "input_file_id": uploaded.id, "batch_id": None,
                  "keys": [k for k, _ in chunk], "est_usd": sum(costs), "submitted_at": time.time()}  # fmt: skip
        # Recorded before the batch exists: a kill between the two finds it by its input file.
        await asyncio.to_thread(self.registry.write, record)
        batch = await self.api.batches.create(
            input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window=self.settings.completion_window,
            metadata={"tapir_ray_stage": self.stage[:500], "tapir_ray_record": name},
        )  # fmt: skip
        record["batch_id"] = batch.id
        await asyncio.to_thread(self.registry.write, record)
        self.client.delta.add("requests", len(chunk))
        self.client.delta.add("batch_requests", len(chunk))
        log.info("%s: batch %s submitted (%d requests)", self.stage, batch.id, len(chunk))
        return record

    async def _find(self, record: dict) -> str | None:
        """The batch made from a recorded input file whose id was never written (a kill between
        creating it and recording it)."""
        async for batch in self.api.batches.list(limit=100):
            if batch.input_file_id == record["input_file_id"]:
                return batch.id
        return None

    async def _collect(self, record: dict) -> dict[str, Any]:
        """Waits for a recorded batch and maps its results: key → entry, Failed or None."""
        name = record["name"]
        if not record.get("batch_id"):
            record["batch_id"] = await self._find(record)
            if record["batch_id"] is None:  # never created: create it now
                batch = await self.api.batches.create(
                    input_file_id=record["input_file_id"], endpoint=ENDPOINT,
                    completion_window=self.settings.completion_window,
                )  # fmt: skip
                record["batch_id"] = batch.id
            await asyncio.to_thread(self.registry.write, record)
        # Submitted, in this run or before a kill: committed until collected.
        await self.ledger.commit.remote(name, record.get("est_usd", 0.0), True)
        if not await self.ledger.claim.remote(name):
            return await self._outcome_of(record)
        wait = self.settings.poll_s
        while True:
            batch = await self.api.batches.retrieve(record["batch_id"])
            counts = batch.request_counts
            if counts is not None:
                self.ledger.batch_progress.remote(
                    name, self.round, self.role, counts.completed + counts.failed
                )
            if batch.status in TERMINAL:
                break
            await asyncio.sleep(wait)
            wait = min(self.settings.poll_max_s, wait * 2)
        found: dict[str, Any] = {}
        final: dict[str, list[str]] = {}
        if batch.status == "failed":
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            reason = "; ".join(f"{e.code}: {e.message}" for e in errors[:3]) or "the batch failed"
            for key in record["keys"]:
                found[key] = Failed("batch_failed", self.client._redact(reason))
        else:
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id:
                    text = (await self.api.files.content(file_id)).text
                    for raw in text.splitlines():
                        if raw.strip():
                            key, value = await self._line(json.loads(raw))
                            found[key] = value
            # The file's new replies as one group, in the cache before any of their rows go on.
            new = [(k, v) for k, v in found.items() if isinstance(v, dict) and v.pop("_new", False)]
            await asyncio.to_thread(self.client.cache.put_many, new)
        for key, value in found.items():
            if isinstance(value, Failed):
                final[key] = [value.status, value.reason]
        await asyncio.to_thread(self.registry.finish, name, final)
        await self.ledger.batch_progress.remote(name, self.round, self.role, None)
        log.info("%s: batch %s %s", self.stage, batch.id, batch.status)
        return found

    async def _outcome_of(self, record: dict) -> dict[str, Any]:
        """Another actor collects this batch: wait until it has, then read the outcome."""
        while (done := await asyncio.to_thread(self.registry.outcome, record["name"])) is None:
            await asyncio.sleep(min(self.settings.poll_s, 5.0))
        final = done.get("final", {})
        out: dict[str, Any] = {}
        for key in record["keys"]:
            if key in final:
                out[key] = Failed(*final[key])
            elif (hit := await asyncio.to_thread(self.client.cache.get, key)) is not None:
                out[key] = hit
        return out

    async def _line(self, line: dict) -> tuple[str, Any]:
        """One line of an output or error file: the cache entry (stored and counted here), Failed,
        or None (submit again)."""
        key = line.get("custom_id")
        response = line.get("response") or {}
        status = response.get("status_code")
        if status is None:  # expired, cancelled: not executed, not billed
            return key, None
        body = response.get("body") or {}
        if status != 200:
            if status in RETRY_STATUSES or status >= 500:
                return key, None
            err = body.get("error", body) if isinstance(body, dict) else {}
            message = str(err.get("message", "")) if isinstance(err, dict) else str(err)
            kind = (
                "content_policy"
                if "content_policy" in json.dumps(body) or "content_filter" in json.dumps(body)
                else str(status)
            )
            return key, Failed(kind, self.client._redact(f"{message} ({status})"))
        hit = await asyncio.to_thread(self.client.cache.get, key)
        if hit is not None:  # collected before a kill: counted then
            return key, hit
        try:  # a reply without usage is estimated from its text (the prompt is not at hand here)
            reply = _reply(body, 0)
        except (_Malformed, ValueError, TypeError, AttributeError, KeyError):
            return key, None
        online = self.client._cost(reply.usage)
        usd = online * self.settings.price_factor
        entry = {"text": reply.text, "usage": reply.usage, "logprobs": reply.logprobs,
                 "response_id": reply.response_id, "usd": usd, "batch": True,
                 "refusal": reply.finish_reason == "content_filter"}  # fmt: skip
        delta = self.client.delta
        delta.add("prompt_tokens", reply.usage["prompt_tokens"])
        delta.add("completion_tokens", reply.usage["completion_tokens"])
        delta.add("usd", usd)
        delta.add("batch_usd", usd)
        delta.add("batch_saved_usd", online - usd)
        return key, {**entry, "_new": True}  # stored by the caller with the file's other replies
