"""The reference oracle: instructions whose answers a program computes and checks.

Each task family renders an instance (drawn from a seeded RNG at a difficulty level) as an
instruction, and recomputes the instance's answer from the instruction text alone. The server
(`tapir-ray oracle serve --backend reference`) therefore keeps no state: it finds the instruction
inside whatever prompt it is sent and plays every oracle role perfectly —

- teacher and refiner: the correct answer, with its working, ending in `Final answer: ...`;
- task classifier: the family's taxonomy category (`Others` when the label list lacks it);
- expander: a new instance of the same family at the same difficulty;
- judge: checks the answer (`Rating: [[10]]` if right, `[[1]]` if wrong, partial credit where the
  family defines it); pairwise and A/B verdicts prefer the correct answer.

Prompts that are not about a family's instruction fall back to the scripted replies.
`make_split` draws a pool and a held-out test set with a realistic skew across families (some
scarce, so re-balancing and expansion matter); `is_correct` is the benchmark's exact match.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tapir_ray.oracle.prompts import unfenced

# --- families -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    category: str  # a label of the default TAPIR taxonomy
    make: Callable[[random.Random, int], str]  # (rng, difficulty LEVELS) -> instruction
    solve: Callable[[str], Any]  # instruction -> answer, or None when it is not this family's
    show: Callable[[Any], str]  # answer -> its canonical text
    extract: Callable[[str], Any]  # a reply -> the answer it gives, or None
    difficulty: Callable[[str], int]  # instruction -> its difficulty level
    credit: Callable[[Any, Any], float] | None = None  # partial credit in [0, 1]
    work: Callable[[str], list[str]] | None = None  # the worked steps a student can imitate


# Difficulty levels. Level 0 is what a ~100M-parameter student partly answers before any tuning
# (two one-digit terms, one day on, three numbers, a three-letter word, one CSV row, a loop that
# runs at most once): a pool with it gives the judge easy candidates to tell from hard ones.
# Levels 1-3 are all hard for such a student; `make_split` draws levels 1-3 unless asked.
LEVELS = (0, 1, 2, 3)


def _last(pattern: str, text: str, flags: int = 0) -> str | None:
    found = re.findall(pattern, _final_part(text), flags)
    return found[-1] if found else None


def _final_part(reply: str) -> str:
    """What follows `Final answer:` when the reply has it, else the whole reply."""
    parts = re.split(r"final answer\s*:", reply, flags=re.I)
    return parts[-1] if len(parts) > 1 else reply


# 1. arithmetic (Math): integer expressions with + - * and parentheses.
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _eval_int(node: ast.AST) -> int:
    if isinstance(node, ast.Expression):
        return _eval_int(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval_int(node.left), _eval_int(node.right))
    raise ValueError("not an integer expression")


def _arith_steps(text: str) -> list[str]:
    """One line per operation, innermost first: `12 + 7 = 19`."""
    steps: list[str] = []

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        left, right = walk(node.left), walk(node.right)
        value = _OPS[type(node.op)](left, right)
        sign = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}[type(node.op)]
        steps.append(f"{left} {sign} {right} = {value}")
        return value

    m = re.fullmatch(r"Compute the value of ([\d\s()+\-*]+)\.", text.strip())
    walk(ast.parse(m.group(1), mode="eval"))
    return steps


def _arith_make(rng: random.Random, level: int) -> str:
    terms = [str(rng.randint(2, 9 + 20 * level)) for _ in range(level + 2)]
    expr = terms[0]
    for k, t in enumerate(terms[1:]):
        expr = f"{expr} {rng.choice('+-*')} {t}"
        if k == 0 and level > 1:
            expr = f"({expr})"
    return f"Compute the value of {expr}."


def _arith_solve(text: str) -> int | None:
    m = re.fullmatch(r"Compute the value of ([\d\s()+\-*]+)\.", text.strip())
    return _eval_int(ast.parse(m.group(1), mode="eval")) if m else None


ARITHMETIC = Family(
    "arithmetic", "Math", _arith_make, _arith_solve, str,
    lambda r: int(v) if (v := _last(r"-?\d+", r)) is not None else None,
    lambda t: len(re.findall(r"\d+", t)) - 2, work=_arith_steps,
)  # fmt: skip


# 2. dates (Reasoning): a date plus or minus a number of days (more days: more month ends).
_DAY_RANGES = ((1, 1), (2, 40), (41, 160), (161, 360))  # by level


def _days(n: int) -> str:
    return f"{n} day" if n == 1 else f"{n} days"


def _date_make(rng: random.Random, level: int) -> str:
    start = dt.date(2000, 1, 1) + dt.timedelta(days=rng.randint(0, 9000))
    days = rng.randint(*_DAY_RANGES[level])
    way = rng.choice(["after", "before"])
    return f"What is the date {_days(days)} {way} {start.isoformat()}? Answer in YYYY-MM-DD format."


def _date_solve(text: str) -> str | None:
    m = re.fullmatch(r"What is the date (\d+) days? (after|before) (\d{4}-\d{2}-\d{2})\? Answer "
                     r"in YYYY-MM-DD format\.", text.strip())  # fmt: skip
    if not m:
        return None
    days = int(m.group(1)) * (1 if m.group(2) == "after" else -1)
    return (dt.date.fromisoformat(m.group(3)) + dt.timedelta(days=days)).isoformat()


def _date_steps(text: str) -> list[str]:
    """Month ends crossed on the way: `2020-02-15 + 14 days = 2020-02-29`, ..."""
    m = re.search(r"date (\d+) days? (after|before) (\d{4}-\d{2}-\d{2})", text)
    left, forward, day = int(m.group(1)), m.group(2) == "after", dt.date.fromisoformat(m.group(3))
    steps = []
    while left:
        if forward:
            start = day + dt.timedelta(days=1)  # to the end of the month the next day is in
            end = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1) - dt.timedelta(
                days=1
            )
            hop = min(left, (end - day).days)
            new = day + dt.timedelta(days=hop)
        else:
            hop = min(left, day.day) or 1
            new = day - dt.timedelta(days=hop)
        steps.append(
            f"{day.isoformat()} {'+' if forward else '-'} {_days(hop)} = {new.isoformat()}"
        )
        day, left = new, left - hop
    return steps


DATES = Family(
    "dates", "Reasoning", _date_make, _date_solve, str,
    lambda r: _last(r"\d{4}-\d{2}-\d{2}", r),
    lambda t: sum(int(re.search(r"(\d+) days?", t).group(1)) > hi for _, hi in _DAY_RANGES[:3]),
    work=_date_steps,
)  # fmt: skip


# 3. sorting (Complex Format): a list of numbers, ascending.
def _sort_make(rng: random.Random, level: int) -> str:
    nums = rng.sample(range(1, 50 * level + 50), 3 + 2 * level)
    return f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}."


def _sort_solve(text: str) -> list[int] | None:
    m = re.fullmatch(r"Sort these numbers from smallest to largest: ([\d, ]+)\.", text.strip())
    return sorted(int(x) for x in m.group(1).split(",")) if m else None


def _sort_extract(reply: str) -> list[int] | None:
    runs = re.findall(r"-?\d+(?:\s*,\s*-?\d+)+", _final_part(reply))
    return [int(x) for x in runs[-1].split(",")] if runs else None


def _sort_credit(want: list[int], got: list[int]) -> float:
    return sum(a == b for a, b in zip(want, got, strict=False)) / len(want) if got else 0.0


SORTING = Family(
    "sorting", "Complex Format", _sort_make, _sort_solve, lambda a: ", ".join(map(str, a)),
    _sort_extract, lambda t: (len(re.findall(r"\d+", t)) - 3) // 2, _sort_credit,
)  # fmt: skip


# 4. reversal (Paraphrase): a word written backwards.
_WORDS = ("planet", "lantern", "harvest", "meadow", "compass", "pepper", "orchard", "whistle",
          "glacier", "thunder", "biscuit", "velvet", "horizon", "cathedral", "labyrinth", "marmalade")  # fmt: skip


_SHORT = ("cat", "sun", "map", "red", "box", "pen", "cup", "hat", "dog", "fox", "bus", "jam",
          "owl", "bed", "ink", "log", "mud", "net", "pig", "rug", "tea", "van", "web", "zip",
          "arm", "bag", "cow", "den", "egg", "fig", "gum", "hen", "ice", "jar", "kit", "lid")  # fmt: skip


def _rev_make(rng: random.Random, level: int) -> str:
    word = "".join(rng.sample(_WORDS, level)) if level else rng.choice(_SHORT)
    return f"Write the letters of the word '{word}' in reverse order."


def _rev_solve(text: str) -> str | None:
    m = re.fullmatch(r"Write the letters of the word '([a-z]+)' in reverse order\.", text.strip())
    return m.group(1)[::-1] if m else None


def _rev_level(text: str) -> int:
    """How many of the family's words the reversed word is made of (0: a short word)."""
    word = (_rev_solve(text) or "")[::-1]
    if word in _SHORT:
        return 0
    best = {0: 0}  # prefix length -> fewest words that make it
    for end in range(1, len(word) + 1):
        parts = [
            best[end - len(w)] + 1
            for w in _WORDS
            if word[:end].endswith(w) and end - len(w) in best
        ]
        if parts:
            best[end] = min(parts)
    return best.get(len(word), 1)


