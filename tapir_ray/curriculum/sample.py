"""Selection at scale: a round's plan taken from a Ray Dataset of candidates, exact per-category
quotas, and nothing that grows with the pool collected in one place.

The rules are `plan.select_round` (MFD) and `plan.select_random` (the control arm); the result
holds the same ids. Each candidate's rank is the first 8 bytes of sha256(seed:round:id), the order
`plan.rank_key` gives (ties, which need 64 equal bits, go by id). Taking the n lowest-ranked rows
of a group without sorting or collecting it:

 1. one pass counts rows per group (category × pool); the quotas come from these counts;
 2. one pass counts rows per group and rank bucket (the rank's top 12 bits: 4096 buckets); each
    block sends back a fixed-size array and the driver adds them up as they arrive;
 3. the bucket in which a group's running count reaches its n is that group's boundary: one pass
    brings back only the rows of boundary buckets (about group size / 4096 each) and they decide
    the exact cut;
 4. a last pass keeps, block by block, the rows below the cut.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from tapir_ray.curriculum.plan import apportion, quotas, takes

BITS = 12
BUCKETS = 1 << BITS


def rank64(seed: int, round_: int, ids: list[str]) -> np.ndarray:
    """The rank of each id as uint64: the leading 8 bytes of `plan.rank_key`'s digest."""
    out = np.empty(len(ids), dtype=np.uint64)
    for k, item_id in enumerate(ids):
        digest = hashlib.sha256(f"{seed}:{round_}:{item_id}".encode()).digest()
        out[k] = int.from_bytes(digest[:8], "big")
    return out


def _tag(batch: pa.Table, seed: int, round_: int, mode: str, by_category: bool) -> pa.Table:
    """id, group (category or "*"), pool (hard | easy | random), rank; rows outside every pool
    (unscored and unused, or used in the random arm) are dropped here."""
    used = batch["used"].to_numpy(zero_copy_only=False).astype(bool)
    if mode == "random":
        keep = ~used
        pool = np.full(len(batch), "random", dtype=object)
    else:
        hard = batch["hard"]
        is_hard = pc.fill_null(hard, False).to_numpy(zero_copy_only=False).astype(bool)
        scored = pc.is_valid(hard).to_numpy(zero_copy_only=False)
        keep = scored | used
        pool = np.where(is_hard & ~used, "hard", "easy").astype(object)
    ids = batch["id"].filter(pa.array(keep))
    group = batch["category"] if by_category else pa.array(["*"] * len(batch), pa.string())
    return pa.table({
        "id": ids,
        "category": batch["category"].filter(pa.array(keep)),
        "group": group.filter(pa.array(keep)),
        "pool": pa.array(pool[keep], pa.string()),
        "rank": pa.array(rank64(seed, round_, ids.to_pylist()), pa.uint64()),
    })  # fmt: skip


def _keys(batch: pa.Table) -> list[tuple[str, str]]:
    return list(zip(batch["group"].to_pylist(), batch["pool"].to_pylist(), strict=True))


def _stream(ds: ray.data.Dataset, fn, **fn_kwargs: Any):
    """Each block's (small) answer from `fn`, one at a time."""
    for part in ds.map_batches(fn, fn_kwargs=fn_kwargs, batch_format="pyarrow",
                               batch_size=None).iter_batches(batch_format="pyarrow", batch_size=None):  # fmt: skip
        yield from part["out"].to_pylist()


def _count_groups(batch: pa.Table) -> pa.Table:
    counts = Counter(_keys(batch))
    return pa.table({"out": [[[g, p, str(n)] for (g, p), n in counts.items()]]})


def _buckets(batch: pa.Table) -> np.ndarray:
    return (batch["rank"].to_numpy() >> np.uint64(64 - BITS)).astype(np.int64)


def _histogram(batch: pa.Table, index: dict) -> pa.Table:
    hist = np.zeros((len(index), BUCKETS), dtype=np.int64)
    rows = np.asarray([index.get(k, -1) for k in _keys(batch)], dtype=np.int64)
    mask = rows >= 0
    np.add.at(hist, (rows[mask], _buckets(batch)[mask]), 1)
    return pa.table({"out": pa.array([hist.tobytes()], pa.binary())})  # one fixed-size array


def _boundary_rows(batch: pa.Table, boundary: dict) -> pa.Table:
    ranks, ids = batch["rank"].to_numpy(), batch["id"].to_pylist()
    out = [
        [g, p, str(r), i]
        for (g, p), b, r, i in zip(_keys(batch), _buckets(batch), ranks, ids, strict=True)
        if boundary.get((g, p)) == b
    ]
    return pa.table({"out": pa.array([out], pa.list_(pa.list_(pa.string())))})


