"""CITING's stages over blocks (Ray Data and small Arrow tables), the rules themselves being in
citing.py: the 8:1:1 split of the items, the curriculum questions of a round, the warm-up set,
question types (induced, merged, assigned, typed by description), rubrics and the rubric book,
rubric retrieval for every question, the round's student and revision requests, the revision
training set, and the evaluation's requests and per-criterion results.

The tables read whole here (types, rubrics, a round's answers, revisions and verdicts) hold a
round's curriculum or evaluation questions: their size is `curriculum_questions`,
`eval_questions` or `max_types`, never the pool's; the split and the retrieval run over blocks."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from tapir_ray import frames, storage
from tapir_ray.curriculum.citing import (
    RubricBook,
    build_book,
    edit_distance,
    question_rank,
    revision_messages,
    split_of,
    type_centroids,
)
from tapir_ray.embed import as_matrix
from tapir_ray.oracle import prompts as P
from tapir_ray.oracle.stage import chat_messages, write_requests
from tapir_ray.rundir import RunDir

ITEMS = pa.schema([("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()),
                   ("teacher", pa.string()), ("split", pa.string())])  # fmt: skip
# A round's student requests carry the question and its rubric for the teacher's revision request.
STUDENT_IN = pa.schema([("id", pa.string()), ("messages", pa.string()), ("question", pa.string()),
                        ("rubric", pa.string())])  # fmt: skip


def _with_split(batch: pa.Table, seed: int, ratios: list[float]) -> pa.Table:
    splits = [split_of(seed, i, ratios) for i in batch["id"].to_pylist()]
    return batch.append_column("split", pa.array(splits, pa.string())).select(ITEMS.names)


def _splits(batch: pa.Table) -> Counter:
    return Counter(batch["split"].to_pylist())


def write_citing_items(run_dir: str, seed: int, ratios: list[float]) -> dict[str, Any]:
    """items/: pool rows with their teacher (or reference) answer and their split."""
    pool_dir, teacher_dir = (
        RunDir(run_dir).pool,
        RunDir(run_dir).teacher,
    )
    n_pool = frames.rows(pool_dir)
    teacher = frames.read(teacher_dir, ["id", "response"]).rename_columns({"response": "teacher"})
    items = frames.join(
        frames.read(pool_dir, ["id", "instruction", "input"]), teacher, "inner", size=n_pool
    )
    items = items.map_batches(_with_split, fn_args=(seed, list(ratios)), batch_format="pyarrow")
    frames.write(items, items_dir(run_dir), ITEMS)
    counts = sum(frames.fold(frames.read(items_dir(run_dir), ["split"]), _splits), Counter())
    return {
        "items": sum(counts.values()),
        **counts,
        "no_teacher_answer": n_pool - frames.rows(teacher_dir),
    }


def items_dir(run_dir: str) -> str:
    return RunDir(run_dir).items


def _texts(run_dir: str, ids: list[str]) -> dict[str, str]:
    """id → the question as the user writes it, for the given ids (a lookup, not the split)."""
    rows = frames.lookup(items_dir(run_dir), ids, ["instruction", "input"])
    return {i: P.user_content(r["instruction"], r["input"]) for i, r in rows.items()}


def questions_of(run_dir: str, n: int, seed: int, round_: int, resample: bool) -> list[str]:
    """The round's curriculum questions (curriculum.citing.curriculum_ids' rule), block by block."""
    train = frames.read(items_dir(run_dir), ["id", "split"])
    rows = frames.lowest(train, lambda r: question_rank(seed, round_, resample, r["id"]), n,
                         where=lambda r: r["split"] == "train")  # fmt: skip
    return [r["id"] for r in rows]


def write_warmup_set(run_dir: str, rows: int | None) -> int:
    """round-0/train_set: the first `rows` training questions by id (all of them without a
    limit), with their reference answers."""
    train = frames.read(items_dir(run_dir), ["id", "instruction", "input", "teacher", "split"])
    out = RunDir(run_dir).round(0).train_set
    if rows:
        chosen = pa.Table.from_pylist(
            frames.lowest(train, lambda r: r["id"], rows, where=lambda r: r["split"] == "train")
        )
        return frames.write(
            ray.data.from_arrow(chosen).map_batches(_warmup_rows, batch_format="pyarrow"),
            out,
            WARMUP,
        )
    train = train.map_batches(
        lambda b: b.filter(pc.equal(b["split"], "train")), batch_format="pyarrow"
    )
    return frames.write(train.map_batches(_warmup_rows, batch_format="pyarrow"), out, WARMUP)


WARMUP = pa.schema([("id", pa.string()), ("category", pa.string()), ("source", pa.string()), ("style", pa.string()),
                    ("messages", pa.string()), ("response", pa.string())])  # fmt: skip


def _warmup_rows(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    msgs = [chat_messages(i, x) for i, x in zip(batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True)]  # fmt: skip
    return pa.table({"id": batch["id"], "category": pa.array([""] * n), "source": pa.array(["warmup"] * n),
                     "style": pa.array(["general"] * n), "messages": pa.array(msgs, pa.string()),
                     "response": batch["teacher"]}, schema=WARMUP)  # fmt: skip


def write_type_requests(run_dir: str, ids: list[str], batch_size: int, max_types: int) -> int:
    text = _texts(run_dir, ids)
    batches = [ids[k : k + batch_size] for k in range(0, len(ids), batch_size)]
    rows = [{"id": f"batch-{k:05d}", "messages": json.dumps(P.induce_types([text[i] for i in b], max_types).messages)}
            for k, b in enumerate(batches)]  # fmt: skip
    write_requests(rows, RunDir(run_dir).types("induce_in"))
    return len(rows)


def write_merge_request(run_dir: str, max_types: int, fallback: list[str]) -> dict[str, Any]:
    """One request that merges the induced types. A teacher that induced none (a very small
    model) leaves the task taxonomy's categories as the types, which the run reports."""
    found = storage.read_table(RunDir(run_dir).types("induced"), ["id", "parsed"]).to_pylist()
    candidates = [t for r in sorted(found, key=lambda r: r["id"]) for t in json.loads(r["parsed"])]
    from_taxonomy = not candidates
    if from_taxonomy:
        candidates = [{"name": c, "definition": f"Instructions of the {c} category.", "merged_from": []}
                      for c in fallback[:max_types]]  # fmt: skip
    storage.write_json_atomic(RunDir(run_dir).types("candidates.json"), candidates)
    # The taxonomy's categories have no synonyms to merge: no request then.
    prompt = P.merge_types(candidates, max_types)
    write_requests(
        [] if from_taxonomy else [{"id": "merge", "messages": json.dumps(prompt.messages)}],
        RunDir(run_dir).types("merge_in"),
    )
    return {"candidates": len(candidates), "from_taxonomy": from_taxonomy}