REVERSAL = Family(
    "reversal", "Paraphrase", _rev_make, _rev_solve, str,
    lambda r: _last(r"[a-z]{3,}", r.lower()), _rev_level,
    work=lambda t: [f"Letters last to first: {' '.join(_rev_solve(t))}"],
)  # fmt: skip


# 5. counting (Common-Sense): how often a letter occurs in a phrase.
def _count_make(rng: random.Random, level: int) -> str:
    phrase = " ".join(rng.sample(_WORDS, 1 + level))
    letter = rng.choice(sorted(set(phrase.replace(" ", ""))))
    return f"How many times does the letter '{letter}' appear in '{phrase}'?"


def _count_solve(text: str) -> int | None:
    m = re.fullmatch(
        r"How many times does the letter '([a-z])' appear in '([a-z ]+)'\?", text.strip()
    )
    return m.group(2).count(m.group(1)) if m else None


def _count_steps(text: str) -> list[str]:
    m = re.search(r"letter '([a-z])' appear in '([a-z ]+)'", text)
    return [f"{w}: {w.count(m.group(1))}" for w in m.group(2).split()]


COUNTING = Family(
    "counting", "Common-Sense", _count_make, _count_solve, str,
    lambda r: int(v) if (v := _last(r"\d+", r)) is not None else None,
    lambda t: len(t.split("'")[3].split()) - 1 if t.count("'") >= 4 else 1,
    work=_count_steps,
)  # fmt: skip


