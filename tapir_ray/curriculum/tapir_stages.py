"""TAPIR's stages over blocks (Ray Data and small Arrow tables), the rules themselves being in
plan.py, sample.py, scoring.py and expansion.py: the items table (pool + teacher answer + category,
held-out flag), the round's student requests (with the judge's context riding along), the plan and
the final plan (selection, accepted expansions, duplicates), the refinement requests, the training
set and the warm-up plan. The driver sees per-block summaries (counts), never the rows."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from tapir_ray import frames, storage
from tapir_ray.curriculum.expansion import EXPANDED
from tapir_ray.curriculum.plan import Selection, duplicate_fill, in_fraction, rank_key
from tapir_ray.oracle import prompts as P
from tapir_ray.oracle.stage import REQUESTS, chat_messages
from tapir_ray.rundir import RunDir

ITEMS = pa.schema([("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()),
                   ("teacher", pa.string()), ("category", pa.string()), ("heldout", pa.bool_())])  # fmt: skip
# What the judge needs of a candidate besides the student's answer: it rides with the student's
# request through the engine, so judge requests are built as answers arrive (no join).
JUDGE_CONTEXT = ["instruction", "input", "teacher"]
STUDENT_IN = pa.schema([*REQUESTS, *((c, pa.string()) for c in JUDGE_CONTEXT)])


def _flag_heldout(batch: pa.Table, seed: int, fraction: float) -> pa.Table:
    held = [in_fraction(seed, "heldout", i, fraction) for i in batch["id"].to_pylist()]
    batch = batch.append_column("heldout", pa.array(held, pa.bool_()))
    # A candidate needs a category; held-out rows only need their teacher answer.
    return batch.filter(pc.or_(batch["heldout"], pc.is_valid(batch["category"]))).select(
        ITEMS.names
    )


def _count_items(batch: pa.Table) -> Counter:
    held = int(pc.sum(batch["heldout"]).as_py() or 0)
    return Counter(items=batch.num_rows, heldout=held)


def build_items(run_dir: str, seed: int, heldout_fraction: float) -> dict[str, Any]:
    """items/ = pool rows with their teacher answer and category, flagged held-out or candidate."""
    run = RunDir(run_dir)
    pool_dir, teacher_dir = run.pool, run.teacher
    n_pool, n_teacher = frames.rows(pool_dir), frames.rows(teacher_dir)
    teacher = frames.read(teacher_dir, ["id", "response"]).rename_columns({"response": "teacher"})
    labels = frames.read(run.labels, ["id", "category"])
    items = frames.join(
        frames.read(pool_dir, ["id", "instruction", "input"]), teacher, "inner", size=n_pool
    )
    items = frames.join(items, labels, "left_outer", size=n_pool)
    items = items.map_batches(
        _flag_heldout, fn_args=(seed, heldout_fraction), batch_format="pyarrow"
    )
    frames.write(items, run.items, ITEMS)
    held = frames.read(run.items, ["heldout"], {"heldout": pa.bool_()})
    counts = sum(frames.fold(held, _count_items), Counter())
    return {"pool": n_pool, "no_teacher_answer": n_pool - n_teacher, "items": counts["items"],
            "heldout": counts["heldout"], "candidates": counts["items"] - counts["heldout"]}  # fmt: skip


def _used(run_dir: str, before_round: int) -> tuple[ray.data.Dataset | None, int]:
    """Ids trained in rounds before `before_round` (repeats included), or None before any; and
    how many rows they are."""
    rows = {f: frames.rows(f) for f in (RunDir(run_dir).round(r).train_set for r in range(before_round))}  # fmt: skip
    folders = [f for f, n in rows.items() if n]
    return (frames.read(folders, ["id"]) if folders else None), sum(rows.values())


def _candidates(run_dir: str, columns: list[str]) -> ray.data.Dataset:
    """items/ without its held-out rows."""
    return frames.read(RunDir(run_dir).items, [*columns, "heldout"], {"heldout": pa.bool_()}).map_batches(
        lambda b: b.filter(pc.invert(b["heldout"])).select(columns), batch_format="pyarrow")  # fmt: skip


def _student_requests(batch: pa.Table) -> pa.Table:
    msgs = [chat_messages(i, x) for i, x in zip(batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True)]  # fmt: skip
    context = {c: batch[c].cast(pa.string()) for c in JUDGE_CONTEXT}
    return pa.table({"id": batch["id"], "messages": pa.array(msgs, pa.string()), **context})


def write_student_inputs(run_dir: str, round_: int) -> int:
    """student_in/: the unused candidates, as chat requests with the judge's context."""
    run = RunDir(run_dir)
    ds = _candidates(run_dir, ["id", *JUDGE_CONTEXT])
    used, trained = _used(run_dir, round_)
    if used is not None:
        ds = frames.join(ds, used, "left_anti", size=frames.rows(run.items), right_rows=trained)
    ds = ds.map_batches(_student_requests, batch_format="pyarrow")
    return frames.write(ds, run.round(round_).student_in, STUDENT_IN)