def merged_types(run_dir: str) -> list[dict[str, Any]]:
    """The teacher's merged types; its candidates as they were when the merge was dead-lettered."""
    rows = storage.read_table(RunDir(run_dir).types("merged"), ["parsed"]).to_pylist()
    if rows:
        return json.loads(rows[0]["parsed"])
    return storage.read_json(RunDir(run_dir).types("candidates.json"))


def write_assign_requests(run_dir: str, ids: list[str], prefill: bool) -> int:
    names = [t["name"] for t in merged_types(run_dir)]
    text = _texts(run_dir, ids)
    rows = []
    for i in ids:
        prompt = P.classify(text[i], names)
        rows.append(
            {
                "id": i,
                "messages": json.dumps(
                    P.prefilled(prompt, P.LABEL_PREFILL) if prefill else prompt.messages
                ),
            }
        )
    write_requests(rows, RunDir(run_dir).types("assign_in"))
    return len(rows)


def _assigned(run_dir: str, teacher_only: bool = False) -> dict[str, str]:
    """Curriculum question → type: the teacher's, then (unless `teacher_only`) the nearest type
    description's for the questions whose assignment was dead-lettered."""
    out: dict[str, str] = {}
    for name in ("assigned",) if teacher_only else ("by_description", "assigned"):
        folder = RunDir(run_dir).types(name)
        if storage.exists(folder):
            t = storage.read_table(folder, ["id", "parsed"])
            out.update(zip(t["id"].to_pylist(), map(json.loads, t["parsed"].to_pylist()), strict=True))  # fmt: skip
    return out


