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

# batch_*: the part sent through the provider's Batch API (requests, what it cost, and what the
# same requests would have cost online).
COUNTERS = ("sent", "requests", "cache_hits", "retries", "rate_limited", "succeeded", "dead_lettered",
            "prompt_tokens", "completion_tokens", "usd", "batch_requests", "batch_usd",
            "batch_saved_usd")  # fmt: skip


class BudgetExceeded(RuntimeError):
    """The run spent `oracle.max_usd`; it stops here and resumes with `--resume` after a raise."""


def empty_entry() -> dict[str, Any]:
    return {**dict.fromkeys(COUNTERS, 0), "usd": 0.0, "batch_usd": 0.0, "batch_saved_usd": 0.0,
            "latencies": []}  # fmt: skip


def summarize(entry: dict[str, Any]) -> dict[str, Any]:
    lat = sorted(entry.get("latencies", []))
    out = {k: entry.get(k, 0) for k in COUNTERS}
    for k in ("usd", "batch_usd", "batch_saved_usd"):
        out[k] = round(out[k], 6)
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
        # Batches submitted and not yet collected: their estimated cost counts against the budget
        # (committed spend), and their finished lines count as the stage's progress.
        self.committed: dict[str, float] = {}
        self.batch_done: dict[str, tuple[str, int]] = {}
        self.claimed: set[str] = set()
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

    def settle(self, round_: int, role: str) -> None:
        """Before a stage (re)starts: rows that a killed attempt had taken (`sent`) but neither
        answered nor dead-lettered are taken back, as this attempt sends them again; what was paid
        (requests, tokens, USD) stays."""
        with self.lock:
            entry = self.entries[str(round_)][role]
            entry["sent"] = min(entry["sent"], entry["succeeded"] + entry["dead_lettered"])

    def done(self, round_: int, role: str) -> int:
        """Rows of a role finished (answered or dead-lettered) in a round, and lines of its batches
        in flight that the provider has finished: the stage's progress."""
        entry = self.entries[str(round_)][role]
        where = f"{round_}|{role}"
        in_batches = sum(n for w, n in self.batch_done.values() if w == where)
        return entry["succeeded"] + entry["dead_lettered"] + in_batches

    def commit(self, batch: str, usd: float, force: bool = False) -> bool:
        """Reserves a batch's estimated cost before it is submitted; False (nothing reserved) when
        spent + committed + usd would pass oracle.max_usd. `force`: a batch already submitted
        (re-attached by a resumed run) is committed whatever is left."""
        with self.lock:
            others = sum(v for k, v in self.committed.items() if k != batch)
            if (
                not force
                and self.max_usd is not None
                and self.spent() + others + usd > self.max_usd
            ):
                return False
            self.committed[batch] = usd
            return True

    def headroom(self) -> float:
        """What may still be committed: max_usd - spent - committed (infinite without a budget)."""
        if self.max_usd is None:
            return float("inf")
        return self.max_usd - self.spent() - sum(self.committed.values())

    def batch_progress(self, batch: str, round_: int, role: str, done: int | None) -> None:
        """Lines of a batch in flight the provider has finished; None once it is collected (its
        rows then count as answered or dead-lettered) and its committed cost is released."""
        with self.lock:
            if done is None:
                self.batch_done.pop(batch, None)
                self.committed.pop(batch, None)
            else:
                self.batch_done[batch] = (f"{round_}|{role}", done)

    def claim(self, batch: str) -> bool:
        """True for the first caller only: that actor downloads the batch's results and counts
        their cost; the others read them from the cache."""
        with self.lock:
            if batch in self.claimed:
                return False
            self.claimed.add(batch)
            return True

    def has_budget(self) -> bool:
        return self.max_usd is not None

    def spent(self) -> float:
        return sum(e["usd"] for roles in self.entries.values() for e in roles.values())

    def allowed(self) -> bool:
        return self.max_usd is None or self.spent() + sum(self.committed.values()) < self.max_usd

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
