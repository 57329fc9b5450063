"""TAPIR's instruction expansion over blocks: exemplar requests, acceptance (every rejection rule,
in request order, across attempts and chunks) and the final plan that takes the expansions in,
on the real encoder (the bundled MiniLM) and the shared Ray cluster."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pytest

from tapir_ray import storage
from tapir_ray.curriculum import expansion as X
from tapir_ray.curriculum.tapir_stages import write_final_plan
from tapir_ray.ingest.canonical import row_id

MODEL = "bundled:all-minilm-l6-v2"
THRESHOLD = 0.92
POOL = ["Write a haiku about autumn leaves falling.", "Explain how photosynthesis works in plants.",
        "List three uses of baking soda in cleaning."]  # fmt: skip
EVAL = ["What is the capital city of Australia?", "Describe the water cycle in simple terms."]
# (expansion text, the label the re-check gives (None: dead-lettered), why it is rejected)
ATTEMPT_0 = [
    ("Compose a limerick about a cat who loves jazz.", "Writing", None),
    ("Draft a thank-you note to a neighbour.", None, "label dead-lettered"),
    ("Solve 12 times 13 and show the steps.", "Math", "re-classified into another category"),
    ("what is the capital  city of Australia?", "Writing", "an evaluation prompt"),
    ("Describe the water cycle in very simple terms.", "Writing", "near-duplicate of an evaluation prompt"),
    ("Explain how photosynthesis works in plants.", "Writing", X.DUPLICATE),
    ("Write a haiku about autumn leaves that are falling.", "Writing", "near-duplicate of the pool or another expansion"),
    ("Compose a limerick about a cat who loves jazz.", "Writing", X.DUPLICATE),
    ("Compose a limerick about a cat that loves jazz.", "Writing", "near-duplicate of the pool or another expansion"),
    ("Give me five tips for a first job interview.", "Writing", None),
]  # fmt: skip
ATTEMPT_1 = [
    ("Give me five tips for a first job interview.", "Writing", X.DUPLICATE),
    ("Compose a short limerick about a cat who loves jazz music.", "Writing", "near-duplicate of the pool or another expansion"),
    ("Plan a three-day trip to Kyoto on a budget.", "Writing", None),
]  # fmt: skip


def _write(rows: list[dict], folder) -> None:
    storage.write_table(pa.Table.from_pylist(rows), str(folder))


def _attempt(run_dir, attempt: int, rows: list[tuple]) -> None:
    folder = run_dir / "round-1" / f"expand-{attempt}"
    ids = [f"x1.{attempt}.Writing.{j}" for j in range(len(rows))]
    _write([{"id": i, "messages": "[]", "category": "Writing", "parent_id": "p"} for i in ids], folder / "requests")  # fmt: skip
    _write([{"id": i, "parsed": json.dumps(t)} for i, (t, _, _) in zip(ids, rows, strict=True)], folder / "answers")  # fmt: skip
    _write([{"id": i, "parsed": json.dumps(label)} for i, (_, label, _) in zip(ids, rows, strict=True) if label], folder / "labels")  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(ray_cluster, tmp_path_factory):
    """A run directory with a pool of three rows, their embeddings and an evaluation set."""
    from tapir_ray.embed import encode, load_encoder

    run_dir = tmp_path_factory.mktemp("expansion") / "run"
    _write([{"id": row_id(t), "instruction": t, "input": ""} for t in POOL], run_dir / "ingest" / "pool")  # fmt: skip
    vecs = encode(load_encoder(MODEL), POOL)
    storage.write_table(pa.table({"id": [row_id(t) for t in POOL],
                                  "embedding": pa.array(list(vecs), pa.list_(pa.float32()))}), str(run_dir / "embeddings"))  # fmt: skip
    (run_dir / "eval.jsonl").write_text(
        "".join(json.dumps({"instruction": t}) + "\n" for t in EVAL)
    )
    return run_dir


def _accept(run_dir, attempt: int) -> dict:
    return X.accept_expansions(str(run_dir), 1, attempt, THRESHOLD, MODEL, [str(run_dir / "eval.jsonl")])  # fmt: skip


def _accepted(run_dir, attempt: int) -> list[str]:
    table = storage.read_table(str(run_dir / "round-1" / f"expand-{attempt}" / "accepted"))
    return table["instruction"].to_pylist()


def test_acceptance_applies_every_rule_in_request_order_and_across_attempts(run_dir, monkeypatch):
    """Each rejection rule, and the keep rule among the expansions themselves (an exact or near
    copy of an expansion kept before it, in this attempt or an earlier one), give what the rules
    say row by row; the counts reconcile; chunks of 2 rows (so the in-order rule crosses chunk
    edges and each chunk is compared with the pool on its own) keep what one chunk keeps."""
    for attempt, rows in ((0, ATTEMPT_0), (1, ATTEMPT_1)):
        _attempt(run_dir, attempt, rows)
        got = _accept(run_dir, attempt)
        want = [t for t, _, why in rows if why is None]
        assert _accepted(run_dir, attempt) == want
        assert got["rejected"] == dict(Counter(why for _, _, why in rows if why)), got
        assert got["answered"] == len(rows) == got["accepted"] + sum(got["rejected"].values())
        assert got["accepted_by_category"] == {"Writing": len(want)}
        accepted = storage.read_table(str(run_dir / "round-1" / f"expand-{attempt}" / "accepted"))
        assert accepted.schema == X.ACCEPTED and accepted["id"].to_pylist() == [
            row_id(t) for t in want
        ]
    monkeypatch.setattr(X, "ACCEPT_CHUNK", 2)
    assert _accept(run_dir, 0)["rejected"] == dict(Counter(why for _, _, why in ATTEMPT_0 if why))
    assert _accepted(run_dir, 0) == [t for t, _, why in ATTEMPT_0 if why is None]


def test_the_final_plan_takes_the_expansions_and_duplicates_the_rest(run_dir):
    """Expansions fill their category's shortfall (source `expanded`, also in expanded/); what is
    still missing repeats the category's first rows in rank order; totals are exact."""
    from tapir_ray.curriculum.plan import rank_key

    if not (run_dir / "round-1" / "expand-1" / "accepted").exists():
        for attempt, rows in ((0, ATTEMPT_0), (1, ATTEMPT_1)):
            _attempt(run_dir, attempt, rows)
            _accept(run_dir, attempt)
    plan = [{"id": f"w{k}", "category": "Writing", "source": "easy", "rank": k} for k in range(2)]
    plan += [{"id": f"m{k}", "category": "Math", "source": "hard", "rank": k} for k in range(3)]
    folder = run_dir / "round-1" / "plan"
    storage.write_table(pa.Table.from_pylist(plan, schema=pa.schema([("id", pa.string()), ("category", pa.string()),
                        ("source", pa.string()), ("rank", pa.uint64())])), str(folder))  # fmt: skip
    storage.write_json_atomic(str(folder / "_PLAN.json"), {"shortfall": {"Writing": 5, "Math": 0}})
    got = write_final_plan(str(run_dir), 1, 2, seed=3)
    # 3 expansions were accepted over the two attempts; 2 Writing rows are still missing.
    assert got["by_source"] == {"duplicate": 2, "easy": 2, "expanded": 3, "hard": 3}
    assert got["counts"] == {"Math": 3, "Writing": 7} and got["duplicated"] == {"Writing": 2}
    final = storage.read_table(str(run_dir / "round-1" / "plan_final")).to_pylist()
    expanded = storage.read_table(str(run_dir / "round-1" / "expanded"))
    kept = [t for rows in (ATTEMPT_0, ATTEMPT_1) for t, _, why in rows if why is None]
    assert sorted(expanded["instruction"].to_pylist()) == sorted(kept)
    assert sorted(r["id"] for r in final if r["source"] == "expanded") == sorted(
        row_id(t) for t in kept
    )
    # The duplicates are the first two of Writing's plan rows and expansions in rank order.
    writing = sorted(["w0", "w1", *(row_id(t) for t in kept)], key=lambda i: rank_key(3, 1, i))
    assert sorted(r["id"] for r in final if r["source"] == "duplicate") == sorted(writing[:2])


