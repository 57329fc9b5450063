"""The run loop: the one module that knows the order of the stages.

TAPIR (ALGORITHMS.md), one row's path through the run directory:

    ingest/pool ─► teacher/ (y_T) ─► labels/ (task category) ─► items/ (+ held-out flag)
      [round-0: warm-up LoRA on a slice → S_0]
      round r = 1..R:
        student/ (S_{r-1} answers the unused candidates) ─► judge/ (f_J of y_T and y_S),
                      one streaming phase: the judge works while the student generates
        ─► scores/ (MFD = f_J(y_T) − f_J(y_S); hard iff MFD ≥ δ)
        ─► plan/ (per-category quotas N_r·π*, hard share α_r, easy = unused easy + replay)
        ─► expand-*/ (teacher-written instructions for short categories, label re-checked,
                      near-duplicates and evaluation prompts rejected; duplication last)
        ─► refine/ (task-styled teacher answers) ─► train_set/ ─► adapter/ (S_r = SFT(S_{r−1}))
        ─► held-out NLL ─► metrics/round-r.json
    ─► metrics/report.md (+ plots)

Every stage writes Parquet under `<run>/` and is recorded done in `state.json` by the
CurriculumActor, so `--resume` skips what is done. Inside an unfinished oracle stage the response
cache answers every request that had returned (nothing is paid twice), an unfinished streaming
phase generates only the answers it had not written, and an unfinished training resumes from its
last checkpoint. The glue between stages (joins of answers to items by id,
requests, scores, the plan, the training set) is Ray Data over blocks (tapir_ray/frames.py); the
driver sees per-block summaries (counts, sums, histograms), never the rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from tapir_ray import frames, storage
from tapir_ray.config import Config
from tapir_ray.curriculum.actor import curriculum_actor
from tapir_ray.curriculum.plan import (
    Selection,
    duplicate_fill,
    in_fraction,
    mfd_histogram,
    rank_key,
    round_sizes,
)
from tapir_ray.embed import as_matrix
from tapir_ray.oracle import prompts as P
from tapir_ray.progress import Progress


class RunError(RuntimeError):
    """A problem with the run as asked (existing run dir, missing endpoint), told in one line."""


class StopAfter(Exception):  # noqa: N818 (not an error: the stop `run --until` asked for)
    """Raised once the stage `run --until` names is done; `--resume` continues from there."""


def _task(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run `fn` as a Ray task (joins of stage outputs stay off the driver) and wait for it."""
    return ray.get(ray.remote(num_cpus=0)(fn).remote(*args, **kwargs))


# --- tasks over stage outputs (run on the cluster) -------------------------------------------------


def _messages(instruction: str, input_text: str) -> str:
    return json.dumps([{"role": "user", "content": P.user_content(instruction, input_text)}])