PLAN = pa.schema(
    [("id", pa.string()), ("category", pa.string()), ("source", pa.string()), ("rank", pa.uint64())]
)


def _plan_counts(batch: pa.Table) -> Counter:
    return Counter(("source", s) for s in batch["source"].to_pylist()) + Counter(
        ("category", c) for c in batch["category"].to_pylist()
    )


def write_plan(
    run_dir: str, round_: int, scores_dir: str | None, size: int, alpha: float, ratios: dict, seed: int,
    random_quotas: bool = True, random: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """plan/: the round's selection (curriculum/sample.py: exact quotas, seeded ranks, nothing
    collected); with `random` the control arm's, which never reads the scores for its picks: given
    them (`judge_random`), it also counts the picks the judge scored and found hard."""
    from tapir_ray.curriculum.sample import select_dataset

    run = RunDir(run_dir)
    n_items = frames.rows(run.items)
    candidates = _candidates(run_dir, ["id", "category"])
    if not random:  # the control arm's picks never read the scores: no join of the whole pool
        hard = frames.read(scores_dir, ["id", "hard"], {"hard": pa.bool_()})
        candidates = frames.join(candidates, hard, "left_outer", size=n_items)
    used, trained = _used(run_dir, round_)
    if used is None:
        candidates = candidates.map_batches(
            lambda b: b.append_column("used", pa.array([False] * b.num_rows, pa.bool_())), batch_format="pyarrow")  # fmt: skip
    else:
        candidates = frames.mark(candidates, used, "used", rows=n_items, ids_rows=trained)
    plan, info = select_dataset(
        candidates, size=size, alpha=None if random else alpha,
        ratios=ratios if (random_quotas or not random) else None, seed=seed, round_=round_,
    )  # fmt: skip
    folder = run.round(round_).plan
    frames.write(plan, folder, PLAN)
    counts = sum(frames.fold(frames.read(folder, ["source", "category"]), _plan_counts), Counter())
    selected = {k: n for (kind, k), n in sorted(counts.items()) if kind == "source"}
    if random:
        targets = info["targets"] or {
            k: n for (kind, k), n in sorted(counts.items()) if kind == "category"
        }
        out = {"size": size, "alpha": None, "selection": "random", "targets": targets, "hard_targets": {},
               "shortfall": info["shortfall"], "selected": selected}  # fmt: skip
        if scores_dir is not None:
            out["judged"] = _judged(folder, scores_dir, n_items)
        return out
    pools = Counter()
    for key, n in info["pool_rows"].items():
        pools[key.rsplit("/", 1)[1]] += n
    return {
        "size": size, "alpha": alpha, "targets": info["targets"], "hard_targets": info["hard_targets"],
        "shortfall": info["shortfall"], "selected": selected,
        "hard_pool": {"path": scores_dir, "filter": "hard and not used", "rows": pools["hard"]},
        "easy_pool": {"path": scores_dir, "filter": "not hard, or used (replay)", "rows": pools["easy"]},
    }  # fmt: skip


def _judged(plan: str, scores_dir: str, n_items: int) -> dict[str, int]:
    """How many of a random plan's picks the judge scored, and found hard."""
    hard = frames.read(scores_dir, ["id", "hard"], {"hard": pa.bool_()})
    # the plan's ids (a round's size) go to every block of scores: counted, so order is no matter
    picked = frames.join(hard, frames.read(plan, ["id"]), "inner", size=n_items, right_rows=frames.rows(plan))  # fmt: skip
    counts = sum(frames.fold(picked, _hard_counts), Counter())
    return {"scored": counts["scored"], "hard": counts["hard"]}


def _hard_counts(batch: pa.Table) -> Counter:
    valid = pc.drop_null(batch["hard"])
    return Counter(scored=len(valid), hard=int(pc.sum(valid).as_py() or 0))


def _plan_rows(batch: pa.Table, source: str) -> pa.Table:
    return pa.table({"id": batch["id"], "category": batch["category"],
                     "source": pa.array([source] * batch.num_rows, pa.string())})  # fmt: skip


def write_final_plan(run_dir: str, round_: int, attempts: int, seed: int) -> dict[str, Any]:
    """plan_final/ = the selection + accepted expansions + duplicates for whatever is still
    missing; totals are exact. Expansions join the plan block by block (each attempt asked for
    what was still missing, so they never exceed a category's shortfall); only duplicates leave
    Arrow: they repeat a short category's first items in rank order, so its `missing`
    lowest-ranked plan rows and expansions are all that `duplicate_fill` needs."""
    rd = RunDir(run_dir).round(round_)
    missing = dict(storage.read_json(rd.plan_info)["shortfall"])
    kept = frames.read([e.accepted for e in rd.expansions(attempts)], EXPANDED.names)
    for cat, n in sum(frames.fold(kept, _category_counts), Counter()).items():
        if n > missing.get(cat, 0):
            raise RuntimeError(f"round {round_}: {n} accepted expansions of {cat!r} for a shortfall of {missing.get(cat, 0)}")  # fmt: skip
        missing[cat] -= n
    missing = {c: n for c, n in missing.items() if n > 0}
    plan = frames.read(rd.plan, ["id", "category", "source"])

    def key(row: dict) -> str:
        return rank_key(seed, round_, row["id"])

    members = Selection()
    for cat, n in sorted(missing.items()):
        for r in [*frames.lowest(plan, key, n, where=lambda r, c=cat: r["category"] == c),
                  *frames.lowest(kept, key, n, where=lambda r, c=cat: r["category"] == c)]:  # fmt: skip
            members.ids.append(r["id"])
            members.category.append(cat)
            members.source.append(r.get("source", "expanded"))
    start = len(members.ids)
    duplicate_fill(members, missing, seed, round_)
    extra = Selection(ids=members.ids[start:], category=members.category[start:], source=members.source[start:])  # fmt: skip
    plan = plan.union(kept.map_batches(_plan_rows, fn_args=("expanded",), batch_format="pyarrow"))
    if extra.ids:
        plan = plan.union(ray.data.from_arrow(extra.table().cast(PLAN.remove(3))))
    frames.write(plan, rd.plan_final, PLAN.remove(3))
    counts = sum(frames.fold(frames.read(rd.plan_final, ["source", "category"]), _plan_counts), Counter())  # fmt: skip
    frames.write(kept, rd.expanded, EXPANDED)
    return {"rows": sum(n for (kind, _), n in counts.items() if kind == "source"),
            "by_source": {k: n for (kind, k), n in sorted(counts.items()) if kind == "source"},
            "counts": {k: n for (kind, k), n in sorted(counts.items()) if kind == "category"},
            "duplicated": dict(missing)}  # fmt: skip


def _texts(
    run_dir: str, round_: int, cols: tuple[str, ...] = ("id", "instruction", "input")
) -> ray.data.Dataset:
    """Columns of the pool's items and of this round's expansions (both have a category)."""
    run = RunDir(run_dir)
    return frames.read([run.items, run.round(round_).expanded], list(cols))


def _refine_requests(batch: pa.Table, styles: dict[str, str]) -> pa.Table:
    rows = batch.to_pylist()
    style = [styles.get(r["category"], "general") for r in rows]
    msgs = [json.dumps(P.answer(r["instruction"], r["input"], style=s).messages) for r, s in zip(rows, style, strict=True)]  # fmt: skip
    return pa.table({"id": batch["id"], "messages": pa.array(msgs, pa.string()), "style": pa.array(style, pa.string())})  # fmt: skip


def write_refine_inputs(run_dir: str, round_: int, styles: dict[str, str]) -> int:
    """refine_in/: one task-styled teacher request per planned item (a duplicated item once)."""
    rd = RunDir(run_dir).round(round_)
    plan = frames.read(rd.plan_final, ["id"])
    texts = _texts(run_dir, round_, ("id", "instruction", "input", "category"))
    ds = frames.join(texts, plan, "left_semi", size=frames.rows(rd.plan_final))
    ds = ds.map_batches(_refine_requests, fn_args=(styles,), batch_format="pyarrow")
    schema = pa.schema([*REQUESTS, ("style", pa.string())])
    return frames.write(ds, rd.refine_in, schema)


def _train_rows(batch: pa.Table, answer_column: str, styles: dict[str, str]) -> pa.Table:
    msgs = [chat_messages(i, x) for i, x in zip(batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True)]  # fmt: skip
    style = [styles.get(c, "general") for c in batch["category"].to_pylist()]
    return pa.table({"id": batch["id"], "category": batch["category"], "source": batch["source"],
                     "style": pa.array(style, pa.string()), "messages": pa.array(msgs, pa.string()),
                     "response": batch[answer_column]})  # fmt: skip


def _category_counts(batch: pa.Table) -> Counter:
    return Counter(batch["category"].to_pylist())


def write_train_set(
    run_dir: str, round_: int, answers_dir: str, answer_column: str, styles: dict
) -> dict[str, Any]:
    """train_set/: one row per planned item (duplicates kept) whose answer exists."""
    rd = RunDir(run_dir).round(round_)
    n = frames.rows(rd.plan_final)
    plan = frames.read(rd.plan_final, ["id", "category", "source"])
    answers = frames.read(answers_dir, ["id", answer_column])
    ds = frames.join(
        frames.join(plan, answers, "inner", size=n), _texts(run_dir, round_), "inner", size=n
    )
    ds = ds.map_batches(_train_rows, fn_args=(answer_column, styles), batch_format="pyarrow")
    schema = pa.schema([("id", pa.string()), ("category", pa.string()), ("source", pa.string()), ("style", pa.string()),
                        ("messages", pa.string()), ("response", pa.string())])  # fmt: skip
    rows = frames.write(ds, rd.train_set, schema)
    counts = sum(frames.fold(frames.read(rd.train_set, ["category"]), _category_counts), Counter())
    return {"rows": rows, "dropped_no_answer": n - rows, "counts": dict(counts)}


def write_warmup_plan(run_dir: str, rows: int, seed: int) -> int:
    """round-0/plan_final: the first `rows` candidates in seeded random order."""
    from tapir_ray.curriculum.sample import select_dataset

    candidates = _candidates(run_dir, ["id", "category"]).map_batches(
        lambda b: b.append_column("used", pa.array([False] * b.num_rows, pa.bool_())), batch_format="pyarrow")  # fmt: skip
    plan, _ = select_dataset(candidates, size=rows, alpha=None, ratios=None, seed=seed, round_=0)
    plan = plan.map_batches(lambda b: b.set_column(2, "source", pa.array(["warmup"] * b.num_rows, pa.string())),
                            batch_format="pyarrow")  # fmt: skip
    return frames.write(plan, RunDir(run_dir).round(0).plan_final, PLAN)
