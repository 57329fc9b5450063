"""Evaluation arithmetic on constructed judgments: win rate with ties and both answer orders, the
bootstrap interval, and the length-controlled win rate where verbosity inflates the raw rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tapir_ray.eval.winrate import bootstrap_ci, length_controlled, outcome, win_rate


def test_win_rate_counts_both_orders_and_ties_by_hand():
    pairs = [
        (((8, 5)), ((5, 8))),  # student better in both orders: 1
        (((5, 8)), ((8, 5))),  # reference better in both orders: 0
        (((7, 7)), ((6, 6))),  # ties in both orders: ½
        (((9, 4)), ((9, 4))),  # a judge that prefers whatever comes first: ½
    ]
    wr = win_rate(pairs, [10, 10, 10, 10], [10, 10, 10, 10])
    assert wr.prompts == 4 and wr.win_rate == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert (wr.wins, wr.ties, wr.losses) == (3, 2, 3)  # judgments, two per prompt
    assert outcome(3, 3) == 0.5 and outcome(4, 3) == 1.0 and outcome(2, 3) == 0.0
    # Position bias alone cannot win: a judge that always prefers the first answer gives ½.
    biased = win_rate([((9, 1), (9, 1))] * 20, [5] * 20, [5] * 20)
    assert biased.win_rate == 0.5 and biased.wins == biased.losses == 20


def test_bootstrap_interval_covers_the_mean_narrows_with_more_prompts_and_is_seeded():
    rng = np.random.default_rng(1)
    small = rng.choice([0.0, 0.5, 1.0], size=40, p=[0.3, 0.2, 0.5])
    big = rng.choice([0.0, 0.5, 1.0], size=1600, p=[0.3, 0.2, 0.5])
    lo, hi = bootstrap_ci(small, seed=3)
    assert lo < small.mean() < hi
    assert bootstrap_ci(small, seed=3) == (lo, hi)
    blo, bhi = bootstrap_ci(big, seed=3)
    assert (bhi - blo) < (hi - lo) / 4  # ~1/sqrt(40) of the width for 40× the prompts
    # The normal approximation agrees on a large sample: half-width ≈ 1.96·sd/√n.
    assert (bhi - blo) / 2 == pytest.approx(1.96 * big.std() / math.sqrt(len(big)), rel=0.15)


def test_length_controlled_win_rate_removes_a_verbosity_advantage():
    """Equal quality, but the judge favours the longer answer and the student is longer on 80 %
    of prompts: the raw win rate is inflated, the length-controlled one is back near ½."""
    rng = np.random.default_rng(0)
    n = 2000
    len_ref = rng.integers(80, 120, size=n).astype(float)
    longer = rng.random(n) < 0.8
    len_stu = np.where(
        longer, len_ref + rng.integers(50, 150, size=n), len_ref - rng.integers(50, 150, size=n)
    )
    diff = len_stu - len_ref
    p_win = 1 / (1 + np.exp(-2.0 * np.tanh(diff / diff.std())))
    pairs = []
    for p in p_win:
        a, b = rng.random() < p, rng.random() < p  # one draw per order
        pairs.append(((8, 5) if a else (5, 8), (5, 8) if b else (8, 5)))
    wr = win_rate(pairs, len_stu, len_ref)
    assert wr.win_rate > 0.65  # inflated by length
    assert abs(wr.lc_win_rate - 0.5) < 0.05 and wr.length_coef > 1.0
    # With no length difference the LC rate is the raw rate.
    same = length_controlled([1, 0, 0.5, 1, 1, 0], [5] * 6, [5] * 6)
    assert same == (pytest.approx(0.5833, abs=1e-3), 0.0)


def test_a_preference_verdict_is_read_from_text_or_from_the_a_b_probabilities():
    from tapir_ray.oracle import prompts as P

    assert P.parse_preference("A]]", prefilled=True) == (1.0, 0.0)
    assert P.parse_preference(P.PREFER_PREFILL + "B]] because", prefilled=True) == (0.0, 1.0)
    assert P.parse_preference("Longer, but wrong.\nBetter: [[B]]") == (0.0, 1.0)
    assert P.parse_preference("tie]] both fine", prefilled=True) == (0.5, 0.5)
    with pytest.raises(P.ParseError):
        P.parse_preference("I prefer the first one.")
    # A small judge whose likeliest token is not a verdict still ranks A against B.
    a, b = P.preference_at({"The": math.log(0.5), " A": math.log(0.1), "B": math.log(0.3)})
    assert (a, b) == (pytest.approx(0.25), pytest.approx(0.75))
    with pytest.raises(P.ParseError):
        P.preference_at({"The": 0.0})
    prompt = P.judge_preference("Add 2 and 2.", "4", "5")
    assert (
        "Better: [[A]]" in prompt.messages[0]["content"]
        and f"<<<ANSWER B {P.fence_tag('Add 2 and 2.', '4', '5')}>>>\n5\n"
        in prompt.messages[1]["content"]
    )