def test_expansion_requests_take_distinct_exemplars_hard_first_and_join_their_texts(run_dir):
    """One request per missing row, each from a different exemplar of its category (hard ones
    first, then by rank); a second attempt takes the next exemplars; the exemplar's text is in
    the teacher's prompt."""
    items = [{"id": f"i{k}", "instruction": f"Instruction number {k}.", "input": "ctx" if k == 4 else ""}
             for k in range(6)]  # fmt: skip
    _write(items, run_dir / "items")
    plan = [{"id": f"i{k}", "category": "Writing", "source": "hard" if k >= 3 else "easy", "rank": k}
            for k in range(6)]  # fmt: skip
    storage.write_table(pa.Table.from_pylist(plan, schema=pa.schema([("id", pa.string()), ("category", pa.string()),
                        ("source", pa.string()), ("rank", pa.uint64())])), str(run_dir / "round-1" / "plan"))  # fmt: skip
    for attempt, parents in ((0, ["i3", "i4"]), (1, ["i5", "i0"])):
        assert X.write_expansion_requests(str(run_dir), 1, attempt, {"Writing": 2, "Math": 0}) == 2
        folder = run_dir / "round-1" / f"expand-{attempt}" / "requests"
        rows = sorted(storage.read_table(str(folder)).to_pylist(), key=lambda r: r["id"])
        assert [r["parent_id"] for r in rows] == parents
        for r in rows:
            text = json.loads(r["messages"])[-1]["content"]
            k = int(r["parent_id"][1:])
            assert f"Instruction number {k}." in text and ("ctx" in text) == (k == 4)
            assert ("Variation 2" in text) == (attempt == 1)