def _below_cut(batch: pa.Table, cuts: dict) -> pa.Table:
    ranks = batch["rank"].to_numpy()
    keep = []
    for (g, p), r, i in zip(_keys(batch), ranks, batch["id"].to_pylist(), strict=True):
        cut = cuts.get((g, p))
        keep.append(cut is not None and (int(r), i) <= cut)
    out = batch.filter(pa.array(keep, pa.bool_()))
    return out.select(["id", "category", "pool", "rank"]).rename_columns(
        ["id", "category", "source", "rank"]
    )


def take_lowest(tagged: ray.data.Dataset, want: dict[tuple[str, str], int]) -> ray.data.Dataset:
    """The `want[(group, pool)]` lowest-ranked rows of each group of `tagged` (see _tag)."""
    index = {k: n for n, k in enumerate(sorted(k for k, v in want.items() if v > 0))}
    hist = np.zeros((len(index), BUCKETS), dtype=np.int64)
    for flat in _stream(tagged, _histogram, index=index):
        hist += np.frombuffer(flat, dtype=np.int64).reshape(len(index), BUCKETS)
    if not index:
        return tagged.limit(0).map_batches(
            _below_cut, fn_kwargs={"cuts": {}}, batch_format="pyarrow"
        )
    boundary, need = {}, {}
    for key, row in index.items():
        running = np.cumsum(hist[row])
        n = min(want[key], int(running[-1]))
        b = int(np.searchsorted(running, n))  # the first bucket where the running count reaches n
        boundary[key], need[key] = b, n - (int(running[b - 1]) if b else 0)
    edge: dict[tuple[str, str], list] = {}
    for part in _stream(tagged, _boundary_rows, boundary=boundary):
        for g, p, r, i in part:
            edge.setdefault((g, p), []).append((int(r), i))
    # need ≥ 1 wherever n ≥ 1: the boundary is the first bucket whose running count reaches n.
    cuts = {key: sorted(edge[key])[need[key] - 1] for key in index if need[key] > 0}
    return tagged.map_batches(_below_cut, fn_kwargs={"cuts": cuts}, batch_format="pyarrow")


def select_dataset(
    candidates: ray.data.Dataset,
    *,
    size: int,
    alpha: float | None,
    ratios: dict[str, float] | None,
    seed: int,
    round_: int,
) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """The round's plan from `candidates` (id, category, hard: bool|null, used: bool) as a lazy
    Dataset (id, category, source, rank), and its targets/shortfall. `alpha=None` is the random
    control arm (per category when `ratios` is given, else from the whole pool)."""
    mode = "random" if alpha is None else "mfd"
    by_category = ratios is not None
    tagged = candidates.map_batches(
        _tag, fn_kwargs=dict(seed=seed, round_=round_, mode=mode, by_category=by_category),
        batch_format="pyarrow",
    ).materialize()  # fmt: skip
    counts: Counter = Counter()
    for part in _stream(tagged, _count_groups):
        for g, p, n in part:
            counts[(g, p)] += int(n)
    groups = {g for g, _ in counts}
    if not by_category:
        available = counts.get(("*", "random"), 0)
        want = {("*", "random"): min(size, available)}
        return take_lowest(tagged, want), {"targets": {}, "hard_targets": {}, "shortfall": {}}
    targets = quotas(size, ratios, groups)
    hard_targets = (
        apportion(round(alpha * size), {c: float(q) for c, q in targets.items()})
        if mode == "mfd"
        else {}
    )
    want, shortfall = {}, {}
    for cat in sorted(targets):
        goal = targets[cat]
        if mode == "random":
            got = want[(cat, "random")] = min(goal, counts.get((cat, "random"), 0))
        else:
            n_hard, n_easy = takes(
                goal, hard_targets[cat], counts.get((cat, "hard"), 0), counts.get((cat, "easy"), 0)
            )
            want[(cat, "hard")], want[(cat, "easy")] = n_hard, n_easy
            got = n_hard + n_easy
        if goal - got:
            shortfall[cat] = goal - got
    info = {"targets": targets, "hard_targets": hard_targets, "shortfall": shortfall,
            "pool_rows": {f"{g}/{p}": n for (g, p), n in sorted(counts.items())}}  # fmt: skip
    return take_lowest(tagged, want), info
