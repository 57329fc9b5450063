"""Whether a judge's verdicts can be trusted: figures every scoring round and evaluation records.

- order consistency: the share of comparisons whose winner survives swapping the two answers
  (a judge that always prefers one position scores 0.5 or less, whatever the answers);
- score spread: the standard deviation of the scores per source (a judge that gives every answer
  the same score separates nothing);
- parse failures: verdicts that could not be read (dead-lettered) as a share of those asked;
- mean valid mass: where scores are read from the judge's probabilities, the probability it put
  on well-formed scores (a judge that ignores the verdict format puts little there).

`warnings` lists, in one line each, what makes the judge look degenerate; the run prints them and
the report shows them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

MIN_CONSISTENCY = 0.6
MIN_SPREAD = 0.25
MAX_PARSE_FAILURES = 0.2
MIN_VALID_MASS = 0.5


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def order_consistency(pairs: Iterable[tuple[Sequence[float], Sequence[float]]]) -> float | None:
    """pairs: ((x, y) scored with x shown first, (y, x) scored with y shown first). A comparison is
    consistent when both orders name the same winner (or both a tie)."""
    outcomes = [
        _sign(first[0] - first[1]) == _sign(swapped[1] - swapped[0]) for first, swapped in pairs
    ]
    return round(sum(outcomes) / len(outcomes), 4) if outcomes else None


def spread(scores: Sequence[float]) -> float | None:
    return round(statistics.pstdev(scores), 4) if len(scores) > 1 else None


def spread_of(n: int, total: float, squares: float) -> float | None:
    """The same standard deviation from sums that add up block by block: n, Σx, Σx²."""
    if n < 2:
        return None
    mean = total / n
    return round(math.sqrt(max(0.0, squares / n - mean * mean)), 4)


def judge_health(
    *,
    asked: int,
    answered: int,
    consistency: float | None = None,
    scores_by_source: dict[str, Sequence[float]] | None = None,
    spreads: dict[str, float | None] | None = None,
    valid_mass: float | None = None,
) -> dict:
    """`spreads` (per source, e.g. from `spread_of`) stand in for `scores_by_source`;
    `valid_mass`: the mean probability the judge put on well-formed scores, where verdicts were
    read from its probabilities."""
    spreads = spreads or {k: spread(v) for k, v in (scores_by_source or {}).items()}
    failures = round((asked - answered) / asked, 4) if asked else None
    warnings = []
    if consistency is not None and consistency < MIN_CONSISTENCY:
        warnings.append(
            f"only {consistency:.0%} of its verdicts survive swapping the answers: it prefers a "
            "position, not an answer"
        )
    known = [s for s in spreads.values() if s is not None]
    if known and max(known) < MIN_SPREAD:
        warnings.append(f"its scores hardly vary (spread {max(known):.2f}): it separates nothing")
    if valid_mass is not None and valid_mass < MIN_VALID_MASS:
        warnings.append(
            f"it put on average {valid_mass:.0%} of its probability on well-formed scores: it "
            "mostly does not answer in the verdict format"
        )
    if failures is not None and failures > MAX_PARSE_FAILURES:
        warnings.append(f"{failures:.0%} of its verdicts could not be read")
    return {"order_consistency": consistency, "score_spread": spreads, "parse_failures": failures,
            "mean_valid_mass": valid_mass,
            "verdicts_asked": asked, "warnings": warnings}  # fmt: skip
