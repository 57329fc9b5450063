"""Win-rate arithmetic for pairwise judgments (AlpacaEval style), kept free of I/O so it can be
checked by hand.

Every prompt is judged twice, once with the student's answer first and once with the reference
first. A judgment is a win (1), a tie (½) or a loss (0) for the student; a prompt's outcome is the
mean of its two judgments, so an order-biased judge that always prefers the first answer gives a
tie, not a win. The win rate is the mean prompt outcome, with a 95 % percentile bootstrap interval
over prompts.

The length-controlled win rate follows AlpacaEval 2.0 (Dubois et al., 2024): a logistic GLM of the
judgment on the standardised length difference, tanh((len_s − len_r) / σ), and the reported rate is
the model's win probability at zero length difference. AlpacaEval also fits a per-instruction
difficulty term across many models; with one student and one reference that term is not
identifiable, so it is left out (the length term is what corrects for verbose answers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def outcome(student: float, reference: float) -> float:
    """One judgment's value for the student: 1 win, 0.5 tie, 0 loss."""
    if student > reference:
        return 1.0
    if student < reference:
        return 0.0
    return 0.5


@dataclass
class WinRate:
    prompts: int
    win_rate: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    lc_win_rate: float | None
    length_coef: float | None
    mean_len_student: float
    mean_len_reference: float

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean under resampling of `values` with replacement."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def fit_logistic(
    features: np.ndarray, y: np.ndarray, *, l2: float = 1e-3, iters: int = 50
) -> np.ndarray:
    """Logistic regression with soft labels y ∈ [0, 1] (ties are ½), by Newton's method with a
    small ridge penalty (not on the intercept, column 0) so separable data stays finite."""
    w = np.zeros(features.shape[1])
    penalty = np.full(features.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(features @ w)))
        grad = features.T @ (p - y) + penalty * w
        hess = (features * (p * (1 - p))[:, None]).T @ features + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def length_controlled(
    judgments: Sequence[float], len_student: Sequence[float], len_reference: Sequence[float]
) -> tuple[float | None, float | None]:
    """(LC win rate, length coefficient) from per-judgment outcomes and answer lengths."""
    y = np.asarray(judgments, dtype=float)
    diff = np.asarray(len_student, dtype=float) - np.asarray(len_reference, dtype=float)
    if len(y) < 4:
        return None, None
    scale = diff.std()
    if scale == 0:  # no length differences: nothing to control for
        return float(y.mean()), 0.0
    x = np.column_stack([np.ones_like(diff), np.tanh(diff / scale)])
    w = fit_logistic(x, y)
    return float(1 / (1 + math.exp(-w[0]))), float(w[1])


def win_rate(
    pairs: Sequence[tuple[tuple[float, float], tuple[float, float]]],
    len_student: Sequence[float],
    len_reference: Sequence[float],
    *,
    seed: int = 0,
    resamples: int = 2000,
) -> WinRate:
    """pairs[i] = ((student, reference) scores from the judgment with the student's answer first,
                   (reference, student) scores from the one with the reference first).
    wins / ties / losses count judgments (two per prompt)."""
    judged, per_prompt, ls, lr = [], [], [], []
    for (student_first, reference_first), a, b in zip(
        pairs, len_student, len_reference, strict=True
    ):
        one = outcome(student_first[0], student_first[1])
        two = outcome(reference_first[1], reference_first[0])
        judged += [one, two]
        ls += [a, a]
        lr += [b, b]
        per_prompt.append((one + two) / 2)
    n = len(per_prompt)
    lo, hi = bootstrap_ci(per_prompt, resamples=resamples, seed=seed)
    lc, coef = length_controlled(judged, ls, lr)
    return WinRate(
        prompts=n,
        win_rate=float(np.mean(per_prompt)) if n else math.nan,
        ci_low=lo,
        ci_high=hi,
        wins=judged.count(1.0),
        ties=judged.count(0.5),
        losses=judged.count(0.0),
        lc_win_rate=lc,
        length_coef=coef,
        mean_len_student=float(np.mean(len_student)) if n else math.nan,
        mean_len_reference=float(np.mean(len_reference)) if n else math.nan,
    )