def write_types_by_description(
    run_dir: str, ids: list[str], model: str, fallback: str
) -> dict[str, Any]:
    """types/by_description/: the curriculum questions the teacher named no type for (their
    assignment was dead-lettered, as with a very small teacher) get the type whose "name:
    definition" embeds closest to them (cosine). With `fallback: none` they stay untyped."""

    from tapir_ray.embed import encode, load_encoder

    teacher, types = _assigned(run_dir, teacher_only=True), merged_types(run_dir)
    missing = [i for i in ids if i not in teacher] if fallback == "description" and types else []
    rows = []
    if missing:
        emb = frames.lookup(RunDir(run_dir).embeddings, missing, ["embedding"])
        described = encode(
            load_encoder(model), [f"{t['name']}: {t.get('definition', '')}" for t in types]
        )
        scores = np.asarray([emb[i]["embedding"] for i in missing], np.float32) @ described.T
        rows = [{"id": i, "parsed": json.dumps(types[int(k)]["name"])}
                for i, k in zip(missing, scores.argmax(axis=1), strict=True)]  # fmt: skip
    schema = pa.schema([("id", pa.string()), ("parsed", pa.string())])
    storage.write_table(
        pa.Table.from_pylist(rows, schema=schema), RunDir(run_dir).types("by_description")
    )
    return {"by_teacher": sum(i in teacher for i in ids), "by_description": len(rows)}


def write_rubric_requests(run_dir: str, low: int, high: int, required: list[str]) -> int:
    merged, assigned = merged_types(run_dir), _assigned(run_dir)
    examples = {
        t["name"]: sorted(i for i, name in assigned.items() if name == t["name"])[:3]
        for t in merged
    }
    text = _texts(run_dir, [i for members in examples.values() for i in members])
    rows = []
    for t in merged:
        members = examples[t["name"]]
        if members:
            prompt = P.write_rubric(
                t["name"],
                t.get("definition", ""),
                [text[i] for i in members[:3]],
                low,
                high,
                required,
            )
            rows.append({"id": t["name"], "messages": json.dumps(prompt.messages)})
    write_requests(rows, RunDir(run_dir).types("rubric_in"))
    return len(rows)


def write_rubric_book(run_dir: str, required: list[str], low: int, high: int) -> dict[str, Any]:
    t = storage.read_table(RunDir(run_dir).types("rubrics"), ["id", "parsed"])
    criteria = {
        i: json.loads(p) for i, p in zip(t["id"].to_pylist(), t["parsed"].to_pylist(), strict=True)
    }
    assigned = _assigned(run_dir)
    book = build_book(
        merged_types(run_dir), assigned, criteria, required=required, criteria_max=high
    )
    storage.write_text_atomic(RunDir(run_dir).rubrics, book.to_json())
    # A type whose rubric request was dead-lettered keeps its questions; the required criteria
    # stand in for its rubric, and the report says so.
    generic = [t.name for t in book.types if t.name not in criteria]
    return {
        "types": len(book.types),
        "typed_questions": sum(t.members for t in book.types),
        "problems": book.check(low, high)
        + [f"{n}: the teacher wrote no rubric; the required criteria stand in" for n in generic],
    }


