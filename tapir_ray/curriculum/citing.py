"""CITING's rules (Feng et al., arXiv 2310.02527), kept free of Ray and I/O so they can be checked
by hand: the seeded 8:1:1 split, question types with their rubrics (a readable JSON file in the
run directory), rubric retrieval by type centroid, the student's revision prompt, and the edit
distance logged for every teacher revision.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tapir_ray.embed import centroids, nearest_centroid

SPLITS = ("train", "val", "test")


def split_of(
    seed: int, row_id: str, ratios: list[float] | tuple[float, ...] = (0.8, 0.1, 0.1)
) -> str:
    """train / val / test by a seeded hash of the row id: stable across runs, pool order and size."""
    digest = hashlib.sha256(f"{seed}:citing-split:{row_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, share in zip(SPLITS, ratios, strict=True):
        edge += share
        if u < edge:
            return name
    return SPLITS[-1]


class QuestionType(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    definition: str = ""
    criteria: list[str] = Field(default_factory=list)
    members: int = 0

    @field_validator("criteria")
    @classmethod
    def _no_blank(cls, v: list[str]) -> list[str]:
        return [c.strip() for c in v if c.strip()]

    def rubric(self) -> str:
        """The rubric as the teacher and the student read it: numbered criteria."""
        return "\n".join(f"{k}. {c}" for k, c in enumerate(self.criteria, 1))


class RubricBook(BaseModel):
    """Every question type of a run with its rubric; stored as `<run>/rubrics.json`."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    types: list[QuestionType]

    @field_validator("types")
    @classmethod
    def _unique(cls, v: list[QuestionType]) -> list[QuestionType]:
        names = [t.name.casefold() for t in v]
        if len(set(names)) != len(names):
            raise ValueError("question type names must be unique")
        return v

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RubricBook:
        return cls.model_validate(json.loads(text))

    def get(self, name: str) -> QuestionType:
        for t in self.types:
            if t.name == name:
                return t
        raise KeyError(name)

    def check(self, criteria_min: int, criteria_max: int) -> list[str]:
        """One line per type whose rubric is outside criteria_min..criteria_max."""
        return [
            f"type {t.name!r}: {len(t.criteria)} criteria, expected {criteria_min}..{criteria_max}"
            for t in self.types
            if not criteria_min <= len(t.criteria) <= criteria_max
        ]


def ensure_required(criteria: list[str], required: list[str], criteria_max: int) -> list[str]:
    """The teacher's criteria, with a criterion added for each required quality (articulate,
    in-depth, comprehensive) none of them mentions; the teacher's own last ones make room when
    the rubric would grow past criteria_max."""
    missing = [r for r in required if not any(r.casefold() in c.casefold() for c in criteria)]
    added = [f"{r.capitalize()}: the answer is {r}." for r in missing]
    keep = max(0, criteria_max - len(added))
    return criteria[:keep] + added


def aliases(merged: list[dict[str, Any]]) -> dict[str, str]:
    """Every induced name (casefolded) → the merged type that replaced it (or itself)."""
    out: dict[str, str] = {}
    for t in merged:
        for name in [t["name"], *t.get("merged_from", [])]:
            out.setdefault(name.casefold(), t["name"])
    return out


def build_book(merged: list[dict[str, Any]], assigned: dict[str, str],
               criteria: dict[str, list[str]], *, required: list[str], criteria_max: int) -> RubricBook:  # fmt: skip
    """The run's rubric book: merged types that received at least one curriculum question, each
    with its member count and its criteria (the required qualities guaranteed)."""
    counts: dict[str, int] = {}
    for name in assigned.values():
        counts[name] = counts.get(name, 0) + 1
    types = [
        QuestionType(name=t["name"], definition=t.get("definition", ""), members=counts[t["name"]],
                     criteria=ensure_required(criteria.get(t["name"], []), required, criteria_max))
        for t in merged if counts.get(t["name"])
    ]  # fmt: skip
    return RubricBook(types=types)


def question_rank(seed: int, round_: int, resample: bool, item_id: str) -> str:
    """A training question's place in the curriculum sample of `round_`."""
    salt = round_ if resample else 0
    return hashlib.sha256(f"{seed}:citing-q:{salt}:{item_id}".encode()).hexdigest()


def curriculum_ids(
    train_ids: list[str], n: int, seed: int, round_: int, resample: bool
) -> list[str]:
    """The round's curriculum questions: a seeded sample of n training ids — the same every round
    (the paper's setting), or a fresh sample each round when `resample`."""
    return sorted(train_ids, key=lambda i: question_rank(seed, round_, resample, i))[:n]


def type_centroids(embeddings: np.ndarray, types: list[str]) -> dict[str, np.ndarray]:
    """μ_c for each question type from the (normalised) embeddings of its member questions."""
    return centroids(np.asarray(embeddings, dtype=np.float32), types)


def retrieve(embeddings: np.ndarray, cents: dict[str, np.ndarray]) -> list[str]:
    """The question type of each query: argmax_c <e(q), μ_c>, which equals argmax_c of the mean
    inner product of q with the members of c."""
    return nearest_centroid(np.asarray(embeddings, dtype=np.float32), cents)


REVISE_INSTRUCTION = (
    "Revise your previous answer so that it meets every criterion of the rubric. Keep what is "
    "already right and change as little as needed. Reply with the revised answer only."
)


def revision_messages(question: str, rubric: str, previous_answer: str) -> list[dict[str, Any]]:
    """What the student sees when it revises: the question, the rubric and its previous answer.
    The same messages train it (the target is the teacher's revision) and drive self-revision."""
    content = (
        f"{question}\n\n[Rubric]\n{rubric}\n\n[Previous answer]\n{previous_answer}\n\n"
        f"{REVISE_INSTRUCTION}"
    )
    return [{"role": "user", "content": content}]


def edit_distance(before: str, after: str) -> float:
    """Word-level Levenshtein distance over the longer length: 0 = unchanged, 1 = rewritten."""
    a, b = before.split(), after.split()
    if not a and not b:
        return 0.0
    prev = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, wb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wa != wb))
        prev = cur
    return prev[-1] / max(len(a), len(b))