ITEMS = pa.schema([("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()),
                   ("teacher", pa.string()), ("category", pa.string()), ("heldout", pa.bool_())])  # fmt: skip
REQUESTS = pa.schema([("id", pa.string()), ("messages", pa.string())])
# What the judge needs of a candidate besides the student's answer: it rides with the student's
# request through the engine, so judge requests are built as answers arrive (no join).
JUDGE_CONTEXT = ["instruction", "input", "teacher"]
STUDENT_IN = pa.schema([*REQUESTS, *((c, pa.string()) for c in JUDGE_CONTEXT)])
SCORES = pa.schema([("id", pa.string()), ("category", pa.string()), ("score_teacher", pa.float64()),
                    ("score_student", pa.float64()), ("mfd", pa.float64()), ("hard", pa.bool_()),
                    ("consistent", pa.bool_())])  # fmt: skip


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
    pool_dir, teacher_dir = (
        storage.join(run_dir, "ingest", "pool"),
        storage.join(run_dir, "teacher"),
    )
    n_pool, n_teacher = frames.rows(pool_dir), frames.rows(teacher_dir)
    teacher = frames.read(teacher_dir, ["id", "response"]).rename_columns({"response": "teacher"})
    labels = frames.read(storage.join(run_dir, "labels"), ["id", "category"])
    items = frames.join(
        frames.read(pool_dir, ["id", "instruction", "input"]), teacher, "inner", size=n_pool
    )
    items = frames.join(items, labels, "left_outer", size=n_pool)
    items = items.map_batches(
        _flag_heldout, fn_args=(seed, heldout_fraction), batch_format="pyarrow"
    )
    frames.write(items, storage.join(run_dir, "items"), ITEMS)
    counts = sum(
        frames.fold(
            frames.read(storage.join(run_dir, "items"), ["heldout"], {"heldout": pa.bool_()}),
            _count_items,
        ),
        Counter(),
    )
    return {"pool": n_pool, "no_teacher_answer": n_pool - n_teacher, "items": counts["items"],
            "heldout": counts["heldout"], "candidates": counts["items"] - counts["heldout"]}  # fmt: skip


def _used(run_dir: str, before_round: int) -> ray.data.Dataset | None:
    """Ids trained in rounds before `before_round` (repeats included), or None before any."""
    folders = [storage.join(run_dir, f"round-{r}", "train_set") for r in range(before_round)]
    folders = [f for f in folders if frames.rows(f)]
    return frames.read(folders, ["id"]) if folders else None


def _candidates(run_dir: str, columns: list[str]) -> ray.data.Dataset:
    """items/ without its held-out rows."""
    return frames.read(storage.join(run_dir, "items"), [*columns, "heldout"], {"heldout": pa.bool_()}).map_batches(
        lambda b: b.filter(pc.invert(b["heldout"])).select(columns), batch_format="pyarrow")  # fmt: skip


def _student_requests(batch: pa.Table) -> pa.Table:
    msgs = [_messages(i, x) for i, x in zip(batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True)]  # fmt: skip
    context = {c: batch[c].cast(pa.string()) for c in JUDGE_CONTEXT}
    return pa.table({"id": batch["id"], "messages": pa.array(msgs, pa.string()), **context})


def write_student_inputs(run_dir: str, round_: int) -> int:
    """student_in/: the unused candidates, as chat requests with the judge's context."""
    ds = _candidates(run_dir, ["id", *JUDGE_CONTEXT])
    used = _used(run_dir, round_)
    if used is not None:
        ds = frames.join(ds, used, "left_anti", size=frames.rows(storage.join(run_dir, "items")))
    ds = ds.map_batches(_student_requests, batch_format="pyarrow")
    return frames.write(ds, storage.join(run_dir, f"round-{round_}", "student_in"), STUDENT_IN)


def _judge_requests(
    batch: pa.Table, mode: str, prefill: bool, answers: tuple[str, ...] = ("T", "S")
) -> pa.Table:
    """Judge requests of a block of candidates. Single mode: one per answer in `answers` (T:
    the teacher's, which needs no student answer, S: the student's); pairwise: both orders."""
    ids, msgs = [], []
    for r in batch.to_pylist():  # one block of the round's candidates
        text = P.user_content(r["instruction"], r["input"])
        if mode == "single":
            for tag in answers:
                prompt = P.judge_single(text, r["teacher"] if tag == "T" else r["student"])
                ids.append(f"{r['id']}|{tag}")
                msgs.append(
                    json.dumps(
                        P.prefilled(prompt, P.VERDICT_PREFILL) if prefill else prompt.messages
                    )
                )
        else:
            for tag, a, b in (
                ("TS", r["teacher"], r["student"]),
                ("ST", r["student"], r["teacher"]),
            ):
                prompt = P.judge_pairwise(text, a, b)
                ids.append(f"{r['id']}|{tag}")
                msgs.append(
                    json.dumps(P.prefilled(prompt, P.PAIR_PREFILL) if prefill else prompt.messages)
                )
    return pa.table({"id": pa.array(ids, pa.string()), "messages": pa.array(msgs, pa.string())})


def _requests_from_answers(batch: pa.Table, to_requests: Callable, args: tuple) -> pa.Table:
    """A block of answers (`response`, with the request's context columns) → oracle requests."""
    return to_requests(batch.rename_columns(["student" if c == "response" else c for c in batch.column_names]), *args)  # fmt: skip


def scoring_requests(
    answers: ray.data.Dataset, student_in: str, context: list[str],
    late: tuple[Callable, tuple], early: tuple[Callable, tuple] | None,
) -> ray.data.Dataset:  # fmt: skip
    """The oracle requests of a scoring phase: `late` (fn, args) on each block of the student's
    answers, and `early` on each row of `student_in` (requests that need no student answer, e.g.
    the verdicts on the teacher's answers), which flow from the start, while the engine loads."""
    from tapir_ray.student import LIGHT_CPUS

    # One light task per block (select/rename would each be a whole-CPU operator).
    asks = answers.map_batches(_requests_from_answers, fn_args=late, batch_format="pyarrow",
                               num_cpus=LIGHT_CPUS)  # fmt: skip
    if early is None:
        return asks
    rows = frames.read(student_in, ["id", *context], num_cpus=LIGHT_CPUS)
    first = rows.map_batches(
        early[0], fn_args=early[1], batch_format="pyarrow", num_cpus=LIGHT_CPUS
    )
    return first.union(asks)  # Ray Data's union passes blocks on as either side makes them


def resume_split(
    student_in: str, student_dir: str, n: int
) -> tuple[ray.data.Dataset, ray.data.Dataset | None, int]:
    """The scoring phase's rows: (still to answer, already answered with their judge context,
    how many were answered). Answers a killed attempt wrote are judged again, not generated."""
    from tapir_ray.student import LIGHT_CPUS

    columns = frames.column_names(student_in) or STUDENT_IN.names
    inputs = frames.read(student_in, columns, num_cpus=LIGHT_CPUS)
    kept = frames.rows(student_dir)
    if not kept:
        return inputs, None, 0
    done = frames.read(student_dir, ["id", "response"])
    todo = frames.join(inputs, done.select_columns(["id"]), "left_anti", size=n)
    return todo, frames.join(inputs.drop_columns(["messages"]), done, "inner", size=n), kept


def _verdicts(batch: pa.Table, tag: str, columns: tuple[str, ...]) -> pa.Table:
    """The judge's verdicts of one tag (T, S, TS, ST) as item id and score columns."""
    ids, values = [], []
    for row_id, parsed in zip(batch["id"].to_pylist(), batch["parsed"].to_pylist(), strict=True):
        item, t = row_id.rsplit("|", 1)
        if t == tag:
            v = json.loads(parsed)
            v = v["verdict"] if isinstance(v, dict) else v
            ids.append(item)
            values.append(v if isinstance(v, list) else [v])
    out = {"id": pa.array(ids, pa.string())}
    for k, c in enumerate(columns):
        out[c] = pa.array([float(v[k]) for v in values], pa.float64())
    return pa.table(out)


def _masses(batch: pa.Table) -> list[float]:
    """[Σ valid mass, verdicts read from probabilities] of a block of the judge's verdicts."""
    masses = [
        v.get("valid_mass")
        for v in map(json.loads, batch["parsed"].to_pylist())
        if isinstance(v, dict)
    ]
    masses = [m for m in masses if m is not None]
    return [float(sum(masses)), len(masses)]


def _score_rows(batch: pa.Table, mode: str, delta: float) -> pa.Table:
    if mode == "single":
        teacher, student = batch["t"], batch["s"]
        consistent = pa.nulls(batch.num_rows, pa.bool_())
    else:  # position bias cancels over both orders; consistent = both orders name one winner
        ts_a, ts_b, st_a, st_b = (batch[c].to_numpy() for c in ("ts_a", "ts_b", "st_a", "st_b"))
        teacher, student = (ts_a + st_b) / 2, (ts_b + st_a) / 2
        consistent = pa.array(np.sign(ts_a - ts_b) == np.sign(st_b - st_a), pa.bool_())
    mfd = pc.subtract(teacher, student)
    return pa.table({"id": batch["id"], "category": batch["category"], "score_teacher": teacher,
                     "score_student": student, "mfd": mfd, "hard": pc.greater_equal(mfd, delta),
                     "consistent": consistent}, schema=SCORES)  # fmt: skip


def _score_moments(batch: pa.Table) -> dict[str, Any]:
    """One block's share of the round's score statistics (sums add up across blocks)."""
    out: dict[str, Any] = {"n": batch.num_rows, "hard": int(pc.sum(batch["hard"]).as_py() or 0),
                           "consistent": int(pc.sum(batch["consistent"]).as_py() or 0),
                           "pairs": batch.num_rows - batch["consistent"].null_count,
                           "hist": Counter(mfd_histogram(batch["mfd"].to_pylist()))}  # fmt: skip
    for c in ("score_teacher", "score_student", "mfd"):
        x = batch[c].to_numpy()
        out[c] = np.array([x.sum(), (x * x).sum()])
    return out


def write_scores(run_dir: str, round_: int, mode: str, delta: float) -> dict[str, Any]:
    """scores/ per candidate: f_J of teacher and student answers, MFD and the hard flag; the
    round's judge diagnostics from per-block sums."""
    from tapir_ray.eval.judge_health import judge_health, spread_of

    rd = storage.join(run_dir, f"round-{round_}")
    judge_dir = storage.join(rd, "judge")
    asked, answered = frames.rows(storage.join(rd, "student")), frames.rows(judge_dir)
    judged = frames.read(judge_dir, ["id", "parsed"])
    if mode == "single":
        sides = [("T", ("t",)), ("S", ("s",))]
    else:
        sides = [("TS", ("ts_a", "ts_b")), ("ST", ("st_a", "st_b"))]
    first, second = (
        judged.map_batches(_verdicts, fn_args=(tag, cols), batch_format="pyarrow")
        for tag, cols in sides
    )
    both = frames.join(
        first, second, "inner", size=asked
    )  # an item missing a verdict sits this round out
    category = frames.read(storage.join(run_dir, "items"), ["id", "category"])
    scores = frames.join(both, category, "inner", size=asked).map_batches(
        _score_rows, fn_args=(mode, delta), batch_format="pyarrow")  # fmt: skip
    frames.write(scores, storage.join(rd, "scores"), SCORES)
    total: dict[str, Any] = {"n": 0, "hard": 0, "consistent": 0, "pairs": 0, "hist": Counter()}
    for part in frames.fold(
        frames.read(
            storage.join(rd, "scores"),
            SCORES.names,
            dict(zip(SCORES.names, SCORES.types, strict=True)),
        ),
        _score_moments,
    ):
        for k, v in part.items():
            total[k] = total[k] + v if k in total else v
    n = total["n"]
    mass, read = 0.0, 0
    for m, k in frames.fold(judged, _masses):
        mass, read = mass + m, read + k

    def mean(column: str, digits: int = 4) -> float | None:
        return round(float(total[column][0]) / n, digits) if n else None

    health = judge_health(
        asked=2 * asked, answered=answered,
        consistency=round(total["consistent"] / total["pairs"], 4) if mode == "pairwise" and total["pairs"] else None,
        spreads={s: spread_of(n, *total[f"score_{s}"]) if n else None for s in ("teacher", "student")},
        valid_mass=round(mass / read, 4) if read else None,
    )  # fmt: skip
    return {
        "judge": health, "scored": n, "unscored": asked - n, "hard": total["hard"],
        "hard_share": round(total["hard"] / n, 4) if n else None, "mean_mfd": mean("mfd"),
        "mean_score_teacher": mean("score_teacher", 3), "mean_score_student": mean("score_student", 3),
        "mfd_histogram": {k: total["hist"].get(k, 0) for k in mfd_histogram([])},
    }  # fmt: skip


PLAN = pa.schema(
    [("id", pa.string()), ("category", pa.string()), ("source", pa.string()), ("rank", pa.uint64())]
)


def _plan_counts(batch: pa.Table) -> Counter:
    return Counter(("source", s) for s in batch["source"].to_pylist()) + Counter(
        ("category", c) for c in batch["category"].to_pylist()
    )


def write_plan(
    run_dir: str, round_: int, scores_dir: str | None, size: int, alpha: float, ratios: dict, seed: int,
    random_quotas: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """plan/: the round's selection (curriculum/sample.py: exact quotas, seeded ranks, nothing
    collected); with no scores (selection: random) the control arm's."""
    from tapir_ray.curriculum.sample import select_dataset

    n_items = frames.rows(storage.join(run_dir, "items"))
    candidates = _candidates(run_dir, ["id", "category"])
    if scores_dir is not None:
        hard = frames.read(scores_dir, ["id", "hard"], {"hard": pa.bool_()})
        candidates = frames.join(candidates, hard, "left_outer", size=n_items)
    used = _used(run_dir, round_)
    if used is None:
        candidates = candidates.map_batches(
            lambda b: b.append_column("used", pa.array([False] * b.num_rows, pa.bool_())), batch_format="pyarrow")  # fmt: skip
    else:
        candidates = frames.mark(candidates, used, "used", size=n_items)
    random = scores_dir is None
    plan, info = select_dataset(
        candidates, size=size, alpha=None if random else alpha,
        ratios=ratios if (random_quotas or not random) else None, seed=seed, round_=round_,
    )  # fmt: skip
    folder = storage.join(run_dir, f"round-{round_}", "plan")
    frames.write(plan, folder, PLAN)
    counts = sum(frames.fold(frames.read(folder, ["source", "category"]), _plan_counts), Counter())
    selected = {k: n for (kind, k), n in sorted(counts.items()) if kind == "source"}
    if random:
        targets = info["targets"] or {
            k: n for (kind, k), n in sorted(counts.items()) if kind == "category"
        }
        return {"size": size, "alpha": None, "selection": "random", "targets": targets, "hard_targets": {},
                "shortfall": info["shortfall"], "selected": selected}  # fmt: skip
    pools = Counter()
    for key, n in info["pool_rows"].items():
        pools[key.rsplit("/", 1)[1]] += n
    return {
        "size": size, "alpha": alpha, "targets": info["targets"], "hard_targets": info["hard_targets"],
        "shortfall": info["shortfall"], "selected": selected,
        "hard_pool": {"path": scores_dir, "filter": "hard and not used", "rows": pools["hard"]},
        "easy_pool": {"path": scores_dir, "filter": "not hard, or used (replay)", "rows": pools["easy"]},
    }  # fmt: skip


def _write_requests(rows: list[dict], folder: str) -> None:
    """An oracle or student stage's input: id and messages (JSON), even when there are no rows."""
    storage.write_table(pa.Table.from_pylist(rows, schema=REQUESTS), folder)


def _exemplars(batch: pa.Table, want: dict[str, int]) -> dict[str, list]:
    """Per short category, this block's first exemplars: hard ones first, then by rank."""
    out: dict[str, list] = {}
    for r in batch.to_pylist():
        if want.get(r["category"]):
            key = (r["source"] != "hard", r["rank"])
            out.setdefault(r["category"], []).append(
                (key, r["id"], P.user_content(r["instruction"], r["input"]))
            )
    return {c: sorted(v)[: want[c]] for c, v in out.items()}


def write_expansion_requests(
    run_dir: str, round_: int, attempt: int, missing: dict[str, int]
) -> int:
    """One teacher request per missing item, each inspired by a different exemplar of its category
    (hard exemplars first), so a retry never repeats an earlier request."""
    rd = storage.join(run_dir, f"round-{round_}")
    plan = frames.read(
        storage.join(rd, "plan"), ["id", "category", "source", "rank"], {"rank": pa.uint64()}
    )
    texts = frames.read(storage.join(run_dir, "items"), ["id", "instruction", "input"])
    joined = frames.join(plan, texts, "inner", size=frames.rows(storage.join(rd, "plan")))
    # Attempt a uses exemplars up to (a + 1)·n in exemplar order: each block sends back its first.
    want = {c: n * (attempt + 1) for c, n in missing.items()}
    best: dict[str, list] = {}
    for part in frames.fold(joined, _exemplars, want=want):
        for cat, found in part.items():
            best[cat] = sorted(best.get(cat, []) + found)[: want[cat]]
    rows = []
    for cat, n in sorted(missing.items()):
        exemplars = [(i, text) for _, i, text in best.get(cat, [])]
        if not exemplars:
            continue
        for j in range(n):
            parent, text = exemplars[(j + attempt * n) % len(exemplars)]
            # The attempt number makes retries distinct requests even with a single exemplar.
            prompt = P.expand(
                text + ("" if attempt == 0 else f"\n\n(Variation {attempt + 1}.)"), cat
            )
            rows.append({"id": f"x{round_}.{attempt}.{cat}.{j}", "messages": json.dumps(prompt.messages),
                         "category": cat, "parent_id": parent})  # fmt: skip
    storage.write_table(
        pa.Table.from_pylist(rows),
        storage.join(run_dir, f"round-{round_}", f"expand-{attempt}", "requests"),
    )
    return len(rows)


def _label_requests(batch: pa.Table, labels: list[str], prefill: bool) -> pa.Table:
    msgs = []
    for parsed in batch["parsed"].to_pylist():  # one block of the teacher's expansions
        prompt = P.classify(json.loads(parsed), labels)
        msgs.append(
            json.dumps(P.prefilled(prompt, P.LABEL_PREFILL) if prefill else prompt.messages)
        )
    return pa.table({"id": batch["id"], "messages": pa.array(msgs, pa.string())})


def write_expansion_labels_in(
    run_dir: str, round_: int, attempt: int, labels: list[str], prefill: bool
) -> int:
    """label_requests/: a classification request per expansion the teacher wrote, block by block."""
    folder = storage.join(run_dir, f"round-{round_}", f"expand-{attempt}")
    answers = frames.read(storage.join(folder, "answers"), ["id", "parsed"])
    requests = answers.map_batches(
        _label_requests, fn_args=(labels, prefill), batch_format="pyarrow"
    )
    return frames.write(requests, storage.join(folder, "label_requests"), REQUESTS)


def accept_expansions(
    run_dir: str, round_: int, attempt: int, threshold: float, embedding_model: str,
    eval_refs: list[str],
) -> dict[str, Any]:  # fmt: skip
    """Keep an expansion only if it re-classifies into its category and is neither a (near-)
    duplicate of the pool, of an evaluation prompt, nor of another kept expansion."""
    import numpy as np

    from tapir_ray.embed import encode, greedy_distinct, load_encoder, max_similarity
    from tapir_ray.ingest.canonical import normalize_text, row_id
    from tapir_ray.ingest.pipeline import load_eval_prompts

    folder = storage.join(run_dir, f"round-{round_}", f"expand-{attempt}")
    requests = {
        r["id"]: r for r in storage.read_table(storage.join(folder, "requests")).to_pylist()
    }
    answers = storage.read_table(storage.join(folder, "answers"), ["id", "parsed"]).to_pylist()
    relabel = {r["id"]: json.loads(r["parsed"]) for r in storage.read_table(storage.join(folder, "labels"), ["id", "parsed"]).to_pylist()}  # fmt: skip
    # The pool rows these expansions would duplicate exactly: a lookup of their ids, not the pool.
    ids = {row_id(json.loads(a["parsed"])) for a in answers}
    in_pool = set(frames.lookup(storage.join(run_dir, "ingest", "pool"), ids, []))
    eval_prompts = load_eval_prompts(eval_refs)
    kept_before = [r for a in range(attempt) for r in _accepted(run_dir, round_, a)]
    seen = in_pool | {r["id"] for r in kept_before}
    reasons: Counter = Counter()
    checked = []
    for ans in answers:
        req = requests[ans["id"]]
        text = json.loads(ans["parsed"])
        if ans["id"] not in relabel:
            reasons["label dead-lettered"] += 1
        elif relabel[ans["id"]] != req["category"]:
            reasons["re-classified into another category"] += 1
        elif normalize_text(text) in eval_prompts:
            reasons["an evaluation prompt"] += 1
        elif row_id(text) in seen:
            reasons["duplicate of the pool or another expansion"] += 1
        else:
            seen.add(row_id(text))
            checked.append({"id": row_id(text), "instruction": text, "input": "", "category": req["category"],
                            "parent_id": req["parent_id"]})  # fmt: skip
    kept = []
    if checked:
        encoder = load_encoder(embedding_model)
        vecs = encode(encoder, [c["instruction"] for c in checked])
        pool_emb = ray.data.read_parquet(storage.join(run_dir, "embeddings"))
        best_pool = max_similarity(vecs, pool_emb)
        eval_vecs = encode(encoder, sorted(eval_prompts))
        best_eval = (vecs @ eval_vecs.T).max(axis=1) if len(eval_vecs) else np.full(len(vecs), -1.0)
        prior = encode(encoder, [r["instruction"] for r in kept_before])
        near_eval = best_eval >= threshold
        eligible = ~near_eval & (best_pool < threshold)
        distinct = np.zeros(len(checked), dtype=bool)
        distinct[eligible] = greedy_distinct(vecs[eligible], prior, threshold)
        reasons["near-duplicate of an evaluation prompt"] += int(near_eval.sum())
        reasons["near-duplicate of the pool or another expansion"] += int(
            (~near_eval & ~distinct).sum()
        )
        kept = [c for c, ok in zip(checked, distinct, strict=True) if ok]
        reasons = Counter({k: v for k, v in reasons.items() if v})
    schema = pa.schema([("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()),
                        ("category", pa.string()), ("parent_id", pa.string())])  # fmt: skip
    storage.write_table(pa.Table.from_pylist(kept, schema=schema), storage.join(folder, "accepted"))
    return {"requested": len(requests), "answered": len(answers), "accepted": len(kept),
            "rejected": dict(reasons), "accepted_by_category": dict(Counter(k["category"] for k in kept))}  # fmt: skip


def _accepted(run_dir: str, round_: int, attempt: int) -> list[dict]:
    folder = storage.join(run_dir, f"round-{round_}", f"expand-{attempt}", "accepted")
    return storage.read_table(folder).to_pylist() if storage.exists(folder) else []


def write_final_plan(run_dir: str, round_: int, attempts: int, seed: int) -> dict[str, Any]:
    """plan_final/ = the selection + accepted expansions (up to each category's shortfall) +
    duplicates for whatever is still missing; totals are exact. Only the short categories' rows
    leave Arrow: duplicates repeat a category's first items in rank order, so its `missing`
    lowest-ranked plan rows are all that `duplicate_fill` needs."""
    rd = storage.join(run_dir, f"round-{round_}")
    missing = dict(storage.read_json(storage.join(rd, "plan", "_PLAN.json"))["shortfall"])
    extra = Selection()
    expansions = []
    for a in range(attempts):
        for r in _accepted(run_dir, round_, a):
            if missing.get(r["category"], 0) > 0:
                missing[r["category"]] -= 1
                extra.ids.append(r["id"])
                extra.category.append(r["category"])
                extra.source.append("expanded")
                expansions.append(r)
    missing = {c: n for c, n in missing.items() if n > 0}
    plan = frames.read(storage.join(rd, "plan"), ["id", "category", "source"])
    members = Selection(
        ids=list(extra.ids), category=list(extra.category), source=list(extra.source)
    )
    for cat, n in sorted(missing.items()):
        for r in frames.lowest(plan, lambda r: rank_key(seed, round_, r["id"]), n,
                               where=lambda r, c=cat: r["category"] == c):  # fmt: skip
            members.ids.append(r["id"])
            members.category.append(cat)
            members.source.append(r["source"])
    start = len(members.ids)
    duplicate_fill(members, missing, seed, round_)
    extra.ids += members.ids[start:]
    extra.category += members.category[start:]
    extra.source += members.source[start:]
    out = storage.join(rd, "plan_final")
    if extra.ids:
        plan = plan.union(ray.data.from_arrow(extra.table().cast(PLAN.remove(3))))
    frames.write(plan, out, PLAN.remove(3))
    counts = sum(frames.fold(frames.read(out, ["source", "category"]), _plan_counts), Counter())
    storage.write_table(
        pa.Table.from_pylist(expansions, schema=pa.schema([("id", pa.string()), ("instruction", pa.string()),
                             ("input", pa.string()), ("category", pa.string()), ("parent_id", pa.string())])),
        storage.join(rd, "expanded"),
    )  # fmt: skip
    return {"rows": sum(n for (kind, _), n in counts.items() if kind == "source"),
            "by_source": {k: n for (kind, k), n in sorted(counts.items()) if kind == "source"},
            "counts": {k: n for (kind, k), n in sorted(counts.items()) if kind == "category"},
            "duplicated": dict(missing)}  # fmt: skip


def _texts(
    run_dir: str, round_: int, cols: tuple[str, ...] = ("id", "instruction", "input")
) -> ray.data.Dataset:
    """Columns of the pool's items and of this round's expansions (both have a category)."""
    expanded = storage.join(run_dir, f"round-{round_}", "expanded")
    return frames.read([storage.join(run_dir, "items"), expanded], list(cols))


def _refine_requests(batch: pa.Table, styles: dict[str, str]) -> pa.Table:
    rows = batch.to_pylist()
    style = [styles.get(r["category"], "general") for r in rows]
    msgs = [json.dumps(P.answer(r["instruction"], r["input"], style=s).messages) for r, s in zip(rows, style, strict=True)]  # fmt: skip
    return pa.table({"id": batch["id"], "messages": pa.array(msgs, pa.string()), "style": pa.array(style, pa.string())})  # fmt: skip


def write_refine_inputs(run_dir: str, round_: int, styles: dict[str, str]) -> int:
    """refine_in/: one task-styled teacher request per planned item (a duplicated item once)."""
    rd = storage.join(run_dir, f"round-{round_}")
    plan = frames.read(storage.join(rd, "plan_final"), ["id"])
    texts = _texts(run_dir, round_, ("id", "instruction", "input", "category"))
    ds = frames.join(texts, plan, "left_semi", size=frames.rows(storage.join(rd, "plan_final")))
    ds = ds.map_batches(_refine_requests, fn_args=(styles,), batch_format="pyarrow")
    schema = pa.schema([*REQUESTS, ("style", pa.string())])
    return frames.write(ds, storage.join(rd, "refine_in"), schema)


def _train_rows(batch: pa.Table, answer_column: str, styles: dict[str, str]) -> pa.Table:
    msgs = [_messages(i, x) for i, x in zip(batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True)]  # fmt: skip
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
    rd = storage.join(run_dir, f"round-{round_}")
    n = frames.rows(storage.join(rd, "plan_final"))
    plan = frames.read(storage.join(rd, "plan_final"), ["id", "category", "source"])
    answers = frames.read(answers_dir, ["id", answer_column])
    ds = frames.join(
        frames.join(plan, answers, "inner", size=n), _texts(run_dir, round_), "inner", size=n
    )
    ds = ds.map_batches(_train_rows, fn_args=(answer_column, styles), batch_format="pyarrow")
    schema = pa.schema([("id", pa.string()), ("category", pa.string()), ("source", pa.string()), ("style", pa.string()),
                        ("messages", pa.string()), ("response", pa.string())])  # fmt: skip
    rows = frames.write(ds, storage.join(rd, "train_set"), schema)
    counts = sum(
        frames.fold(frames.read(storage.join(rd, "train_set"), ["category"]), _category_counts),
        Counter(),
    )
    return {"rows": rows, "dropped_no_answer": n - rows, "counts": dict(counts)}


def write_warmup_plan(run_dir: str, rows: int, seed: int) -> int:
    """round-0/plan_final: the first `rows` candidates in seeded random order."""
    from tapir_ray.curriculum.sample import select_dataset

    candidates = _candidates(run_dir, ["id", "category"]).map_batches(
        lambda b: b.append_column("used", pa.array([False] * b.num_rows, pa.bool_())), batch_format="pyarrow")  # fmt: skip
    plan, _ = select_dataset(candidates, size=rows, alpha=None, ratios=None, seed=seed, round_=0)
    plan = plan.map_batches(lambda b: b.set_column(2, "source", pa.array(["warmup"] * b.num_rows, pa.string())),
                            batch_format="pyarrow")  # fmt: skip
    return frames.write(plan, storage.join(run_dir, "round-0", "plan_final"), PLAN)


def heldout(items: pa.Table) -> pa.Table:
    """The rows no student trains on, with a reference answer: TAPIR's held-out fraction, CITING's
    test split."""
    mask = items["heldout"] if "heldout" in items.column_names else pc.equal(items["split"], "test")
    return items.filter(pc.and_(mask, pc.is_valid(items["teacher"])))


def _is_heldout(row: dict[str, Any]) -> bool:
    held = row["heldout"] if "heldout" in row else row["split"] == "test"
    return bool(held) and row["teacher"] is not None


def heldout_items(run_dir: str, seed: int, salt: int, limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` held-out rows (see `heldout`; all of them when None) in the seeded order
    of `salt`, found block by block: id, instruction, input, teacher."""
    folder = storage.join(run_dir, "items")
    names = frames.column_names(folder)
    if not names:
        return []
    split = "heldout" if "heldout" in names else "split"
    ds = frames.read(folder, ["id", "instruction", "input", "teacher", split])
    n = limit if limit is not None else frames.rows(folder)
    rows = frames.lowest(ds, lambda r: rank_key(seed, salt, r["id"]), n, where=_is_heldout)
    return [{k: r[k] for k in ("id", "instruction", "input", "teacher")} for r in rows]


def heldout_rows(run_dir: str, seed: int, limit: int) -> list[dict[str, Any]]:
    """The held-out NLL's rows: the first `limit` held-out rows in seeded order, as SFT rows."""
    return [{"messages": _messages(r["instruction"], r["input"]), "response": r["teacher"]}
            for r in heldout_items(run_dir, seed, -1, limit)]  # fmt: skip


# --- the TAPIR run ------------------------------------------------------------------------------


class TapirRun:
    ALGORITHM = "tapir"

    def __init__(self, cfg: Config, run_dir: str, endpoints: dict, log: Callable[[str], None],
                 *, attach: bool = False):  # fmt: skip
        """`attach=True`: a tool reading the run (eval, generate), see `curriculum_actor`."""
        from tapir_ray.oracle.ledger import Ledger

        self.cfg, self.run_dir, self.endpoints, self.log = cfg, run_dir, endpoints, log
        self.tapir = cfg.curriculum.tapir
        self.seed = cfg.run.seed
        self.actor = curriculum_actor(
            run_dir, self.ALGORITHM, self.seed, pin_to_head=cfg.resources.pin_curriculum_to_head,
            attach=attach,
        )  # fmt: skip
        self.ledger = Ledger.remote(
            storage.join(run_dir, "metrics", "oracle-ledger.json"),
            cfg.oracle.max_usd,
            cache_root=storage.join(run_dir, "oracle-cache"),
        )
        self.labels = list(self.tapir.taxonomy)
        self.limiters: dict[str, Any] = {}
        self.until: str | None = None  # `run --until STAGE`
        self.use_gpu = (
            bool(ray.cluster_resources().get("GPU", 0)) and cfg.student.gpus_per_replica > 0
        )

    def __enter__(self) -> TapirRun:
        return self

    def __exit__(self, *exc: object) -> None:
        """Ends the run's actor (state.json holds everything), so the run can be read by another
        driver at once rather than when this process lets go of the handle."""
        with contextlib.suppress(Exception):
            ray.kill(self.actor)

    # -- plumbing --

    def path(self, *parts: str) -> str:
        return storage.join(self.run_dir, *parts)

    def step(
        self, name: str, round_: int, fn: Callable[[], dict | None], total: int | None = None
    ) -> dict:
        """Run a stage once: skipped when state.json says it is done (its info is returned).
        Stops the run after it when it is the stage `run --until` names."""
        if ray.get(self.actor.stage_done.remote(name)):
            info = ray.get(self.actor.get.remote())["stages"][name]
        else:
            self.stage_name = name
            self.actor.begin_stage.remote(name, round_, total)
            started = time.perf_counter()
            info = fn() or {}
            info["seconds"] = round(time.perf_counter() - started, 2)
            ray.get(self.actor.end_stage.remote(name, info))
            ray.get(self.actor.set_ledger.remote(ray.get(self.ledger.flush.remote())))
            self.log(f"{name}: done in {info['seconds']:.1f} s {_brief(info)}")
        if name == self.until:
            raise StopAfter(name)
        return info

    def ask(self, label: str, in_dir: str, out_dir: str, *, role: str, endpoint: str, params: dict,
            parse: Callable | None, round_: int, max_dead_share: float | None = None) -> dict[str, Any]:  # fmt: skip
        """Send every row of `in_dir` to the oracle as `role`; answers to `out_dir` (Parquet).
        More dead letters than `max_dead_share` (default oracle.max_dead_letter_share) of the rows
        fail the stage in one line; a rerun (--resume) asks them again, the rest from the cache.
        Stages with a designed fallback for missing replies pass 1.0."""
        total = storage.parquet_rows(in_dir)
        return self.ask_stream(label, lambda: ray.data.read_parquet(in_dir), total, out_dir, role=role,
                               endpoint=endpoint, params=params, parse=parse, round_=round_,
                               max_dead_share=max_dead_share)  # fmt: skip

    def ask_stream(self, label: str, requests: Callable[[], ray.data.Dataset], total: int, out_dir: str, *,
                   role: str, endpoint: str, params: dict, parse: Callable | None, round_: int,
                   max_dead_share: float | None = None, sent: Callable[[], int] | None = None,
                   detail: Callable[[], str] | None = None) -> dict[str, Any]:  # fmt: skip
        """`ask` for requests that a pipeline makes as it goes (`requests()` builds the lazy
        Dataset): `total` is what the progress line counts toward, `sent()` (default `total`),
        read when the stage is over, what the dead letters are counted against; `detail()`: the
        pipeline's earlier steps, for the progress line."""
        from tapir_ray.oracle.cache import ResponseCache
        from tapir_ray.oracle.limiter import limiter_for
        from tapir_ray.oracle.stage import (
            TooManyDeadLetters,
            budget_left,
            check_dead_share,
            clear_dead_letters,
            oracle_map,
        )
        from tapir_ray.student import LIGHT_CPUS

        ep, url, identity = self.endpoints[endpoint]
        key = f"{identity}|{ep.model}"
        if key not in self.limiters:  # one per endpoint for the whole run, shared by every stage
            self.limiters[key] = limiter_for(key, ep.rpm, ep.tpm)
        storage.remove(out_dir)
        stage = f"{getattr(self, 'stage_name', label)}/{out_dir.rstrip('/').rsplit('/', 1)[-1]}"
        clear_dead_letters(self.run_dir, stage)
        if total == 0:
            return {"rows_in": 0, "rows_out": 0, "dead_lettered": 0}
        getattr(self.endpoints, "wait", lambda: None)()  # a local server may still be starting
        # No actor writes now: merge what earlier stages and killed runs left into large segments.
        ResponseCache(self.path("oracle-cache")).compact()
        ray.get(self.ledger.settle.remote(round_, role))  # rows a killed attempt left unfinished
        before = ray.get(self.ledger.done.remote(round_, role))
        # Batches of at most a quarter of an actor's share: an actor pool waits for a full batch, so
        # requests that arrive early in a streaming stage (the teacher's verdicts) would otherwise
        # wait for the later ones (the student's), and a small stage keeps every actor busy.
        ds = oracle_map(
            requests(), role=role, endpoint=ep, base_url=url, identity=identity, stage=stage,
            run_dir=self.run_dir, round_=round_, params=params, ledger=self.ledger, parse=parse,
            limiter=self.limiters[key], actors=self.cfg.oracle.actors, cpus_per_actor=self.cfg.oracle.cpus_per_actor,
            batch_size=max(8, min(64, math.ceil(total / (4 * self.cfg.oracle.actors)))), mode=self.cfg.oracle.mode_for(role),
        )  # fmt: skip
        started = time.perf_counter()
        done = lambda: min(total, ray.get(self.ledger.done.remote(round_, role)) - before)  # noqa: E731
        with Progress(label, total, done, log=self.log, detail=detail):
            ds.write_parquet(
                out_dir, ray_remote_args={"num_cpus": LIGHT_CPUS}
            )  # next to the actors
        seconds = time.perf_counter() - started
        rows_out = storage.parquet_rows(out_dir)
        total = sent() if sent is not None else total
        budget_left(self.ledger)  # the stage stays undone: --resume sends what the budget stopped
        share = self.cfg.oracle.max_dead_letter_share if max_dead_share is None else max_dead_share
        try:
            check_dead_share(self.run_dir, stage, total, rows_out, share)
        except TooManyDeadLetters as exc:
            raise RunError(str(exc)) from None
        storage.mark_success(out_dir, {"rows": rows_out})
        return {"rows_in": total, "rows_out": rows_out, "dead_lettered": total - rows_out,
                "requests_per_s": round(total / seconds, 2) if seconds else None}  # fmt: skip

    def prefill(self, endpoint: str) -> bool:
        return self.endpoints[endpoint][0].continue_final_message

    def label_params(self, labels: list[str], max_tokens: int = 16) -> dict[str, Any]:
        return P.label_params(labels, max_tokens, self.endpoints["teacher"][0].structured_choice)

    def teacher_params(self) -> dict[str, Any]:
        return {
            "max_tokens": self.cfg.oracle.teacher_max_tokens,
            "temperature": self.cfg.oracle.teacher_temperature,
        }

    # -- stages before the rounds --

    def ingest(self) -> dict:
        from tapir_ray.ingest import ingest

        summary = ingest(self.cfg.pool, self.path("ingest"), quarantine_dir=self.path("quarantine"),
                         block_rows=self.cfg.resources.ingest_batch_size)  # fmt: skip
        self.log(summary.table())
        if summary.kept == 0:
            raise RunError(
                f"the pool is empty after ingest: {summary.read} rows read = {summary.quarantined} quarantined "
                f"+ {summary.duplicates} duplicates + {summary.decontaminated} evaluation prompts "
                f"(reasons in {self.path('quarantine')})"
            )
        return {"rows_in": summary.read, "rows_out": summary.kept, "quarantined": summary.quarantined,
                "duplicates": summary.duplicates, "decontaminated": summary.decontaminated,
                "reconciles": summary.reconciles}  # fmt: skip

    @property
    def reuse_reference(self) -> bool:
        return self.tapir.reuse_reference_outputs

    @property
    def embedding_model(self) -> str:
        return self.tapir.classifier.embedding_model

    def teacher(self) -> dict:
        reuse = self.reuse_reference
        pool = ray.data.read_parquet(self.path("ingest", "pool"))

        def split(batch: pa.Table, want_reference: bool) -> pa.Table:
            has = pc.greater(pc.utf8_length(pc.fill_null(batch["output"], "")), 0)
            mask = has if want_reference else pc.invert(has)
            return batch.filter(mask) if reuse else (batch.slice(0, 0) if want_reference else batch)

        def to_request(batch: pa.Table) -> pa.Table:
            msgs = [json.dumps(P.answer(i, x).messages) for i, x in zip(batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True)]  # fmt: skip
            return pa.table({"id": batch["id"], "messages": msgs})

        storage.remove(self.path("teacher_in"))
        pool.map_batches(split, fn_args=(False,), batch_format="pyarrow").map_batches(
            to_request, batch_format="pyarrow").write_parquet(self.path("teacher_in"))  # fmt: skip
        storage.remove(self.path("teacher"))
        reference = pool.map_batches(split, fn_args=(True,), batch_format="pyarrow").select_columns(
            ["id", "output"]
        )
        n_ref = reference.count()
        if n_ref:
            reference.map_batches(lambda b: pa.table({"id": b["id"], "response": b["output"]}), batch_format="pyarrow")\
                .write_parquet(self.path("teacher", "reference"))  # fmt: skip
        info = self.ask("teacher answers", self.path("teacher_in"), self.path("teacher", "asked"),
                        role="teacher", endpoint="teacher", params=self.teacher_params(), parse=P.parse_answer, round_=0)  # fmt: skip
        return {**info, "reference_outputs": n_ref}

    def classify(self) -> dict:
        labels, prefill = self.labels, self.prefill("teacher")
        settings = self.tapir.classifier
        pool = ray.data.read_parquet(self.path("ingest", "pool"))
        seed, heldout = self.seed, self.tapir.heldout_fraction
        n_pool = storage.parquet_rows(self.path("ingest", "pool"))
        sample_share = (
            1.0 if settings.method == "oracle" else min(1.0, settings.label_sample / max(1, n_pool))
        )

        def to_request(batch: pa.Table) -> pa.Table:
            ids, msgs = [], []
            for i, ins, x in zip(
                batch["id"].to_pylist(),
                batch["instruction"].to_pylist(),
                batch["input"].to_pylist(),
                strict=True,
            ):
                if in_fraction(seed, "heldout", i, heldout) or not in_fraction(
                    seed, "label-sample", i, sample_share
                ):
                    continue
                prompt = P.classify(P.user_content(ins, x), labels)
                ids.append(i)
                msgs.append(
                    json.dumps(P.prefilled(prompt, P.LABEL_PREFILL) if prefill else prompt.messages)
                )
            return pa.table({"id": pa.array(ids, pa.string()), "messages": pa.array(msgs, pa.string())})  # fmt: skip

        storage.remove(self.path("labels_in"))
        pool.map_batches(to_request, batch_format="pyarrow").write_parquet(self.path("labels_in"))
        out_dir = self.path("labels_oracle")
        info = self.ask("task labels", self.path("labels_in"), out_dir, role="classify", endpoint="teacher",
                        params=self.label_params(labels), parse=_label_parser(labels), round_=0)  # fmt: skip
        if settings.method == "oracle":
            _labels_from_parsed(out_dir, self.path("labels"))
            return {**info, "method": "oracle"}
        self.embeddings()
        agreement = _embedding_classifier(self.run_dir, settings.holdout_fraction, seed)
        return {**info, "method": "embedding", **agreement}

    def embeddings(self) -> dict:
        """embeddings/: unit-norm sentence embeddings of every pool row (near-duplicate checks,
        the embedding classifier); computed once per run, when first needed."""
        if storage.is_done(self.path("embeddings")):
            return {}
        from tapir_ray.embed import embed

        def text(batch: pa.Table) -> pa.Table:
            t = [P.user_content(i, x) for i, x in zip(batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True)]  # fmt: skip
            return pa.table({"id": batch["id"], "text": t})

        storage.remove(self.path("embeddings"))
        ds = embed(ray.data.read_parquet(self.path("ingest", "pool")).map_batches(text, batch_format="pyarrow"),
                   self.embedding_model)  # fmt: skip
        ds.select_columns(["id", "embedding"]).write_parquet(self.path("embeddings"))
        storage.mark_success(self.path("embeddings"))
        return {"rows": storage.parquet_rows(self.path("embeddings"))}

    def nll(self, round_: int, adapter_dir: str | None, model: str) -> dict:
        from tapir_ray.eval.nll import heldout_nll_task

        rows = heldout_rows(self.run_dir, self.seed, self.tapir.nll_max_rows)
        if not rows:
            return {"nll": None, "rows": 0}
        return ray.get(
            heldout_nll_task.remote(
                model, rows, adapter_dir=adapter_dir, max_length=self.cfg.train.max_length,
                chat_template=self.cfg.student.chat_template,
            )
        )  # fmt: skip

    # -- training --

    def train(self, round_: int, student: dict, before: bool = False) -> dict:
        """Round `round_`'s fit; `before`: also the held-out NLL of the model it starts from."""
        from tapir_ray.train import train_round

        ds = ray.data.read_parquet(self.path(f"round-{round_}", "train_set"))
        full = self.cfg.train.full_finetune
        result = train_round(
            ds, self.cfg.train, self.path(f"round-{round_}"), model=student["model"],
            init_adapter=None if full else student["adapter"], seed=self.seed + round_,
            chat_template=self.cfg.student.chat_template,
            heldout=self.fit_heldout(), heldout_before=before,
        )  # fmt: skip
        losses = [m["loss"] for m in result.metrics if m.get("loss") is not None]
        tps = [m["tokens_per_s"] for m in result.metrics if m.get("tokens_per_s")]
        return {"steps": result.steps, "first_loss": losses[0] if losses else None, "final_loss": result.final_loss,
                "tokens_per_s": round(sum(tps) / len(tps), 1) if tps else None,
                "adapter": result.adapter_dir, "adapter_sha256": result.adapter_sha256, "heldout": result.heldout,
                "heldout_before": result.heldout_before,
                "rows": storage.parquet_rows(self.path(f"round-{round_}", "train_set"))}  # fmt: skip

    def student_after(self, round_: int) -> dict:
        """The student S_r: the base model with round r's adapter (or the fully fine-tuned model)."""
        if round_ < 0:
            return {"model": self.cfg.student.model, "adapter": None, "adapter_sha256": ""}
        info = ray.get(self.actor.get.remote())["rounds"].get(str(round_), {})
        if not info.get("adapter"):
            return self.student_after(round_ - 1)
        if self.cfg.train.full_finetune:
            return {"model": info["adapter"], "adapter": None, "adapter_sha256": ""}
        return {
            "model": self.cfg.student.model,
            "adapter": info["adapter"],
            "adapter_sha256": info["adapter_sha256"],
        }

    # -- the run --

    def run(self) -> dict:
        tapir = self.tapir
        self.step("ingest", 0, self.ingest)
        self.step("teacher", 0, self.teacher)
        self.step("labels", 0, self.classify)
        items = self.step(
            "items", 0, lambda: build_items(self.run_dir, self.seed, tapir.heldout_fraction)
        )
        base = self.student_after(-1)
        if not tapir.warmup:
            self.base_nll(base)
        else:
            self.step(
                "round-0/plan",
                0,
                lambda: {"rows": write_warmup_plan(self.run_dir, tapir.warmup_rows, self.seed)},
            )
            self.step(
                "round-0/train_set",
                0,
                lambda: write_train_set(self.run_dir, 0, self.path("items"), "teacher", {}),
            )
            trained = self.step("round-0/train", 0, lambda: self.train(0, base, before=True))
            ray.get(
                self.actor.update_round.remote(
                    0, {"adapter": trained["adapter"], "adapter_sha256": trained["adapter_sha256"]}
                )
            )
            self.base_nll(base, trained.get("heldout_before"))
            nll = self.step("round-0/nll", 0, lambda: self.round_nll(0, trained))
            ray.get(self.actor.update_round.remote(0, {"nll": nll.get("nll"), "train": trained}))
        sizes = round_sizes(tapir, items["candidates"])
        for r in range(1, tapir.rounds + 1):
            self.round(r, sizes[r - 1], tapir.alpha[r - 1])
        ray.get(self.actor.finish.remote("done"))
        ray.get(self.actor.set_ledger.remote(ray.get(self.ledger.flush.remote())))
        return ray.get(self.actor.get.remote())

    def base_nll(self, base: dict, from_fit: dict | None = None) -> None:
        """The base student's held-out NLL: the warm-up fit computes it before its first step;
        a task loads the base model when there is no warm-up (or its fit resumed mid-way)."""
        nll = (from_fit or {}).get("nll")
        if nll is None:
            nll = self.step("round-0/nll-base", 0, lambda: self.nll(0, None, base["model"])).get("nll")  # fmt: skip
        ray.get(self.actor.update_round.remote(0, {"nll_base": nll}))

    def fit_heldout(self) -> list[dict[str, Any]] | None:
        """Rows whose NLL each fit computes after training: the per-round held-out NLL."""
        return heldout_rows(self.run_dir, self.seed, self.tapir.nll_max_rows)

    def round_nll(self, round_: int, trained: dict) -> dict:
        """The held-out NLL after a round: the fit computed it (its model was loaded), else (a
        round trained before it did) a task loads the round's student."""
        return trained.get("heldout") or self.nll(round_, *self._nll_args(round_))

    def _nll_args(self, round_: int) -> tuple[str | None, str]:
        s = self.student_after(round_)
        return s["adapter"], s["model"]

    def round(self, r: int, size: int, alpha: float) -> None:
        tapir, rd = self.tapir, f"round-{r}"
        student = self.student_after(r - 1)
        ray.get(
            self.actor.update_round.remote(
                r, {"alpha": alpha, "size": size, "student_adapter": student["adapter"]}
            )
        )
        scores_dir: str | None = self.path(rd, "scores")
        if tapir.selection == "random":  # the control arm: no student answers, no judge
            scores_dir, scored = None, {}
        elif r == 1 or tapir.rescore_unused:
            n = self.step(
                f"{rd}/student_in",
                r,
                lambda: {"rows": write_student_inputs(self.run_dir, r)},
            )["rows"]
            self.step(
                f"{rd}/student_judge", r, lambda: self.answer_and_judge(r, student, n), total=n
            )
            scored = self.step(
                f"{rd}/scores",
                r,
                lambda: write_scores(self.run_dir, r, tapir.judge.mode, tapir.delta),
            )
            for warning in scored.get("judge", {}).get("warnings", []):
                self.log(f"warning: {rd}: the judge looks degenerate: {warning}")
        else:
            scores_dir = self.path("round-1", "scores")
            scored = ray.get(self.actor.get.remote())["stages"]["round-1/scores"]
        plan = self.step(f"{rd}/plan", r, lambda: self._plan(r, scores_dir, size, alpha))
        attempts = tapir.expansion_attempts if tapir.expansion else 0
        missing = dict(plan["shortfall"])
        for a in range(attempts):
            if not any(missing.values()):
                break
            got = self.step(
                f"{rd}/expand-{a}", r, lambda a=a, m=dict(missing): self.expand(r, a, m)
            )
            for cat, k in got.get("accepted_by_category", {}).items():
                missing[cat] = max(0, missing.get(cat, 0) - k)
        final = self.step(
            f"{rd}/plan_final",
            r,
            lambda: write_final_plan(self.run_dir, r, attempts, self.seed),
        )
        self.step(
            f"{rd}/refine_in",
            r,
            lambda: {"rows": write_refine_inputs(self.run_dir, r, tapir.styles)},
        )
        refined = self.step(f"{rd}/refine", r, lambda: self.ask(
            f"{rd} · refine", self.path(rd, "refine_in"), self.path(rd, "refine"), role="refine", endpoint="teacher",
            params=self.teacher_params(), parse=P.parse_answer, round_=r))  # fmt: skip
        train_set = self.step(
            f"{rd}/train_set",
            r,
            lambda: write_train_set(
                self.run_dir, r, self.path(rd, "refine"), "response", tapir.styles
            ),
        )
        trained = self.step(f"{rd}/train", r, lambda: self.train(r, student))
        ray.get(
            self.actor.update_round.remote(
                r, {"adapter": trained["adapter"], "adapter_sha256": trained["adapter_sha256"]}
            )
        )
        nll = self.step(f"{rd}/nll", r, lambda: self.round_nll(r, trained))
        ray.get(self.actor.update_round.remote(r, {
            "scores": scored, "plan": plan, "final": final, "refine": refined, "train_set": train_set,
            "train": trained, "nll": nll.get("nll"),
            "hard_share": round(final["by_source"].get("hard", 0) / max(1, final["rows"]), 4),
        }))  # fmt: skip
        from tapir_ray.report import write_round_metrics

        write_round_metrics(self.run_dir, r)

    def answer_and_judge(self, r: int, student: dict, n: int) -> dict[str, Any]:
        """TAPIR's scoring phase: unused candidates → student → judge (both answers of each)."""
        rd, judge, prefill = f"round-{r}", self.tapir.judge, self.prefill("judge")
        # A single-answer judge rates the teacher's answers while the student engine starts and
        # generates (they need no student answer); a pairwise judge needs both answers.
        single = judge.mode == "single"
        return self.answer_and_ask(
            f"{rd} · student answers → judge verdicts", r, student, n, folder=self.path(rd),
            to_requests=_judge_requests, fn_args=(judge.mode, prefill, ("S",) if single else ()),
            per_row=1 if single else 2, out="judge",
            early=(_judge_requests, (judge.mode, prefill, ("T",))) if single else None,
            role="judge", endpoint="judge", params=P.verdict_params(judge, prefill),
            parse=P.JudgeParser(judge.mode, judge.logprob_scoring, prefill, judge.min_valid_mass, report_mass=True),
        )  # fmt: skip

    def answer_and_ask(self, label: str, r: int, student: dict, n: int, *, folder: str, to_requests: Callable,
                       fn_args: tuple, per_row: int, out: str, early: tuple[Callable, tuple] | None = None,
                       **ask: Any) -> dict[str, Any]:  # fmt: skip
        """`folder`/student_in → the student → `to_requests` → the oracle → `folder`/`out`, as one
        streaming pipeline: the oracle works while the student generates. The requests of
        student_in carry the columns `to_requests` needs besides the answer (`student`) through the
        engine, so no join is needed. Each block of answers is written to `folder`/student as it
        passes: a rerun after a kill generates only the rows not answered yet, and the oracle's
        replies on rows already answered come from the cache. `per_row`: requests per answer.
        `early` (fn, args): one request per row of student_in that needs no student answer, sent
        from the stage's start (while the engine starts), merged into the same output."""
        from tapir_ray.student import Adapter, answer, answers_metrics, persist

        student_in, student_dir = (
            storage.join(folder, "student_in"),
            storage.join(folder, "student"),
        )
        context = [c for c in frames.column_names(student_in) if c not in ("id", "messages")]
        todo, before, kept = resume_split(student_in, student_dir, n)
        adapter = (Adapter.load(f"round-{r - 1}", student["adapter"], student["adapter_sha256"])
                   if student["adapter"] else None)  # fmt: skip
        cfg = self.cfg.student.model_copy(update={"model": student["model"]})
        tag, started = uuid.uuid4().hex[:12], time.time()
        facts: dict[str, Any] = {"engine": {}}

        def requests() -> ray.data.Dataset:
            parts = [before] if before is not None else []
            if kept < n:  # the engine starts only when there is something left to answer
                fresh, facts["engine"] = answer(todo, cfg, run_dir=self.run_dir, round_=r, adapter=adapter,
                                                use_gpu=self.use_gpu, carry=tuple(context))  # fmt: skip
                parts.insert(0, persist(fresh, student_dir, tag))
            answers = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
            return scoring_requests(answers, student_in, context, (to_requests, fn_args), early)

        # The engine answers in blocks: the progress line counts them as they are kept.
        answered = lambda: f"{frames.rows(student_dir)}/{n} answered"  # noqa: E731
        pre = n if early is not None else 0
        info = self.ask_stream(label, requests, pre + per_row * n, storage.join(folder, out), round_=r,
                               sent=lambda: pre + per_row * frames.rows(student_dir), detail=answered, **ask)  # fmt: skip
        answered = frames.rows(student_dir)
        metrics = answers_metrics(
            student_dir, tag, started, round=r, **facts["engine"], rows_in=n, rows_out=answered,
            adapter_id=adapter.id if adapter else "base", adapter_sha256=adapter.sha256 if adapter else "",
        )  # fmt: skip
        storage.write_json_atomic(storage.join(student_dir, "_METRICS.json"), metrics)
        storage.mark_success(student_dir, {"rows": answered})
        return {**info, "student": metrics}

    def _plan(self, r: int, scores_dir: str | None, size: int, alpha: float) -> dict:
        info = write_plan(self.run_dir, r, scores_dir, size, alpha, self.tapir.taxonomy,
                     self.seed, self.tapir.random_quotas)  # fmt: skip
        storage.write_json_atomic(self.path(f"round-{r}", "plan", "_PLAN.json"), info)
        return info

    def expand(self, r: int, attempt: int, missing: dict[str, int]) -> dict:
        rd, folder = f"round-{r}", self.path(f"round-{r}", f"expand-{attempt}")
        self.embeddings()
        write_expansion_requests(self.run_dir, r, attempt, missing)
        asked = self.ask(f"{rd} · expansion {attempt + 1}", storage.join(folder, "requests"), storage.join(folder, "answers"),
                         role="expand", endpoint="teacher", params={"max_tokens": self.tapir.expansion_max_tokens, "temperature": 0.0},
                         parse=P.parse_instruction, round_=r, max_dead_share=1.0)  # fmt: skip
        prefill = self.prefill("teacher")
        write_expansion_labels_in(self.run_dir, r, attempt, self.labels, prefill)
        self.ask(f"{rd} · expansion labels", storage.join(folder, "label_requests"), storage.join(folder, "labels"),
                 role="classify", endpoint="teacher", params=self.label_params(self.labels),
                 parse=_label_parser(self.labels), round_=r, max_dead_share=1.0)  # fmt: skip
        got = _task(accept_expansions, self.run_dir, r, attempt, self.tapir.near_duplicate_threshold,
                    self.tapir.classifier.embedding_model, list(self.cfg.pool.decontaminate_against))  # fmt: skip
        return {**got, "oracle": asked}


# --- parsers (module level: they travel to the oracle actors) ----------------------------------------


class _label_parser:
    def __init__(self, labels: list[str]):
        self.labels = labels

    def __call__(self, text: str) -> str:
        return P.parse_label(text, self.labels)


def _oracle_labels(batch: pa.Table) -> pa.Table:
    labels = [json.loads(p) for p in batch["parsed"].to_pylist()]
    return pa.table({"id": batch["id"], "label": pa.array(labels, pa.string())})


def _labels_from_parsed(answers_dir: str, out_dir: str) -> None:
    ds = frames.read(answers_dir, ["id", "parsed"]).map_batches(
        _oracle_labels, batch_format="pyarrow"
    )
    frames.write(ds.rename_columns({"label": "category"}), out_dir,
                 pa.schema([("id", pa.string()), ("category", pa.string())]))  # fmt: skip


def _fit_holdout(batch: pa.Table, seed: int, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """Which labelled rows fit the centroids and which measure them."""
    test = np.array([in_fraction(seed, "classifier-holdout", i, holdout) for i in batch["id"].to_pylist()], bool)  # fmt: skip
    labelled = pc.is_valid(batch["label"]).to_numpy(zero_copy_only=False)
    return labelled & ~test, labelled & test


def _class_sums(batch: pa.Table, seed: int, holdout: float) -> dict[str, Any]:
    fit, test = _fit_holdout(batch, seed, holdout)
    vecs, labels = as_matrix(batch["embedding"]), batch["label"].to_pylist()
    sums: dict[str, list] = {}
    for k in np.flatnonzero(fit):
        s = sums.setdefault(labels[k], [np.zeros(vecs.shape[1], np.float64), 0])
        s[0] += vecs[k]
        s[1] += 1
    return {"sums": sums, "fit": int(fit.sum()), "test": int(test.sum())}


def _nearest(
    batch: pa.Table, names: list[str], matrix: np.ndarray, seed: int, holdout: float
) -> pa.Table:
    """Each row's category: its oracle label where it has one, else the nearest centroid's."""
    _, test = _fit_holdout(batch, seed, holdout)
    vecs, labels = as_matrix(batch["embedding"]), batch["label"].to_pylist()
    predicted = [names[k] for k in (vecs @ matrix.T).argmax(axis=1)] if len(vecs) else []
    return pa.table({
        "id": batch["id"],
        "category": pa.array([lab if lab is not None else p for lab, p in zip(labels, predicted, strict=True)], pa.string()),
        "agree": pa.array([bool(t) and p == lab for t, p, lab in zip(test, predicted, labels, strict=True)], pa.bool_()),
    })  # fmt: skip


def _embedding_classifier(run_dir: str, holdout: float, seed: int) -> dict[str, Any]:
    """Centroids from the oracle-labelled sample (sums per class, block by block); the held-out
    part measures agreement with the oracle; every other pool row gets its nearest centroid's
    label (μ_c is the class mean, not re-normalised: <e(q), μ_c> is the mean inner product with
    the members)."""
    emb_dir, labels_dir = storage.join(run_dir, "embeddings"), storage.join(run_dir, "labels")
    n = frames.rows(emb_dir)
    oracle = frames.read(storage.join(run_dir, "labels_oracle"), ["id", "parsed"])
    oracle = oracle.map_batches(_oracle_labels, batch_format="pyarrow")
    rows = frames.join(
        frames.read(emb_dir, ["id", "embedding"]), oracle, "left_outer", size=n
    ).materialize()
    sums: dict[str, list] = {}
    fit = test = 0
    for part in frames.fold(rows, _class_sums, seed=seed, holdout=holdout):
        fit, test = fit + part["fit"], test + part["test"]
        for label, (v, k) in part["sums"].items():
            s = sums.setdefault(label, [0.0, 0])
            s[0], s[1] = s[0] + v, s[1] + k
    names = sorted(sums)
    matrix = np.stack([sums[c][0] / sums[c][1] for c in names]).astype(np.float32)
    out = rows.map_batches(_nearest, fn_args=(names, matrix, seed, holdout), batch_format="pyarrow")
    frames.write(
        out,
        labels_dir,
        pa.schema([("id", pa.string()), ("category", pa.string()), ("agree", pa.bool_())]),
    )
    agree = sum(
        frames.fold(
            frames.read(labels_dir, ["agree"], {"agree": pa.bool_()}),
            lambda b: int(pc.sum(b["agree"]).as_py() or 0),
        )
    )
    return {"oracle_labelled": frames.rows(storage.join(run_dir, "labels_oracle")), "classifier_fit_rows": fit,
            "classifier_holdout_rows": test, "classifier_agreement": round(agree / test, 4) if test else None}  # fmt: skip


def _brief(info: dict) -> str:
    keys = (
        "rows_in",
        "rows_out",
        "dead_lettered",
        "rows",
        "scored",
        "hard",
        "accepted",
        "steps",
        "final_loss",
        "nll",
    )
    parts = [f"{k}={info[k]}" for k in keys if info.get(k) is not None]
    return f"({', '.join(parts)})" if parts else ""
