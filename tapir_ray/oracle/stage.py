"""The oracle stage: a Ray Data actor UDF that sends one chat request per row, many in flight.

Input rows carry `id` and `messages` (JSON). Output rows add `response`, `parsed` (JSON),
`prompt_tokens`, `completion_tokens` and `cached`. A row that finally fails is left out of the
output and written to `<run>/dead-letter/` with its id, role, status and reason, so
`sent = succeeded + dead-lettered` for every stage.

Ray's `HttpRequestProcessorConfig` would pace each actor alone (qps) with no token budget; this
stage asks the endpoint's shared RateLimiter actor instead (see limiter.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from tapir_ray import storage
from tapir_ray.config import EndpointConfig
from tapir_ray.oracle import prompts as P
from tapir_ray.oracle.batch import CURRENT, BatchSubmitter, Collector
from tapir_ray.oracle.cache import ResponseCache
from tapir_ray.oracle.client import Answer, DeadLetter, OracleClient
from tapir_ray.oracle.ledger import COUNTERS, BudgetExceeded, empty_entry
from tapir_ray.rundir import RunDir
from tapir_ray.runtime import lower_cpu_priority, map_batches_once

# What an oracle (or student) stage reads: a row id and the chat messages (JSON).
REQUESTS = pa.schema([("id", pa.string()), ("messages", pa.string())])


def chat_messages(instruction: str, input_text: str) -> str:
    """A request's messages (JSON): one user turn with the instruction and its input."""
    return json.dumps([{"role": "user", "content": P.user_content(instruction, input_text)}])


def write_requests(rows: list[dict], folder: str) -> None:
    """A stage's input as one table: id and messages (JSON), even when there are no rows."""
    storage.write_table(pa.Table.from_pylist(rows, schema=REQUESTS), folder)


