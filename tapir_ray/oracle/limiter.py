"""One cluster-wide rate limiter per endpoint: a named Ray actor holding an RPM and a TPM budget.

Ray's `HttpRequestProcessorConfig` paces requests per actor (qps) and has no token budget: N
actors each at limit/N waste whatever one of them does not use, and a TPM limit cannot be expressed
at all. Here every oracle actor on every node asks one actor for a reservation before it sends, so
the endpoint's whole budget is shared, first come first served. A client asks for all of its
waiting requests in one call and reports its replies' usage with the next one: a call per request
and another per reply cost more CPU, here and in each client, than the requests themselves.

Budgets are token buckets refilled continuously. A bucket's capacity is a small share of the
per-minute limit, so that no 60-second window ever holds more than the limit (a hosted API's
window). A 429 pauses the whole endpoint for its Retry-After and cuts the rate (requests queued
meanwhile leave at that rate after the pause, not together); the rate then recovers step by step
with each success.
"""

from __future__ import annotations

import time
from typing import Any

import ray

Settled = tuple[float, float, int]  # replies' (estimated, reported prompt tokens, successes)

# A burst of BURST_SHARE of the per-minute limit, then paced at RATE_SHARE of it: a 60-second
# window holds at most 0.99 of the limit, and the 1 % left is the slack for sends that leave a
# little later than reserved and arrive bunched (without it, each minute's window overflowed).
# The first minute after the first request is paced at FIRST_MINUTE_SHARE: that is when a stage's
# actors start and their first sends leave late and bunched, and 1 % of slack did not cover it
# (429s at the 60 s mark). A burst of 1 % and a rate of 98 % hold the same 0.99 of the limit as
# this burst and rate, and send 1 % less a minute.
BURST_SHARE = 0.001
RATE_SHARE = 0.989
FIRST_MINUTE_SHARE = 0.98
# The requests in flight when a window overflows come back as 429s together: one cut for all of
# them (a cut each took the rate to its floor and minutes of successes to win it back).
CUT_HOLD_S = 2.0
# A client that has not told the limiter its load for this long has gone (its stage ended): its
# share of the endpoint's concurrency is no longer counted.
LOAD_STALE_S = 5.0


class TokenBuckets:
    """The limiter's arithmetic (kept apart from the actor so it can be tested directly)."""

    def __init__(self, rpm: float, tpm: float):
        self.rpm, self.tpm = float(rpm), float(tpm)
        self.scale = 1.0  # 429s cut it, successes restore it
        self.cut_until = float("-inf")
        self.req_cap = max(1.0, BURST_SHARE * self.rpm)
        self.tok_cap = max(1.0, BURST_SHARE * self.tpm)
        # A fresh limiter starts without its burst: a stage's actors start over several seconds
        # and their first sends leave late and bunched, which is what the first minute's slack is
        # for (starting full put a cluster of 429s at the 60 s mark). Its clock starts with the
        # first request it hears of, not when it was made: the seconds its stage's actors take to
        # start would otherwise fill the burst. Idle later, it refills.
        self.req = 1.0
        self.tok = self.tok_cap
        self.t: float | None = None  # the last refill's time
        self.first_minute_ends = float("inf")  # a minute after the first reservation (or 429)

    def _rates(self) -> tuple[float, float]:
        share = (
            FIRST_MINUTE_SHARE if self.t is None or self.t < self.first_minute_ends else RATE_SHARE
        )
        return share * self.rpm / 60 * self.scale, share * self.tpm / 60 * self.scale

    def _refill(self, now: float) -> None:
        if self.t is None:
            self.t, self.first_minute_ends = now, now + 60.0
        elif now > self.t:
            r_rate, t_rate = self._rates()
            self.req = min(self.req_cap, self.req + (now - self.t) * r_rate)
            self.tok = min(self.tok_cap, self.tok + (now - self.t) * t_rate)
            self.t = now

    def reserve(self, tokens: float, now: float, horizon: float | None = None) -> float:
        """Reserve one request and `tokens`; returns how long the caller must wait before sending.
        With a `horizon`, a reservation further ahead than that is not made: the (negative) result
        is minus the seconds after which asking again can succeed. So what is promised never
        reaches far into the future, and a 429's cut slows the requests within `horizon`."""
        tokens = min(
            tokens, self.tpm
        )  # a request larger than the whole budget waits a full minute, not forever
        self._refill(now)
        r_rate, t_rate = self._rates()
        wait = max(0.0, (1 - self.req) / r_rate, (tokens - self.tok) / t_rate)
        if horizon is not None and wait > horizon:
            return -(wait - horizon)
        self.req -= 1
        self.tok -= tokens
        return max(0.0, -self.req / r_rate, -self.tok / t_rate)

    def reconcile(self, estimated: float, actual: float) -> None:
        """Charge (or refund) the difference between the reserved tokens and the reported usage."""
        self.tok -= actual - estimated

    def rate_limited(self, retry_after: float, now: float) -> None:
        """A 429: nothing more leaves for `retry_after`, then sending resumes at the cut rate.
        The pause is a debt in the buckets, not a time every waiting request is released at
        (which would send the whole queue at once and earn the next 429)."""
        self._refill(now)
        if now >= self.cut_until:
            self.scale = max(0.25, self.scale * 0.8)
            self.cut_until = now + CUT_HOLD_S
        r_rate, t_rate = self._rates()
        self.req = min(self.req, -retry_after * r_rate)
        self.tok = min(self.tok, -retry_after * t_rate)

    def succeeded(self) -> None:
        self.scale = min(1.0, self.scale * 1.01)


