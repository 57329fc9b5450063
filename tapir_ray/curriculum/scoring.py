"""TAPIR's scoring box: judge requests for a block of candidates, verdicts read back, and the
round's scores (MFD = f_J(teacher) − f_J(student), the hard flag) with the judge's diagnostics,
all over blocks (Ray Data); the driver sees per-block sums."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tapir_ray import frames
from tapir_ray.curriculum.plan import mfd_histogram
from tapir_ray.oracle import prompts as P
from tapir_ray.rundir import RunDir

SCORES = pa.schema([("id", pa.string()), ("category", pa.string()), ("score_teacher", pa.float64()),
                    ("score_student", pa.float64()), ("mfd", pa.float64()), ("hard", pa.bool_()),
                    ("consistent", pa.bool_())])  # fmt: skip


def judge_requests(
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

    run = RunDir(run_dir)
    rd = run.round(round_)
    judge_dir = rd.judge
    asked, answered = frames.rows(rd.student), frames.rows(judge_dir)
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
    category = frames.read(run.items, ["id", "category"])
    scores = frames.join(both, category, "inner", size=asked).map_batches(
        _score_rows, fn_args=(mode, delta), batch_format="pyarrow")  # fmt: skip
    frames.write(scores, rd.scores, SCORES)
    total: dict[str, Any] = {"n": 0, "hard": 0, "consistent": 0, "pairs": 0, "hist": Counter()}
    for part in frames.fold(
        frames.read(
            rd.scores,
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
