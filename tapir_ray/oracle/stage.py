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
import json
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from tapir_ray import storage
from tapir_ray.config import EndpointConfig
from tapir_ray.oracle.cache import ResponseCache
from tapir_ray.oracle.client import Answer, DeadLetter, OracleClient
from tapir_ray.oracle.ledger import BudgetExceeded


class OracleStage:
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
    ):
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.endpoint = EndpointConfig.model_validate(endpoint)
        self.role, self.round, self.params, self.parse = role, round_, params, parse
        self.ledger = ledger
        self.client = OracleClient(
            self.endpoint,
            base_url,
            limiter=limiter,
            cache=ResponseCache(storage.join(run_dir, "oracle-cache")),
            identity=identity,
        )
        self.dead_dir = storage.join(run_dir, "dead-letter")
        self.tag = uuid.uuid4().hex[:8]
        self.batches = 0
        self.budget_ok = True

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(x) for x in batch["id"]]
        messages = [json.loads(m) for m in batch["messages"]]
        try:
            results = self.loop.run_until_complete(self._all(ids, messages))
        finally:
            self._flush_ledger()
        budget = [r for r in results if isinstance(r, BudgetExceeded)]
        other = [
            r for r in results if isinstance(r, BaseException) and not isinstance(r, BudgetExceeded)
        ]
        if other:
            raise other[0]
        dead = [r for r in results if isinstance(r, DeadLetter)]
        if dead:
            self._write_dead(dead)
        if budget:
            raise BudgetExceeded(
                "oracle.max_usd reached: the run stops here; raise the budget and resume with --resume"
            )
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

    async def _all(self, ids: list[str], messages: list[list[dict]]) -> list:
        calls = (
            self.client.call(
                i, self.role, m, self.params, self.parse, allowed=lambda: self.budget_ok
            )
            for i, m in zip(ids, messages, strict=True)
        )
        done = asyncio.Event()

        async def report_every(seconds: float) -> None:  # progress and budget within a long batch
            while not done.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), seconds)
                if not done.is_set():
                    self.budget_ok = await self.ledger.add.remote(
                        self.round, self.role, self._take_delta()
                    )

        ticker = asyncio.ensure_future(report_every(5.0))
        try:
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            done.set()
            await ticker

    def _take_delta(self) -> dict:
        delta = self.client.delta.counts
        self.client.delta.counts = type(delta)(
            **{k: (0.0 if k == "usd" else [] if k == "latencies" else 0) for k in delta}
        )
        return delta

    def _flush_ledger(self) -> None:
        self.budget_ok = ray.get(self.ledger.add.remote(self.round, self.role, self._take_delta()))

    def _write_dead(self, dead: list[DeadLetter]) -> None:
        self.batches += 1
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
        name = f"round-{self.round}-{self.role}-{self.tag}-{self.batches:05d}.jsonl"
        storage.write_text_atomic(storage.join(self.dead_dir, name), "\n".join(lines) + "\n")


def read_dead_letters(run_dir: str) -> list[dict]:
    folder = storage.join(run_dir, "dead-letter")
    fs, path = storage.fs_and_path(folder)
    if not fs.exists(path):
        return []
    rows = []
    for f in sorted(fs.glob(path + "/*.jsonl")):
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
    batch_size: int = 64,
    identity: str | None = None,
    limiter=None,
) -> ray.data.Dataset:
    """Send every row of `ds` (id, messages JSON) to the endpoint as `role`; see OracleStage."""
    from tapir_ray.oracle.limiter import limiter_for

    # A caller running several stages passes its limiter and keeps it alive between them (a named
    # actor whose last handle is dropped is destroyed, and a stage could pick up the dying one).
    if limiter is None:
        limiter = limiter_for(
            f"{identity or base_url}|{endpoint.model}", endpoint.rpm, endpoint.tpm
        )
    return ds.map_batches(
        OracleStage,
        fn_constructor_kwargs=dict(
            endpoint=endpoint.model_dump(), base_url=base_url, role=role, run_dir=run_dir, round_=round_,
            params=params, parse=parse, limiter=limiter, ledger=ledger, identity=identity,
        ),
        batch_size=batch_size,
        batch_format="numpy",
        # Fractional CPUs: an actor pool holding every CPU starves Ray Data's own read tasks.
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
    )  # fmt: skip