def load_book(run_dir: str) -> RubricBook:
    return RubricBook.from_json(storage.read_text(RunDir(run_dir).rubrics))


TYPES_BY_ID = pa.schema([("id", pa.string()), ("type", pa.string()), ("source", pa.string()),
                         ("agrees", pa.bool_())])  # fmt: skip


def _retrieved(batch: pa.Table, names: list[str], matrix: np.ndarray, assigned: dict[str, str],
               teacher: frozenset) -> pa.Table:  # fmt: skip
    """Each question's type: the one it was given (teacher or description), else the nearest
    centroid's; `agrees`: a typed question whose centroid is its own type's."""
    ids = batch["id"].to_pylist()
    got = (
        [names[k] for k in (as_matrix(batch["embedding"]) @ matrix.T).argmax(axis=1)] if ids else []
    )
    types, sources, agrees = [], [], []
    for i, g in zip(ids, got, strict=True):
        given = assigned.get(i)
        types.append(given if given is not None else g)
        sources.append(
            "retrieved" if given is None else "teacher" if i in teacher else "description"
        )
        agrees.append(given is not None and g == given)
    return pa.table({"id": batch["id"], "type": pa.array(types, pa.string()), "source": pa.array(sources, pa.string()),
                     "agrees": pa.array(agrees, pa.bool_())}, schema=TYPES_BY_ID)  # fmt: skip


def write_retrieval(run_dir: str) -> dict[str, Any]:
    """types_by_id/: the teacher's type for typed curriculum questions, the centroid's for the rest."""
    book, assigned = load_book(run_dir), _assigned(run_dir)
    teacher = _assigned(run_dir, teacher_only=True)
    known = {t.name for t in book.types}
    typed = {i: c for i, c in assigned.items() if c in known}
    if not typed:
        raise ValueError(
            "no curriculum question has a question type: every assignment was dead-lettered"
        )
    emb_dir = RunDir(run_dir).embeddings
    vecs = frames.lookup(emb_dir, typed, ["embedding"])
    members = sorted(i for i in typed if i in vecs)
    cents = type_centroids(
        np.asarray([vecs[i]["embedding"] for i in members], np.float32), [typed[i] for i in members]
    )
    names = list(cents)
    matrix = np.stack([cents[c] for c in names]).astype(np.float32)
    out = RunDir(run_dir).types_by_id
    ds = frames.read(emb_dir, ["id", "embedding"]).map_batches(
        _retrieved, fn_args=(names, matrix, typed, frozenset(teacher)), batch_format="pyarrow")  # fmt: skip
    rows = frames.write(ds, out, TYPES_BY_ID)
    agree = sum(
        frames.fold(
            frames.read(out, ["agrees"], {"agrees": pa.bool_()}),
            lambda b: int(pc.sum(b["agrees"]).as_py() or 0),
        )
    )
    storage.write_table(
        pa.table({"type": names, "centroid": pa.array([cents[c].tolist() for c in names], pa.list_(pa.float32()))}),
        RunDir(run_dir).centroids,
    )  # fmt: skip
    return {"rows": rows, "retrieval_agreement": round(agree / len(members), 4) if members else None,
            "typed": len(members), "typed_by_teacher": sum(i in teacher for i in members)}  # fmt: skip


def _rubrics(run_dir: str, ids: list[str]) -> dict[str, str]:
    """id → the rubric of its question type, for the given ids."""
    rubric = {t.name: t.rubric() for t in load_book(run_dir).types}
    types = frames.lookup(RunDir(run_dir).types_by_id, ids, ["type"])
    return {i: rubric[r["type"]] for i, r in types.items()}


def responses(folder: str) -> dict[str, str]:
    """A student or teacher stage's answers (a round's curriculum or evaluation questions)."""
    t = storage.read_table(folder, ["id", "response"])
    return dict(zip(t["id"].to_pylist(), t["response"].to_pylist(), strict=True))


