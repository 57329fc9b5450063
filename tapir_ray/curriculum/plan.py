"""TAPIR's round planning as plain functions: round sizes, exact quotas, and the round's selection.

Everything here is deterministic given the seed: items are ranked by sha256(seed, round, id), so a
resumed run (or a second run with the same seed) picks exactly the same training set.

    quotas(N, π*, present)      N·π*(c) per category, renormalised over the categories present,
                                apportioned by largest remainder so the total is exactly N
    select_round(candidates, …) per category: the hard share α from the hard pool, the rest from the
                                easy pool (unused easy items + replay of items trained before),
                                down-sampled at random where a category has more than its quota;
                                what is still missing is the category's shortfall (→ expansion,
                                then duplication as a last resort)
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from tapir_ray.config import TapirConfig


def rank_key(seed: int, round_: int, item_id: str) -> str:
    return hashlib.sha256(f"{seed}:{round_}:{item_id}".encode()).hexdigest()


def in_fraction(seed: int, salt: str, item_id: str, fraction: float) -> bool:
    """A stable, seeded coin: the same id lands on the same side in every run with this seed."""
    digest = hashlib.sha256(f"{seed}:{salt}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def round_sizes(tapir: TapirConfig, pool_size: int) -> list[int]:
    """N_r per round (cumulative sizes as in the paper: 30K → 50K → 70K for a 52K pool)."""
    if tapir.round_sizes is not None:
        return list(tapir.round_sizes)
    return [max(1, round(f * pool_size)) for f in tapir.round_size_fractions]


def apportion(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder apportionment: integers proportional to `weights`, summing to `total`."""
    positive = {k: w for k, w in weights.items() if w > 0}
    if total <= 0 or not positive:
        return dict.fromkeys(weights, 0)
    norm = sum(positive.values())
    exact = {k: total * w / norm for k, w in positive.items()}
    out = {k: math.floor(v) for k, v in exact.items()}
    left = total - sum(out.values())
    # Largest remainders first; ties by name so the result never depends on dict order.
    for k in sorted(exact, key=lambda k: (-(exact[k] - out[k]), k))[:left]:
        out[k] += 1
    return {k: out.get(k, 0) for k in weights}


def quotas(total: int, ratios: dict[str, float], present: set[str]) -> dict[str, int]:
    """Per-category quota of a round of `total` items; ratios renormalise over present categories."""
    weights = {c: r for c, r in ratios.items() if c in present and r > 0}
    if not weights:
        raise ValueError(
            "no category of the taxonomy with a positive ratio is present in the pool; "
            f"present: {sorted(present)}"
        )
    return apportion(total, weights)


def takes(want: int, hard_target: int, hard_rows: int, easy_rows: int) -> tuple[int, int]:
    """How many hard and easy items a category of quota `want` takes: its hard share first, then
    easy ones; too few easy items and more hard ones fill in."""
    n_hard = min(hard_target, hard_rows, want)
    n_easy = min(want - n_hard, easy_rows)
    return min(want - n_easy, hard_rows), n_easy


@dataclass
class Selection:
    """One round's plan: chosen ids with their pool (hard | easy), and what each category lacks."""

    ids: list[str] = field(default_factory=list)
    category: list[str] = field(default_factory=list)
    source: list[str] = field(default_factory=list)  # hard | easy
    targets: dict[str, int] = field(default_factory=dict)
    hard_targets: dict[str, int] = field(default_factory=dict)
    shortfall: dict[str, int] = field(default_factory=dict)

    def table(self) -> pa.Table:
        return pa.table({"id": self.ids, "category": self.category, "source": self.source})


