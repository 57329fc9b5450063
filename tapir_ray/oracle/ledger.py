"""The cost ledger and budget of a run: one named Ray actor all oracle actors report to.

Per round and role it counts requests, cache hits, retries, 429s, prompt and completion tokens,
USD, successes and dead-letters, and keeps latencies for p50/p95. `oracle.max_usd` is enforced
here: once spent, `allowed()` turns false and the oracle stages stop sending (the run pauses,
resumable; what was answered is in the cache and is never paid for again).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from typing import Any

import ray

from tapir_ray import storage

COUNTERS = ("sent", "requests", "cache_hits", "retries", "rate_limited", "succeeded", "dead_lettered",
            "prompt_tokens", "completion_tokens", "usd")  # fmt: skip


class BudgetExceeded(RuntimeError):
    """The run spent `oracle.max_usd`; it stops here and resumes with `--resume` after a raise."""


def empty_entry() -> dict[str, Any]:
    return {**dict.fromkeys(COUNTERS, 0), "usd": 0.0, "latencies": []}


def summarize(entry: dict[str, Any]) -> dict[str, Any]:
    lat = sorted(entry.get("latencies", []))
    out = {k: entry.get(k, 0) for k in COUNTERS}
    out["usd"] = round(out["usd"], 6)
    out["latency_p50_s"] = round(statistics.median(lat), 4) if lat else None
    out["latency_p95_s"] = round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 4) if lat else None
    return out


PERSIST_EVERY_S = 1.0
MAX_LATENCIES = 10_000


@ray.remote(num_cpus=0, max_concurrency=100)
class Ledger:
    """Spend is written to `path` at most a second after it is reported (and at every flush), so a
    killed run loses at most that second; `cache_root` (a resumed run) also counts what the
    response cache says was paid, should the file be behind it."""

    def __init__(self, path: str | None, max_usd: float | None, cache_root: str | None = None):
        self.path = path
        self.max_usd = max_usd
        self.lock = threading.Lock()
        self.written = 0.0
        self.entries: dict[str, dict[str, dict]] = defaultdict(lambda: defaultdict(empty_entry))
        if path and storage.exists(path):
            for rnd, roles in storage.read_json(path).get("raw", {}).items():
                for role, entry in roles.items():
                    self.entries[rnd][role] = {**empty_entry(), **entry}
        if cache_root:
            from tapir_ray.oracle.cache import ResponseCache

            missing = ResponseCache(cache_root).total_usd() - self.spent()
            if missing > 1e-9:  # paid for, cached, never reported before a kill
                self.entries["0"]["recovered"]["usd"] += missing

    def add(self, round_: int, role: str, delta: dict[str, Any]) -> bool:
        with self.lock:
            entry = self.entries[str(round_)][role]
            for k in COUNTERS:
                entry[k] += delta.get(k, 0)
            entry["latencies"] = (entry["latencies"] + list(delta.get("latencies", [])))[
                -MAX_LATENCIES:
            ]  # the latest ones: the file is rewritten every second, whatever the run's size
            due = time.monotonic() - self.written >= PERSIST_EVERY_S
        if due:
            self.flush()
        return self.allowed()

    def done(self, round_: int, role: str) -> int:
        """Rows of a role finished (answered or dead-lettered) in a round: the stage's progress."""
        entry = self.entries[str(round_)][role]
        return entry["succeeded"] + entry["dead_lettered"]

    def has_budget(self) -> bool:
        return self.max_usd is not None

    def spent(self) -> float:
        return sum(e["usd"] for roles in self.entries.values() for e in roles.values())

    def allowed(self) -> bool:
        return self.max_usd is None or self.spent() < self.max_usd

    def snapshot(self) -> dict[str, Any]:
        return {
            "spent_usd": round(self.spent(), 6),
            "max_usd": self.max_usd,
            "rounds": {
                r: {role: summarize(e) for role, e in roles.items()}
                for r, roles in self.entries.items()
            },
        }

    def flush(self) -> dict[str, Any]:
        with self.lock:
            snap = self.snapshot()
            if self.path:
                raw = {
                    r: {role: {**e, "latencies": list(e["latencies"])} for role, e in roles.items()}
                    for r, roles in self.entries.items()
                }
                storage.write_json_atomic(self.path, {**snap, "raw": raw})
                self.written = time.monotonic()
        return snap