# 6. CSV to JSON (Code Generation): a small table as a JSON list of objects.
_NAMES = ("Ann", "Bob", "Chen", "Dina", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo")


def _csv_make(rng: random.Random, level: int) -> str:
    rows = [f"{n},{rng.randint(18, 90)}" for n in rng.sample(_NAMES, 1 + level)]
    table = "\\n".join(["name,age", *rows])
    return f"Convert this CSV to a JSON list of objects, with ages as numbers: {table}"


def _csv_solve(text: str) -> list[dict] | None:
    m = re.fullmatch(
        r"Convert this CSV to a JSON list of objects, with ages as numbers: (.+)", text.strip()
    )
    if not m:
        return None
    lines = m.group(1).split("\\n")[1:]
    return [{"name": n, "age": int(a)} for n, a in (line.split(",") for line in lines)]


def _csv_extract(reply: str) -> list | None:
    start, end = reply.find("["), reply.rfind("]")
    try:
        return json.loads(reply[start : end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
        return None


CSV_JSON = Family(
    "csv_json", "Code Generation", _csv_make, _csv_solve, lambda a: json.dumps(a),
    _csv_extract, lambda t: t.count("\\n") - 1,
)  # fmt: skip


# 7. code output (Computer Science): what a short loop prints.
def _code_make(rng: random.Random, level: int) -> str:
    x, n, k = rng.randint(1, 9), rng.randint(2 * level, 2 * level + 1), rng.randint(2, 3)
    op = rng.choice(["+", "-"])
    return (f"What does this Python program print? x = {x}; for i in range({n}): x = x * {k} {op} i; "
            "print(x)")  # fmt: skip


def _code_solve(text: str) -> int | None:
    m = re.fullmatch(r"What does this Python program print\? x = (\d+); for i in range\((\d+)\): "
                     r"x = x \* (\d+) ([+-]) i; print\(x\)", text.strip())  # fmt: skip
    if not m:
        return None
    x, n, k, op = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
    for i in range(n):
        x = x * k + i if op == "+" else x * k - i
    return x


def _code_steps(text: str) -> list[str]:
    m = re.search(r"x = (\d+); for i in range\((\d+)\): x = x \* (\d+) ([+-]) i", text)
    x, n, k, op = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
    steps = []
    for i in range(n):
        new = x * k + i if op == "+" else x * k - i
        steps.append(f"i = {i}: x = {x} * {k} {op} {i} = {new}")
        x = new
    return steps


CODE_OUTPUT = Family(
    "code_output", "Computer Science", _code_make, _code_solve, str,
    lambda r: int(v) if (v := _last(r"-?\d+", r)) is not None else None,
    lambda t: int(re.search(r"range\((\d+)\)", t).group(1)) // 2, work=_code_steps,
)  # fmt: skip


FAMILIES: dict[str, Family] = {
    f.name: f for f in (ARITHMETIC, DATES, SORTING, REVERSAL, COUNTING, CSV_JSON, CODE_OUTPUT)
}
# Pool shares: Math and Reasoning plentiful, the rest scarce (the taxonomy asks for more of some
# than the pool has, so re-balancing and expansion have work to do).
DEFAULT_SKEW = {"arithmetic": 0.34, "dates": 0.26, "sorting": 0.12, "reversal": 0.1,
                "counting": 0.08, "csv_json": 0.05, "code_output": 0.05}  # fmt: skip


def family_of(instruction: str) -> tuple[Family, Any] | None:
    """The family whose instruction this is, and its answer."""
    for family in FAMILIES.values():
        try:
            answer = family.solve(instruction)
        except (ValueError, SyntaxError, AttributeError, IndexError):
            answer = None
        if answer is not None:
            return family, answer
    return None


def score(instruction: str, reply: str) -> float | None:
    """Credit in [0, 1] of a reply to a family's instruction (None: not a family's instruction)."""
    found = family_of(instruction)
    if found is None:
        return None
    family, want = found
    got = family.extract(reply)
    if got == want:
        return 1.0
    return family.credit(want, got) if family.credit and isinstance(got, list) else 0.0


def is_correct(instruction: str, reply: str) -> bool:
    return score(instruction, reply) == 1.0


def make_split(seed: int, pool_size: int, test_per_family: int,
               skew: dict[str, float] | None = None,
               levels: tuple[int, int] = (1, 3)) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """A pool (`id`, `instruction`, `input`, `output`, `family`, `level`) drawn with `skew`, and a
    test set of `test_per_family` instances of every family; difficulty levels from `levels`
    (lowest, highest) uniformly; no instruction in both."""
    rng = random.Random(seed)
    skew = skew or DEFAULT_SKEW
    seen: set[str] = set()

    def draw(name: str) -> dict:
        family = FAMILIES[name]
        for _ in range(1000):
            level = rng.randint(*levels)
            text = family.make(rng, level)
            if text not in seen:
                seen.add(text)
                return {"instruction": text, "input": "", "output": family.show(family.solve(text)),
                        "family": name, "level": level}  # fmt: skip
        raise RuntimeError(f"family {name} has too few distinct instances for this split")

    test = [draw(name) for name in FAMILIES for _ in range(test_per_family)]
    counts = {name: round(share * pool_size) for name, share in skew.items()}
    pool = [draw(name) for name, n in counts.items() for _ in range(n)]
    rng.shuffle(pool)
    for prefix, rows in (("p", pool), ("t", test)):
        for i, row in enumerate(rows):
            row["id"] = f"{prefix}{i}"
    return pool, test


# --- the oracle's replies -------------------------------------------------------------------------


def _worked(family: Family, instruction: str, answer: Any) -> str:
    """Short working a small student can imitate, then the result."""
    steps = family.work(instruction) if family.work else []
    return "\n".join([*steps, f"Final answer: {family.show(answer)}"])


def _rating(credit: float) -> int:
    return max(1, min(10, 1 + round(9 * credit)))


def reference_reply(messages: list[dict[str, Any]]) -> str | None:
    """The reference oracle's reply, or None when the prompt is not about a family's instruction."""
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    instruction = unfenced(user, "INSTRUCTION")
    if "Rating: [[k]]" in system and instruction is not None:
        credit = score(instruction, unfenced(user, "ANSWER") or "")
        if credit is None:
            return None
        return f"The answer was checked against the computed result.\nRating: [[{_rating(credit)}]]"
    if ("Scores: [[a, b]]" in system or "Better: [[A]]" in system) and instruction is not None:
        a = score(instruction, unfenced(user, "ANSWER A") or "")
        b = score(instruction, unfenced(user, "ANSWER B") or "")
        if a is None or b is None:
            return None
        if "Scores: [[a, b]]" in system:
            return f"Both answers were checked.\nScores: [[{_rating(a)}, {_rating(b)}]]"
        return (
            f"Both answers were checked.\nBetter: [[{'A' if a > b else 'B' if b > a else 'tie'}]]"
        )
    if "<answer></answer>" in system and instruction is not None:  # task classification
        found = family_of(instruction)
        if found is None:
            return None
        labels = re.findall(r"^- (.+)$", user.split("<<<INSTRUCTION", 1)[0], flags=re.M)
        label = found[0].category if found[0].category in labels else "Others"
        return f"<answer>{label}</answer>"
    if "Output only the new instruction" in system:  # expansion: a new instance, same difficulty
        example = user.split("Example instruction:\n", 1)[-1].split("\n\n(Variation")[0]
        found = family_of(example)
        if found is None:
            return None
        family = found[0]
        rng = random.Random(user)
        level = max(LEVELS[0], min(LEVELS[-1], family.difficulty(example)))
        for _ in range(100):
            text = family.make(rng, level)
            if text != example.strip():
                return text
        return None
    if (
        messages and messages[0].get("role") == "user" and not system
    ):  # teacher answer or refinement
        for candidate in (user, user.split("\n\n")[0]):
            found = family_of(candidate)
            if found is not None:
                return _worked(found[0], candidate, found[1])
    return None