class SharedConcurrency:
    """A stage's concurrency as one pool: each of its clients (one per oracle actor) may keep its
    own `max_concurrency` requests in flight, and more while the stage's other actors leave theirs
    unused.

    At the end of a stage the rows left sit in the actors that got the last batches, each capped at
    its own concurrency, while Ray Data stops the actors that have finished: with answers taking
    1-30 s (15 s on average) and 256 slots an actor, four actors of eight send at most 66 requests
    a second, 0.8 of a 5,000 RPM limit. Each client tells the limiter its load about once a second
    (requests in flight, and requests waiting for a slot). The pool holds the stage's actors times
    their concurrency; a client with requests waiting may keep in flight what it has plus a share
    of the slots the pool's live clients leave unused, in proportion to its waiting requests, and
    never less than its own concurrency. When the pool is over-full (an actor that lent its slots
    gets rows again) the shares turn negative and the borrowers send nothing new until they are
    back within theirs. Together a stage's clients hold no more than its pool but for the second a
    report takes.
    """

    def __init__(self) -> None:
        # pool: {client: (time of its report, requests in flight, requests waiting)}
        self.pools: dict[str, dict[str, tuple[float, int, int]]] = {}

    def grant(self, pool: str, size: int, client: str, in_flight: int, waiting: int, own: int,
              now: float) -> int:  # fmt: skip
        """Records a client's load; returns how many requests it may now keep in flight."""
        loads = self.pools.setdefault(pool, {})
        loads[client] = (now, in_flight, waiting)
        for name, (t, _, _) in list(loads.items()):
            if now - t > LOAD_STALE_S:  # its actor was stopped
                del loads[name]
        if not waiting:
            return own
        spare = size - sum(f for _, f, _ in loads.values())
        demand = sum(w for _, _, w in loads.values())
        return max(own, in_flight + spare * waiting // demand)

    def forget(self, now: float) -> None:
        """Drops the pools whose clients have all gone (their stages ended)."""
        for pool, loads in list(self.pools.items()):
            if all(now - t > LOAD_STALE_S for t, _, _ in loads.values()):
                del self.pools[pool]


@ray.remote(num_cpus=0, max_concurrency=1000)
class RateLimiter:
    """The shared budget of one endpoint; look it up with `limiter_for`. An async actor: every
    call is arithmetic, so one event loop answers them all, with no thread per call."""

    def __init__(self, rpm: float, tpm: float):
        self.buckets = TokenBuckets(rpm, tpm)
        self.concurrency = SharedConcurrency()
        self.stats = {"reservations": 0, "refused": 0, "rate_limited": 0, "waited_s": 0.0}

    async def reserve(
        self, tokens: list[float], horizon: float | None = None, settled: Settled | None = None
    ) -> list[float]:
        """Reservations for a client's waiting requests, in their order: each one's wait, up to
        and including the first refusal (negative: see TokenBuckets.reserve); the requests after
        it are not reserved. `settled` carries what the client's replies since its last call
        reported (one call a round trip for many requests: a call per request and a second per
        reply cost more CPU here and in each client than the requests themselves)."""
        if settled is not None:
            self._settle(*settled)
        now, waits = time.monotonic(), []
        for t in tokens:
            wait = self.buckets.reserve(t, now, horizon)
            waits.append(wait)
            if wait < 0:
                self.stats["refused"] += 1
                break
            self.stats["reservations"] += 1
            self.stats["waited_s"] += wait
        return waits

    def _settle(self, estimated: float, actual: float, successes: int) -> None:
        """Replies: their prompt tokens reconciled and their successes counted."""
        self.buckets.reconcile(estimated, actual)
        for _ in range(successes):
            self.buckets.succeeded()

    async def settled(self, estimated: float, actual: float, successes: int) -> None:
        self._settle(estimated, actual, successes)

    async def load(self, pool: str, size: int, client: str, in_flight: int, waiting: int,
                   own: int) -> int:  # fmt: skip
        """A client's requests in flight and waiting for a slot: how many it may keep in flight
        (see SharedConcurrency; `pool` names its stage, whose actors hold `size` slots)."""
        now = time.monotonic()
        self.concurrency.forget(now)
        return self.concurrency.grant(pool, size, client, in_flight, waiting, own, now)

    async def rate_limited(self, retry_after: float) -> None:
        self.stats["rate_limited"] += 1
        self.buckets.rate_limited(retry_after, time.monotonic())

    async def get_stats(self) -> dict:
        return {**self.stats, "scale": self.buckets.scale}


# A named actor dies when the handle its creator got is dropped, even while handles found by name
# are in use. The process keeps the handles it made, so a limiter outlives the runner that created
# it within one driver (a notebook or a test evaluating a run twice), and dies with the driver.
_KEPT: dict[tuple[str | None, str], Any] = {}


def limiter_for(endpoint_key: str, rpm: float, tpm: float, namespace: str | None = None):
    """The named limiter actor of an endpoint. The driver creates it and hands it to the stage actors.

    A limiter left by a driver that was just killed may still answer to its name while it dies:
    the handle is checked, and a fresh actor is made once the old name is free."""
    key = (namespace, f"tapir-limiter:{endpoint_key}")
    kept = _KEPT.get(key)
    if kept is not None:
        try:
            ray.get(kept.get_stats.remote(), timeout=30)
            return kept
        except Exception:  # dead, or from an earlier ray.init: make or find a live one
            _KEPT.pop(key, None)
    for _ in range(30):
        handle = RateLimiter.options(name=key[1], namespace=namespace, get_if_exists=True).remote(
            rpm, tpm
        )
        try:
            ray.get(handle.get_stats.remote(), timeout=30)
            _KEPT[key] = handle
            return handle
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(1.0)
    raise RuntimeError(f"could not start the rate limiter of {endpoint_key}")
