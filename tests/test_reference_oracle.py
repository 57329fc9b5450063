"""The reference oracle: task families a program answers and checks, and the server backend that
plays teacher, classifier, expander and judge for them (the verifiable quality benchmark)."""

from __future__ import annotations

import json
import random
import urllib.request

import pytest

from tapir_ray.config import DEFAULT_TAXONOMY
from tapir_ray.oracle import prompts as P
from tapir_ray.oracle.local import LocalOracle
from tapir_ray.oracle.reference import (
    DEFAULT_SKEW,
    FAMILIES,
    LEVELS,
    family_of,
    is_correct,
    make_split,
    reference_reply,
    score,
)

LABELS = list(DEFAULT_TAXONOMY)


def _reply(prompt: P.Prompt) -> str | None:
    return reference_reply(prompt.messages)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_solves_checks_and_levels_its_own_instances(name):
    family, rng = FAMILIES[name], random.Random(name)
    assert family.category in DEFAULT_TAXONOMY
    for level in LEVELS:
        for _ in range(20):
            text = family.make(rng, level)
            found = family_of(text)
            assert found is not None and found[0] is family, text
            answer = found[1]
            assert family.difficulty(text) == level, text
            # The teacher's worked answer checks; an answer with another result does not.
            worked = _reply(P.answer(text))
            assert worked.endswith(f"Final answer: {family.show(answer)}") and is_correct(
                text, worked
            )
            assert not is_correct(text, "I am not sure.")
    assert family_of("Write a poem about the sea.") is None


def test_the_teacher_shows_working_a_small_student_can_imitate():
    assert _reply(P.answer("Compute the value of (12 + 7) * 3 - 5.")).splitlines() == [
        "12 + 7 = 19", "19 * 3 = 57", "57 - 5 = 52", "Final answer: 52",
    ]  # fmt: skip
    dates = "What is the date 30 days after 2020-02-15? Answer in YYYY-MM-DD format."
    assert _reply(P.answer(dates)).splitlines() == [
        "2020-02-15 + 14 days = 2020-02-29", "2020-02-29 + 16 days = 2020-03-16",
        "Final answer: 2020-03-16",
    ]  # fmt: skip
    back = "What is the date 30 days before 2020-03-16? Answer in YYYY-MM-DD format."
    assert _reply(P.answer(back)).splitlines()[-1] == "Final answer: 2020-02-15"
    code = "What does this Python program print? x = 3; for i in range(2): x = x * 2 + i; print(x)"
    assert _reply(P.answer(code)).splitlines() == [
        "i = 0: x = 3 * 2 + 0 = 6", "i = 1: x = 6 * 2 + 1 = 13", "Final answer: 13",
    ]  # fmt: skip


def test_partial_credit_where_the_family_defines_it():
    text = "Sort these numbers from smallest to largest: 9, 4, 7, 1, 3."
    assert score(text, "Final answer: 1, 3, 4, 7, 9") == 1.0
    assert score(text, "Final answer: 1, 3, 7, 4, 9") == pytest.approx(0.6)
    assert score("Compute the value of 2 + 3 * 4.", "It is 14.") == 1.0  # precedence kept
    assert score("Compute the value of 2 + 3 * 4.", "It is 20.") == 0.0
    assert score("Write a poem about the sea.", "Waves.") is None


def test_the_split_is_skewed_disjoint_and_seeded():
    pool, test = make_split(seed=1, pool_size=200, test_per_family=5)
    assert len(pool) == 200 and len(test) == 5 * len(FAMILIES)
    counts = {name: sum(r["family"] == name for r in pool) for name in FAMILIES}
    assert counts == {name: round(share * 200) for name, share in DEFAULT_SKEW.items()}
    assert not {r["instruction"] for r in pool} & {r["instruction"] for r in test}
    assert len({r["id"] for r in pool + test}) == len(pool) + len(test)
    assert all(is_correct(r["instruction"], r["output"]) for r in pool + test)
    assert make_split(seed=1, pool_size=200, test_per_family=5) == (pool, test)
    assert make_split(seed=2, pool_size=200, test_per_family=5)[0] != pool
    assert {r["level"] for r in pool + test} == {1, 2, 3}
    # With the easy level: every family has level-0 instances, and each names its level.
    easy, _ = make_split(seed=1, pool_size=400, test_per_family=5, levels=(0, 3))
    assert {r["family"] for r in easy if r["level"] == 0} == set(FAMILIES)
    assert all(FAMILIES[r["family"]].difficulty(r["instruction"]) == r["level"] for r in easy)


def test_the_oracle_roles_on_our_own_prompts():
    text = "What is the date 30 days after 2020-02-15? Answer in YYYY-MM-DD format."
    right, wrong = "Final answer: 2020-03-16", "Final answer: 2020-03-17"
    # Teacher answer and task-aware refinement: correct, in the family's worked form.
    assert is_correct(text, _reply(P.answer(text)))
    assert is_correct(text, _reply(P.answer(text, style="reasoning")))
    # Classification: the family's category, or Others when the labels lack it.
    assert P.parse_label(_reply(P.classify(text, LABELS)), LABELS) == "Reasoning"
    assert (
        P.parse_label(_reply(P.classify(text, ["Math", "Others"])), ["Math", "Others"]) == "Others"
    )
    # Expansion: a new instance of the same family at the same difficulty.
    new = P.parse_instruction(_reply(P.expand(text, "Reasoning")))
    family, _ = family_of(new)
    assert (
        family.name == "dates" and new != text and family.difficulty(new) == family.difficulty(text)
    )
    again = _reply(P.expand(text + "\n\n(Variation 2.)", "Reasoning"))
    assert again != new and family_of(again)[0].name == "dates"
    # The judge checks; pairwise and A/B verdicts prefer the correct answer in either position.
    assert P.parse_rating(_reply(P.judge_single(text, right))) == 10
    assert P.parse_rating(_reply(P.judge_single(text, wrong))) == 1
    assert P.parse_pair(_reply(P.judge_pairwise(text, wrong, right))) == (1, 10)
    assert P.parse_preference(_reply(P.judge_preference(text, right, wrong))) == (1.0, 0.0)
    assert P.parse_preference(_reply(P.judge_preference(text, wrong, right))) == (0.0, 1.0)
    # Not a family's instruction: no reference reply (the server answers it as scripted).
    assert _reply(P.judge_single("Write a poem.", "Waves.")) is None


def _chat(base_url: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base_url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_the_reference_backend_serves_verdicts_with_certain_score_probabilities():
    text = "Compute the value of (12 + 7) * 3 - 5."
    with LocalOracle("--backend", "reference") as server:
        answer = _chat(server.base_url, {"model": "local", "messages": P.answer(text).messages})
        assert is_correct(text, answer["choices"][0]["message"]["content"])
        judged = P.prefilled(P.judge_single(text, "The result is 52."), P.VERDICT_PREFILL)
        out = _chat(server.base_url, {"model": "local", "messages": judged, "logprobs": True,
                                      "top_logprobs": 5, "continue_final_message": True})  # fmt: skip
        first = out["choices"][0]["logprobs"]["content"][0]
        assert out["choices"][0]["message"]["content"].startswith("10]]")
        assert first["token"] == "10" and [t["token"] for t in first["top_logprobs"]] == ["10"]
        poem = _chat(
            server.base_url, {"model": "local", "messages": P.answer("Write a poem.").messages}
        )
        assert poem["choices"][0]["message"]["content"].startswith("Here is a careful answer")