def select_round(
    candidates: pa.Table,
    *,
    size: int,
    alpha: float,
    ratios: dict[str, float],
    seed: int,
    round_: int,
) -> Selection:
    """Plan round `round_` from `candidates` (id, category, hard: bool|null, used: bool).

    Rows with `hard` null were not scored this round (the judge dead-lettered them) and are left
    out. Items trained in earlier rounds (`used`) are replay: they count as easy.
    """
    cols = candidates.select(["id", "category", "hard", "used"]).to_pydict()
    hard_pool: dict[str, list[str]] = {}
    easy_pool: dict[str, list[str]] = {}
    for item_id, cat, hard, used in zip(
        cols["id"], cols["category"], cols["hard"], cols["used"], strict=True
    ):
        if hard is None and not used:
            continue
        pool = hard_pool if (hard and not used) else easy_pool
        pool.setdefault(cat, []).append(item_id)
    for pool in (hard_pool, easy_pool):
        for cat in pool:
            pool[cat].sort(key=lambda i: rank_key(seed, round_, i))
    present = set(hard_pool) | set(easy_pool)
    targets = quotas(size, ratios, present)
    hard_targets = apportion(round(alpha * size), {c: float(q) for c, q in targets.items()})
    sel = Selection(targets=targets, hard_targets=hard_targets)
    for cat in sorted(targets):
        want = targets[cat]
        hard = hard_pool.get(cat, [])
        easy = easy_pool.get(cat, [])
        n_hard, n_easy = takes(want, hard_targets[cat], len(hard), len(easy))
        chosen = [(i, "hard") for i in hard[:n_hard]] + [(i, "easy") for i in easy[:n_easy]]
        for item_id, source in chosen:
            sel.ids.append(item_id)
            sel.category.append(cat)
            sel.source.append(source)
        if want - len(chosen):
            sel.shortfall[cat] = want - len(chosen)
    return sel


def select_random(
    candidates: pa.Table,
    *,
    size: int,
    ratios: dict[str, float] | None,
    seed: int,
    round_: int,
) -> Selection:
    """The control arm: `size` unused candidates in seeded random order, per category to the
    taxonomy's quotas when `ratios` is given, else from the whole pool. No judge involved."""
    cols = candidates.select(["id", "category", "used"]).to_pydict()
    pool: dict[str, list[str]] = {}
    for item_id, cat, used in zip(cols["id"], cols["category"], cols["used"], strict=True):
        if not used:
            pool.setdefault(cat, []).append(item_id)
    if ratios is None:
        ranked = sorted(
            ((i, c) for c, ids in pool.items() for i in ids),
            key=lambda x: rank_key(seed, round_, x[0]),
        )[:size]
        sel = Selection(targets=dict(Counter(c for _, c in ranked)))
        for item_id, cat in ranked:
            sel.ids.append(item_id)
            sel.category.append(cat)
            sel.source.append("random")
        return sel  # fewer than `size` only when the pool has run out
    sel = Selection(targets=quotas(size, ratios, set(pool)))
    for cat in sorted(sel.targets):
        members = sorted(pool.get(cat, []), key=lambda i: rank_key(seed, round_, i))
        chosen = members[: sel.targets[cat]]
        sel.ids += chosen
        sel.category += [cat] * len(chosen)
        sel.source += ["random"] * len(chosen)
        if sel.targets[cat] - len(chosen):
            sel.shortfall[cat] = sel.targets[cat] - len(chosen)
    return sel


def duplicate_fill(sel: Selection, shortfall: dict[str, int], seed: int, round_: int) -> None:
    """Last resort for a category still short after expansion: repeat its chosen items in rank order."""
    for cat, missing in sorted(shortfall.items()):
        members = [i for i, c in zip(sel.ids, sel.category, strict=True) if c == cat]
        if not members:
            continue
        members.sort(key=lambda i: rank_key(seed, round_, i))
        for k in range(missing):
            sel.ids.append(members[k % len(members)])
            sel.category.append(cat)
            sel.source.append("duplicate")


def mfd_histogram(
    mfd: list[float], width: float = 0.5, low: float = -9.0, high: float = 9.0
) -> dict[str, int]:
    """Counts of MFD per bin of `width` from `low` to `high` (scores are 1–10, so MFD is in −9..9);
    a bin is named by its lower edge."""
    n = round((high - low) / width)
    hist = {f"{low + k * width:g}": 0 for k in range(n + 1)}
    for v in mfd:
        k = min(n, max(0, math.floor((v - low) / width)))
        hist[f"{low + k * width:g}"] += 1
    return hist