def write_round_student_inputs(run_dir: str, round_: int, ids: list[str]) -> int:
    """Round 1 (and questions new to a round): the plain question. Later rounds: revise the answer
    the previous round's student gave, with the rubric."""
    text, rubric = _texts(run_dir, ids), _rubrics(run_dir, ids)
    prev_dir = RunDir(run_dir).round(round_ - 1).student
    prev = responses(prev_dir) if round_ > 1 and storage.exists(prev_dir) else {}
    rows = []
    for i in ids:
        msgs = (
            revision_messages(text[i], rubric[i], prev[i])
            if i in prev
            else [{"role": "user", "content": text[i]}]
        )
        rows.append(
            {"id": i, "messages": json.dumps(msgs), "question": text[i], "rubric": rubric[i]}
        )
    # The question and its rubric ride with each request through the engine: the teacher's
    # revision request is built from each block of answers as it arrives (`revise_requests`).
    storage.write_table(pa.Table.from_pylist(rows, schema=STUDENT_IN),
                        RunDir(run_dir).round(round_).student_in)  # fmt: skip
    return len(rows)


def revise_requests(batch: pa.Table) -> pa.Table:
    """A block of the student's answers (with question and rubric) → the teacher's revision requests."""
    msgs = [json.dumps(P.revise(q, rubric, a).messages) for q, rubric, a in
            zip(batch["question"].to_pylist(), batch["rubric"].to_pylist(), batch["student"].to_pylist(), strict=True)]  # fmt: skip
    return pa.table({"id": batch["id"], "messages": pa.array(msgs, pa.string())})


def write_revision_train_set(run_dir: str, round_: int) -> dict[str, Any]:
    """train_set/: (question, rubric, previous answer) → the teacher's revision, with its edit distance."""
    prev = responses(RunDir(run_dir).round(round_).student)
    revised = responses(RunDir(run_dir).round(round_).revise)
    ids = sorted(revised)
    text, rubric = _texts(run_dir, ids), _rubrics(run_dir, ids)
    type_of = frames.lookup(RunDir(run_dir).types_by_id, ids, ["type"])
    rows = [{"id": i, "category": type_of[i]["type"], "source": "revision", "style": "rubric",
             "messages": json.dumps(revision_messages(text[i], rubric[i], prev[i])),
             "response": revised[i], "answer_prev": prev[i], "edit_distance": edit_distance(prev[i], revised[i])}
            for i in ids]  # fmt: skip
    storage.write_table(pa.Table.from_pylist(rows), RunDir(run_dir).round(round_).train_set)
    dists = [r["edit_distance"] for r in rows]
    return {"rows": len(rows), "dropped_no_revision": len(prev) - len(rows),
            "mean_edit_distance": round(sum(dists) / len(dists), 4) if dists else None,
            "counts": dict(Counter(r["category"] for r in rows))}  # fmt: skip


def eval_ids(run_dir: str, seed: int, n: int) -> dict[str, list[str]]:
    """The first n val and test questions in seeded order."""
    from tapir_ray.curriculum.plan import rank_key

    items = frames.read(items_dir(run_dir), ["id", "split"])
    return {split: [r["id"] for r in frames.lowest(items, lambda r: rank_key(seed, -3, r["id"]), n,
                                                   where=lambda r, s=split: r["split"] == s)]
            for split in ("val", "test")}  # fmt: skip


def write_plain_requests(run_dir: str, ids: list[str], folder: str) -> int:
    text = _texts(run_dir, ids)
    write_requests(
        [{"id": i, "messages": json.dumps([{"role": "user", "content": text[i]}])} for i in ids],
        folder,
    )
    return len(ids)


def write_self_revision_requests(run_dir: str, ids: list[str], previous: str, folder: str) -> int:
    prev = responses(previous)
    asked = [i for i in ids if i in prev]
    text, rubric = _texts(run_dir, asked), _rubrics(run_dir, asked)
    rows = [
        {"id": i, "messages": json.dumps(revision_messages(text[i], rubric[i], prev[i]))}
        for i in asked
    ]
    write_requests(rows, folder)
    return len(rows)