class OracleStage:
    """Several batches run at once on one actor, and all of their requests share one event loop
    and the endpoint's concurrency, so the actor keeps up to `max_concurrency` requests in flight
    continuously: a batch's slowest reply holds up only that batch's output, never the next
    requests. The ledger hears about spend every second.

    Two levels run batches at once: Ray Data hands an actor several tasks (threads), and a task's
    input (blocks bundled up to at least `batch_size` rows, often two or more batches) goes
    through `__call__` a few batches at a time because `__call__` is a coroutine (Ray Data runs an
    async UDF's batches concurrently, four by default). With a plain function, a task's second
    batch waited for its first one's slowest reply: with answers taking 1-30 s, a stage's last
    rows reached the endpoint late (oracle_throughput's heavy-tailed phase, 0.91-0.99 of the
    limit from run to run)."""

    def __init__(
        self,
        endpoint: dict,
        base_url: str,
        role: str,
        run_dir: str,
        round_: int,
        params: dict[str, Any],
        parse: Callable | None,
        limiter,
        ledger,
        identity: str | None = None,
        stage: str | None = None,
        mode: str = "online",
        pool: tuple[str, int] | None = None,
        nice: int = 0,
    ):
        self.nice = nice
        lower_cpu_priority(nice)  # before the loop's thread starts: it takes this thread's value
        self.endpoint = EndpointConfig.model_validate(endpoint)
        self.role, self.round, self.params, self.parse = role, round_, params, parse
        self.ledger = ledger
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="oracle-loop").start()
        self.client = OracleClient(
            self.endpoint,
            base_url,
            limiter=limiter,
            cache=ResponseCache(RunDir(run_dir).oracle_cache),
            identity=identity,
            pool=pool,
        )  # made on the loop's thread would be the same: it holds no loop-bound state until used
        # Indexed before the first batch: every miss then takes the client's path without a
        # thread, and the first rows' requests do not leave after later ones.
        self.client.cache.load_index()
        self.dead_dir = RunDir(run_dir).dead_letter
        self.dead_prefix = dead_letter_prefix(stage or f"round-{round_}-{role}")
        self.tag = uuid.uuid4().hex[:8]
        self.batches = itertools.count(1)
        self.budget_ok = ray.get(ledger.allowed.remote())  # a resumed run may have spent it all
        if ray.get(ledger.has_budget.remote()):
            self.client.on_paid = self._report
        self.submitter = None
        if mode == "batch":
            self.submitter = BatchSubmitter(
                self.client, identity=identity or base_url, stage=stage or f"round-{round_}-{role}",
                round_=round_, role=role, run_dir=run_dir, ledger=ledger, allowed=lambda: self.budget_ok,
            )  # fmt: skip
        asyncio.run_coroutine_threadsafe(self._report_every(1.0), self.loop)

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray Data's loop runs this; the requests run on the client's own loop (made with the
        # actor, where the ledger's reports run too).
        lower_cpu_priority(self.nice)  # Ray Data's loop thread, started apart from __init__
        ids = [str(x) for x in batch["id"]]
        messages = [json.loads(m) for m in batch["messages"]]
        try:
            results = await self._on_loop(self._all(ids, messages))
        finally:
            await self._on_loop(self._report())
        # Rows the budget stopped before sending are left out, neither answered nor dead: the batch
        # still ends normally, so every request already in flight on any actor is received and
        # cached (raising here would tear down the other actors' in-flight requests, paid for and
        # lost). The caller sees the ledger's verdict once the stage is over (`budget_left`).
        other = [
            r for r in results if isinstance(r, BaseException) and not isinstance(r, BudgetExceeded)
        ]
        if other:
            raise other[0]
        dead = [r for r in results if isinstance(r, DeadLetter)]
        if dead:
            await asyncio.to_thread(self._write_dead, dead)
        keep = [k for k, r in enumerate(results) if isinstance(r, Answer)]
        out = {
            col: np.asarray(values)[keep] if len(keep) else np.asarray(values)[:0]
            for col, values in batch.items()
        }
        answers: list[Answer] = [results[k] for k in keep]
        out["response"] = np.array([a.text for a in answers], dtype=object)
        out["parsed"] = np.array([json.dumps(a.parsed) for a in answers], dtype=object)
        out["prompt_tokens"] = np.array(
            [a.usage.get("prompt_tokens", 0) for a in answers], dtype=np.int64
        )
        out["completion_tokens"] = np.array(
            [a.usage.get("completion_tokens", 0) for a in answers], dtype=np.int64
        )
        out["cached"] = np.array([a.cached for a in answers], dtype=bool)
        return out

    def _on_loop(self, coroutine) -> asyncio.Future:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    async def _all(self, ids: list[str], messages: list[list[dict]]) -> list:
        if self.submitter is not None:
            return await self._batched(ids, messages)
        calls = (
            self.client.call(
                i, self.role, m, self.params, self.parse, allowed=lambda: self.budget_ok
            )
            for i, m in zip(ids, messages, strict=True)
        )
        return await asyncio.gather(*calls, return_exceptions=True)

    async def _batched(self, ids: list[str], messages: list[list[dict]]) -> list:
        """Batch mode: every row runs through the client as online; the requests that miss the
        cache wait in a Collector until all rows wait, and then go out as provider batches (again
        for the repair requests of replies that did not parse)."""
        collector = Collector()
        token = CURRENT.set(
            collector
        )  # each task created here sees this Ray Data batch's collector
        try:
            tasks = [
                asyncio.ensure_future(self.client.call(i, self.role, m, self.params, self.parse,
                                                       allowed=lambda: self.budget_ok))
                for i, m in zip(ids, messages, strict=True)
            ]  # fmt: skip
        finally:
            CURRENT.reset(token)
        while unfinished := [t for t in tasks if not t.done()]:
            if collector.pending and collector.waiting >= len(unfinished):
                await self.submitter.run(collector.take())
                continue
            collector.changed.clear()
            changed = asyncio.ensure_future(collector.changed.wait())
            await asyncio.wait([*unfinished, changed], return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
        return [t.exception() or t.result() for t in tasks]

    async def _report(self) -> None:
        """Hands the ledger what was spent since the last report; learns whether budget is left."""
        delta = self.client.delta.counts
        if not any(delta[k] for k in COUNTERS) and not delta["latencies"]:
            return
        self.client.delta.counts = empty_entry()
        self.budget_ok = await self.ledger.add.remote(self.round, self.role, delta)

    async def _report_every(self, seconds: float) -> None:
        """The ledger and the limiter hear from this actor every `seconds` (the limiter also with
        each reservation call; the ledger, with a budget, after each paid reply), and the actor
        learns how many requests it may keep in flight (limiter.SharedConcurrency)."""
        while True:
            await asyncio.sleep(seconds)
            with contextlib.suppress(Exception):
                self.client.flush()
                await self._report()
            with contextlib.suppress(Exception):
                await self.client.share_load()

    def _write_dead(self, dead: list[DeadLetter]) -> None:
        lines = [
            json.dumps(
                {
                    "id": d.row_id,
                    "role": d.role,
                    "round": self.round,
                    "status": d.status,
                    "reason": d.reason,
                }
            )
            for d in dead
        ]
        name = f"{self.dead_prefix}{self.tag}-{next(self.batches):05d}.jsonl"
        storage.write_text_atomic(storage.join(self.dead_dir, name), "\n".join(lines) + "\n")


BUDGET_REACHED = (
    "oracle.max_usd reached: the run stops here; raise the budget and resume with --resume"
)


def budget_left(ledger) -> None:
    """After an oracle stage: BudgetExceeded if the run's budget ran out during it (the rows it
    stopped are not in the output; a resumed stage sends them, the rest comes from the cache)."""
    if not ray.get(ledger.allowed.remote()):
        raise BudgetExceeded(BUDGET_REACHED)


def dead_letter_prefix(stage: str) -> str:
    """File-name prefix of one stage's dead letters (a rerun of the stage replaces them)."""
    return stage.replace("/", "-").replace(" ", "_") + "--"


def clear_dead_letters(run_dir: str, stage: str) -> None:
    fs, path = storage.fs_and_path(RunDir(run_dir).dead_letter)
    if fs.exists(path):
        for f in fs.glob(f"{path}/{dead_letter_prefix(stage)}*.jsonl"):
            fs.rm(f)


class TooManyDeadLetters(RuntimeError):
    """A stage dead-lettered more than its allowed share: one line naming it, the count and the
    commonest reason. Its output is not marked done, so a rerun asks those rows again (what was
    answered comes from the cache)."""


def check_dead_share(run_dir: str, stage: str, total: int, answered: int, share: float) -> None:
    dead = total - answered
    if dead <= share * total:
        return
    reasons = Counter(f"{d['status']}: {d['reason']}" for d in read_dead_letters(run_dir, stage))
    common = f"; commonest: {reasons.most_common(1)[0][0][:200]}" if reasons else ""
    raise TooManyDeadLetters(
        f"{stage}: {dead} of {total} rows were dead-lettered ({dead / total:.1%}, above "
        f"oracle.max_dead_letter_share {share:g}){common}. Fix the cause (see "
        f"{RunDir(run_dir).dead_letter}) and run again with --resume: answered rows come "
        "from the cache and the dead-lettered ones are asked again"
    )


def read_dead_letters(run_dir: str, stage: str | None = None) -> list[dict]:
    """Every dead letter of the run, or one stage's."""
    folder = RunDir(run_dir).dead_letter
    fs, path = storage.fs_and_path(folder)
    if not fs.exists(path):
        return []
    rows = []
    pattern = f"{dead_letter_prefix(stage)}*.jsonl" if stage else "*.jsonl"
    for f in sorted(fs.glob(f"{path}/{pattern}")):
        with fs.open(f, "r") as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return rows


def oracle_map(
    ds: ray.data.Dataset,
    *,
    role: str,
    endpoint: EndpointConfig,
    base_url: str,
    run_dir: str,
    round_: int,
    params: dict[str, Any],
    ledger,
    parse: Callable | None = None,
    actors: int = 4,
    cpus_per_actor: float = 0.25,
    nice: int = 0,
    batch_size: int = 64,
    identity: str | None = None,
    limiter=None,
    stage: str | None = None,
    mode: str = "online",
) -> ray.data.Dataset:
    """Send every row of `ds` (id, messages JSON) to the endpoint as `role`; see OracleStage.
    `stage` names the dead-letter files (default: round and role). `mode="batch"` sends the
    requests through the provider's Batch API (batch.py): each Ray Data batch of up to
    `endpoint.batch.max_requests` rows is one provider batch, and every actor keeps several in
    flight. `nice`: the actors' CPU priority (OracleConfig.nice)."""
    from tapir_ray.oracle.limiter import limiter_for

    # A caller running several stages passes its limiter and keeps it alive between them (a named
    # actor whose last handle is dropped is destroyed, and a stage could pick up the dying one).
    if limiter is None:
        limiter = limiter_for(
            f"{identity or base_url}|{endpoint.model}", endpoint.rpm, endpoint.tpm
        )
    in_flight = batches_in_flight(endpoint, batch_size)
    if mode == "batch":  # a provider batch per Ray Data batch, several waiting at once per actor
        batch_size, in_flight = endpoint.batch.max_requests, 4
    return map_batches_once(
        ds,
        OracleStage,
        fn_constructor_kwargs=dict(
            endpoint=endpoint.model_dump(), base_url=base_url, role=role, run_dir=run_dir, round_=round_,
            params=params, parse=parse, limiter=limiter, ledger=ledger, identity=identity, stage=stage,
            mode=mode, pool=(uuid.uuid4().hex, actors * endpoint.max_concurrency), nice=nice,
        ),
        batch_size=batch_size,
        batch_format="numpy",
        # Fractional CPUs: an actor pool holding every CPU starves Ray Data's own read tasks.
        # Enough batches at once per actor that their rows keep max_concurrency requests busy.
        compute=ray.data.ActorPoolStrategy(
            size=actors, max_tasks_in_flight_per_actor=in_flight,
            max_concurrent_calls_per_actor=in_flight, enable_true_multi_threading=True,
        ),
        num_cpus=cpus_per_actor,
    )  # fmt: skip


def batches_in_flight(endpoint: EndpointConfig, batch_size: int) -> int:
    """Batches one actor works on at once: four times its concurrency in rows, 2 to 16 batches.
    A batch holds its slot until its slowest reply: with answers taking 1-30 s, twice the
    concurrency let the batches dispatched together finish together and leave the endpoint idle
    between waves (0.94 → 0.97 of the limit in oracle_throughput's heavy-tailed phase)."""
    return max(2, min(16, math.ceil(4 * endpoint.max_concurrency / max(1, batch_size))))