def write_criterion_judge_requests(
    run_dir: str, round_: int, drafts: int, criteria: list[str], prefill: bool
) -> int:
    """For every draft t, question and criterion: the round's answer against the warm-up
    student's, in both orders."""
    base = responses(RunDir(run_dir).eval_baseline)
    text = _texts(run_dir, list(base))
    rows = []
    for t in range(drafts + 1):
        ours = responses(RunDir(run_dir).round(round_).eval_draft(t))
        for i in sorted(set(ours) & set(base)):
            q = text[i]
            for c in criteria:
                for tag, a, b in (("SB", ours[i], base[i]), ("BS", base[i], ours[i])):
                    prompt = P.judge_preference(q, a, b, criterion=c)
                    msgs = P.prefilled(prompt, P.PREFER_PREFILL) if prefill else prompt.messages
                    rows.append({"id": f"{i}|{t}|{c}|{tag}", "messages": json.dumps(msgs)})
    write_requests(rows, RunDir(run_dir).round(round_).eval_judge_in)
    return len(rows)


def criterion_results(run_dir: str, round_: int, ids: dict[str, list[str]], drafts: int,
                      criteria: list[str], seed: int, tune: bool) -> dict[str, Any]:  # fmt: skip
    """Win / tie / lose per criterion and draft count; T_inf from the val split when `tune`."""
    from tapir_ray.eval.winrate import win_rate

    t = storage.read_table(RunDir(run_dir).round(round_).eval_judge, ["id", "parsed"])
    v = {
        i: json.loads(p) for i, p in zip(t["id"].to_pylist(), t["parsed"].to_pylist(), strict=True)
    }

    def rates(split: str, draft: int) -> dict[str, Any]:
        out = {}
        for c in criteria:
            keys = [
                i for i in ids[split] if f"{i}|{draft}|{c}|SB" in v and f"{i}|{draft}|{c}|BS" in v
            ]
            pairs = [
                (tuple(v[f"{i}|{draft}|{c}|SB"]), tuple(v[f"{i}|{draft}|{c}|BS"])) for i in keys
            ]
            wr = win_rate(pairs, [1.0] * len(keys), [1.0] * len(keys), seed=seed)
            out[c] = {"win_rate": wr.win_rate if keys else None, "ci_low": wr.ci_low, "ci_high": wr.ci_high,
                      "wins": wr.wins, "ties": wr.ties, "losses": wr.losses, "prompts": len(keys)}  # fmt: skip
        return out

    def mean(r: dict[str, Any]) -> float:
        vals = [x["win_rate"] for x in r.values() if x["win_rate"] is not None]
        return sum(vals) / len(vals) if vals else -1.0

    val = {d: rates("val", d) for d in range(drafts + 1)}
    test = {d: rates("test", d) for d in range(drafts + 1)}
    chosen = max(range(drafts + 1), key=lambda d: (mean(val[d]), -d)) if tune else drafts
    return {"t_inf": chosen, "tuned_on_val": tune, "test": test[chosen],
            "test_by_drafts": {str(d): test[d] for d in test}, "val_by_drafts": {str(d): val[d] for d in val}}  # fmt: skip


# --- the CITING run ----------------------------------------------------------------------------


class TypeParser:
    """A curriculum question's type: one of the merged names (module level: it travels)."""

    def __init__(self, names: list[str]):
        self.names = names

    def __call__(self, text: str) -> str:
        got = P.parse_label(text, self.names, fallback="")
        if not got:
            raise P.ParseError("the reply names none of the question types")
        return got


class TypesParser:
    def __init__(self, max_types: int):
        self.max_types = max_types

    def __call__(self, text: str) -> list[dict[str, Any]]:
        return P.parse_types(text, self.max_types)
