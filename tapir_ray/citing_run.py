"""CITING (Feng et al., arXiv 2310.02527) over the same stages, actor and run directory as TAPIR.

```
ingest → teacher answers (the pool's own outputs where it has them) → split train/val/test 8:1:1
→ SFT warm-up on train → S_0
→ question types: the teacher induces types from batches of curriculum questions, merges synonyms,
  assigns every curriculum question a type, writes each type's rubric (3–7 numbered criteria,
  always covering articulate, in-depth, comprehensive) → <run>/rubrics.json
→ rubric retrieval: MiniLM embeddings (a Ray Data stage), type centroids of the teacher-typed
  curriculum questions, argmax <e(q), μ_c> for every other question (agreement reported)
round k = 1..K:  the student answers (k = 1: the plain question with S_0; k > 1: S_{k-1} revises its
                 previous answer with the rubric) → the teacher revises each answer as it
                 arrives (one streaming phase) against the rubric (edit distance logged) → LoRA S_k = SFT(S_{k-1}) on (question, rubric,
                 previous answer) → revision → evaluation on the test split: S_k answers and
                 self-revises T_inf times; the judge compares with the SFT warm-up student per
                 criterion, in both orders (win / tie / lose)
```

Each stage is a `Recipe.step` (recipe.py) (skipped when done; an oracle stage resumes from the cache).
"""

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
    retrieve,
    revision_messages,
    split_of,
    type_centroids,
)
from tapir_ray.embed import as_matrix
from tapir_ray.oracle import prompts as P
from tapir_ray.progress import Progress
from tapir_ray.recipe import Recipe, chat_messages, task, write_requests

# --- tasks over stage outputs (run on the cluster) -------------------------------------------------


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
        storage.join(run_dir, "ingest", "pool"),
        storage.join(run_dir, "teacher"),
    )
    n_pool = frames.rows(pool_dir)
    teacher = frames.read(teacher_dir, ["id", "response"]).rename_columns({"response": "teacher"})
    items = frames.join(
        frames.read(pool_dir, ["id", "instruction", "input"]), teacher, "inner", size=n_pool
    )
    items = items.map_batches(_with_split, fn_args=(seed, list(ratios)), batch_format="pyarrow")
    frames.write(items, _items_dir(run_dir), ITEMS)
    counts = sum(frames.fold(frames.read(_items_dir(run_dir), ["split"]), _splits), Counter())
    return {
        "items": sum(counts.values()),
        **counts,
        "no_teacher_answer": n_pool - frames.rows(teacher_dir),
    }


def _items_dir(run_dir: str) -> str:
    return storage.join(run_dir, "items")


def _texts(run_dir: str, ids: list[str]) -> dict[str, str]:
    """id → the question as the user writes it, for the given ids (a lookup, not the split)."""
    rows = frames.lookup(_items_dir(run_dir), ids, ["instruction", "input"])
    return {i: P.user_content(r["instruction"], r["input"]) for i, r in rows.items()}


def questions_of(run_dir: str, n: int, seed: int, round_: int, resample: bool) -> list[str]:
    """The round's curriculum questions (curriculum.citing.curriculum_ids' rule), block by block."""
    train = frames.read(_items_dir(run_dir), ["id", "split"])
    rows = frames.lowest(train, lambda r: question_rank(seed, round_, resample, r["id"]), n,
                         where=lambda r: r["split"] == "train")  # fmt: skip
    return [r["id"] for r in rows]


def write_warmup_set(run_dir: str, rows: int | None) -> int:
    """round-0/train_set: the first `rows` training questions by id (all of them without a
    limit), with their reference answers."""
    train = frames.read(_items_dir(run_dir), ["id", "instruction", "input", "teacher", "split"])
    out = storage.join(run_dir, "round-0", "train_set")
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
    write_requests(rows, storage.join(run_dir, "types", "induce_in"))
    return len(rows)


def write_merge_request(run_dir: str, max_types: int, fallback: list[str]) -> dict[str, Any]:
    """One request that merges the induced types. A teacher that induced none (a very small
    model) leaves the task taxonomy's categories as the types, which the run reports."""
    found = storage.read_table(
        storage.join(run_dir, "types", "induced"), ["id", "parsed"]
    ).to_pylist()
    candidates = [t for r in sorted(found, key=lambda r: r["id"]) for t in json.loads(r["parsed"])]
    from_taxonomy = not candidates
    if from_taxonomy:
        candidates = [{"name": c, "definition": f"Instructions of the {c} category.", "merged_from": []}
                      for c in fallback[:max_types]]  # fmt: skip
    storage.write_json_atomic(storage.join(run_dir, "types", "candidates.json"), candidates)
    # The taxonomy's categories have no synonyms to merge: no request then.
    prompt = P.merge_types(candidates, max_types)
    write_requests(
        [] if from_taxonomy else [{"id": "merge", "messages": json.dumps(prompt.messages)}],
        storage.join(run_dir, "types", "merge_in"),
    )
    return {"candidates": len(candidates), "from_taxonomy": from_taxonomy}


def merged_types(run_dir: str) -> list[dict[str, Any]]:
    """The teacher's merged types; its candidates as they were when the merge was dead-lettered."""
    rows = storage.read_table(storage.join(run_dir, "types", "merged"), ["parsed"]).to_pylist()
    if rows:
        return json.loads(rows[0]["parsed"])
    return storage.read_json(storage.join(run_dir, "types", "candidates.json"))


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
    write_requests(rows, storage.join(run_dir, "types", "assign_in"))
    return len(rows)


def _assigned(run_dir: str, teacher_only: bool = False) -> dict[str, str]:
    """Curriculum question → type: the teacher's, then (unless `teacher_only`) the nearest type
    description's for the questions whose assignment was dead-lettered."""
    out: dict[str, str] = {}
    for name in ("assigned",) if teacher_only else ("by_description", "assigned"):
        folder = storage.join(run_dir, "types", name)
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
        emb = frames.lookup(storage.join(run_dir, "embeddings"), missing, ["embedding"])
        described = encode(
            load_encoder(model), [f"{t['name']}: {t.get('definition', '')}" for t in types]
        )
        scores = np.asarray([emb[i]["embedding"] for i in missing], np.float32) @ described.T
        rows = [{"id": i, "parsed": json.dumps(types[int(k)]["name"])}
                for i, k in zip(missing, scores.argmax(axis=1), strict=True)]  # fmt: skip
    schema = pa.schema([("id", pa.string()), ("parsed", pa.string())])
    storage.write_table(
        pa.Table.from_pylist(rows, schema=schema), storage.join(run_dir, "types", "by_description")
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
    write_requests(rows, storage.join(run_dir, "types", "rubric_in"))
    return len(rows)


def write_rubric_book(run_dir: str, required: list[str], low: int, high: int) -> dict[str, Any]:
    t = storage.read_table(storage.join(run_dir, "types", "rubrics"), ["id", "parsed"])
    criteria = {
        i: json.loads(p) for i, p in zip(t["id"].to_pylist(), t["parsed"].to_pylist(), strict=True)
    }
    assigned = _assigned(run_dir)
    book = build_book(
        merged_types(run_dir), assigned, criteria, required=required, criteria_max=high
    )
    storage.write_text_atomic(storage.join(run_dir, "rubrics.json"), book.to_json())
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
    return RubricBook.from_json(storage.read_text(storage.join(run_dir, "rubrics.json")))


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
    emb_dir = storage.join(run_dir, "embeddings")
    vecs = frames.lookup(emb_dir, typed, ["embedding"])
    members = sorted(i for i in typed if i in vecs)
    cents = type_centroids(
        np.asarray([vecs[i]["embedding"] for i in members], np.float32), [typed[i] for i in members]
    )
    names = list(cents)
    matrix = np.stack([cents[c] for c in names]).astype(np.float32)
    out = storage.join(run_dir, "types_by_id")
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
        storage.join(run_dir, "centroids"),
    )  # fmt: skip
    return {"rows": rows, "retrieval_agreement": round(agree / len(members), 4) if members else None,
            "typed": len(members), "typed_by_teacher": sum(i in teacher for i in members)}  # fmt: skip


def _rubrics(run_dir: str, ids: list[str]) -> dict[str, str]:
    """id → the rubric of its question type, for the given ids."""
    rubric = {t.name: t.rubric() for t in load_book(run_dir).types}
    types = frames.lookup(storage.join(run_dir, "types_by_id"), ids, ["type"])
    return {i: rubric[r["type"]] for i, r in types.items()}


def _responses(folder: str) -> dict[str, str]:
    """A student or teacher stage's answers (a round's curriculum or evaluation questions)."""
    t = storage.read_table(folder, ["id", "response"])
    return dict(zip(t["id"].to_pylist(), t["response"].to_pylist(), strict=True))


def write_round_student_inputs(run_dir: str, round_: int, ids: list[str]) -> int:
    """Round 1 (and questions new to a round): the plain question. Later rounds: revise the answer
    the previous round's student gave, with the rubric."""
    text, rubric = _texts(run_dir, ids), _rubrics(run_dir, ids)
    prev_dir = storage.join(run_dir, f"round-{round_ - 1}", "student")
    prev = _responses(prev_dir) if round_ > 1 and storage.exists(prev_dir) else {}
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
    # revision request is built from each block of answers as it arrives (`_revise_requests`).
    storage.write_table(pa.Table.from_pylist(rows, schema=STUDENT_IN),
                        storage.join(run_dir, f"round-{round_}", "student_in"))  # fmt: skip
    return len(rows)


def _revise_requests(batch: pa.Table) -> pa.Table:
    """A block of the student's answers (with question and rubric) → the teacher's revision requests."""
    msgs = [json.dumps(P.revise(q, rubric, a).messages) for q, rubric, a in
            zip(batch["question"].to_pylist(), batch["rubric"].to_pylist(), batch["student"].to_pylist(), strict=True)]  # fmt: skip
    return pa.table({"id": batch["id"], "messages": pa.array(msgs, pa.string())})


def write_revision_train_set(run_dir: str, round_: int) -> dict[str, Any]:
    """train_set/: (question, rubric, previous answer) → the teacher's revision, with its edit distance."""
    prev = _responses(storage.join(run_dir, f"round-{round_}", "student"))
    revised = _responses(storage.join(run_dir, f"round-{round_}", "revise"))
    ids = sorted(revised)
    text, rubric = _texts(run_dir, ids), _rubrics(run_dir, ids)
    type_of = frames.lookup(storage.join(run_dir, "types_by_id"), ids, ["type"])
    rows = [{"id": i, "category": type_of[i]["type"], "source": "revision", "style": "rubric",
             "messages": json.dumps(revision_messages(text[i], rubric[i], prev[i])),
             "response": revised[i], "answer_prev": prev[i], "edit_distance": edit_distance(prev[i], revised[i])}
            for i in ids]  # fmt: skip
    storage.write_table(
        pa.Table.from_pylist(rows), storage.join(run_dir, f"round-{round_}", "train_set")
    )
    dists = [r["edit_distance"] for r in rows]
    return {"rows": len(rows), "dropped_no_revision": len(prev) - len(rows),
            "mean_edit_distance": round(sum(dists) / len(dists), 4) if dists else None,
            "counts": dict(Counter(r["category"] for r in rows))}  # fmt: skip


def eval_ids(run_dir: str, seed: int, n: int) -> dict[str, list[str]]:
    """The first n val and test questions in seeded order."""
    from tapir_ray.curriculum.plan import rank_key

    items = frames.read(_items_dir(run_dir), ["id", "split"])
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
    prev = _responses(previous)
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
    base = _responses(storage.join(run_dir, "eval-baseline", "student"))
    text = _texts(run_dir, list(base))
    rows = []
    for t in range(drafts + 1):
        ours = _responses(storage.join(run_dir, f"round-{round_}", "eval", f"draft-{t}"))
        for i in sorted(set(ours) & set(base)):
            q = text[i]
            for c in criteria:
                for tag, a, b in (("SB", ours[i], base[i]), ("BS", base[i], ours[i])):
                    prompt = P.judge_preference(q, a, b, criterion=c)
                    msgs = P.prefilled(prompt, P.PREFER_PREFILL) if prefill else prompt.messages
                    rows.append({"id": f"{i}|{t}|{c}|{tag}", "messages": json.dumps(msgs)})
    write_requests(rows, storage.join(run_dir, f"round-{round_}", "eval", "judge_in"))
    return len(rows)


def criterion_results(run_dir: str, round_: int, ids: dict[str, list[str]], drafts: int,
                      criteria: list[str], seed: int, tune: bool) -> dict[str, Any]:  # fmt: skip
    """Win / tie / lose per criterion and draft count; T_inf from the val split when `tune`."""
    from tapir_ray.eval.winrate import win_rate

    t = storage.read_table(
        storage.join(run_dir, f"round-{round_}", "eval", "judge"), ["id", "parsed"]
    )
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


class _type_parser:
    """A curriculum question's type: one of the merged names (module level: it travels)."""

    def __init__(self, names: list[str]):
        self.names = names

    def __call__(self, text: str) -> str:
        got = P.parse_label(text, self.names, fallback="")
        if not got:
            raise P.ParseError("the reply names none of the question types")
        return got


class _types_parser:
    def __init__(self, max_types: int):
        self.max_types = max_types

    def __call__(self, text: str) -> list[dict[str, Any]]:
        return P.parse_types(text, self.max_types)


class CitingRun(Recipe):
    ALGORITHM = "citing"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.citing = self.cfg.curriculum.citing

    @property
    def reuse_reference(self) -> bool:
        return True  # the paper's SFT data are the pool's own answers; the teacher fills the gaps

    @property
    def embedding_model(self) -> str:
        return self.citing.embedding_model

    def questions(self, round_: int) -> list[str]:
        c = self.citing
        return questions_of(
            self.run_dir, c.curriculum_questions, self.seed, round_, c.resample_each_round
        )

    def run(self) -> dict:
        c = self.citing
        self.step("ingest", 0, self.ingest)
        self.step("teacher", 0, self.teacher)
        self.step("split", 0, lambda: write_citing_items(self.run_dir, self.seed, list(c.split)))
        if c.warmup:
            base = self.student_after(-1)
            self.step(
                "round-0/train_set",
                0,
                lambda: {"rows": write_warmup_set(self.run_dir, c.warmup_rows)},
            )
            trained = self.step("round-0/train", 0, lambda: self.train(0, base))
            ray.get(
                self.actor.update_round.remote(
                    0,
                    {
                        "adapter": trained["adapter"],
                        "adapter_sha256": trained["adapter_sha256"],
                        "train": trained,
                    },
                )
            )
        self.rubrics()
        for k in range(1, c.revision_rounds + 1):
            self.round(k)
        ray.get(self.actor.finish.remote("done"))
        ray.get(self.actor.set_ledger.remote(ray.get(self.ledger.flush.remote())))
        return ray.get(self.actor.get.remote())

    def rubrics(self) -> None:
        c, prefill = self.citing, self.prefill("teacher")
        ids = self.questions(1)
        fixed = {"max_tokens": c.rubric_max_tokens, "temperature": 0.0}
        self.step(
            "types/induce_in",
            0,
            lambda: {
                "rows": write_type_requests(self.run_dir, ids, c.induction_batch_size, c.max_types)
            },
        )
        self.step("types/induce", 0, lambda: self.ask("question types", self.path("types", "induce_in"), self.path("types", "induced"),
                  role="types", endpoint="teacher", params=fixed, parse=_types_parser(c.max_types), round_=0, max_dead_share=1.0))  # fmt: skip
        fallback = [
            name
            for name, ratio in sorted(
                self.cfg.curriculum.tapir.taxonomy.items(), key=lambda kv: -kv[1]
            )
            if ratio > 0
        ]
        merge = self.step(
            "types/merge_in",
            0,
            lambda: task(write_merge_request, self.run_dir, c.max_types, fallback),
        )
        if merge.get("from_taxonomy"):
            self.log(
                "question types: the teacher induced none; the task taxonomy's categories stand in"
            )
        self.step("types/merge", 0, lambda: self.ask("merge types", self.path("types", "merge_in"), self.path("types", "merged"),
                  role="types", endpoint="teacher", params=fixed, parse=_types_parser(c.max_types), round_=0, max_dead_share=1.0))  # fmt: skip
        self.step(
            "types/assign_in",
            0,
            lambda: {"rows": write_assign_requests(self.run_dir, ids, prefill)},
        )
        names = [t["name"] for t in task(merged_types, self.run_dir)]
        self.step("types/assign", 0, lambda: self.ask("type per question", self.path("types", "assign_in"), self.path("types", "assigned"),
                  role="classify", endpoint="teacher", params=self.label_params(names, 24), parse=_type_parser(names), round_=0, max_dead_share=1.0))  # fmt: skip
        self.step("embeddings", 0, self.embeddings)
        typed = self.step("types/by_description", 0, lambda: write_types_by_description(self.run_dir, ids, self.embedding_model, c.type_fallback))  # fmt: skip
        if typed.get("by_description"):
            self.log(f"question types: the teacher named no type for {typed['by_description']} of {len(ids)} "
                     "curriculum questions; the nearest type description (embedding) typed them")  # fmt: skip
        self.step(
            "types/rubric_in",
            0,
            lambda: {
                "rows": write_rubric_requests(
                    self.run_dir,
                    c.criteria_min,
                    c.criteria_max,
                    list(c.required_criteria),
                )
            },
        )
        self.step("types/rubric", 0, lambda: self.ask("rubrics", self.path("types", "rubric_in"), self.path("types", "rubrics"),
                  role="rubric", endpoint="teacher", params=fixed, parse=P.parse_criteria, round_=0, max_dead_share=1.0))  # fmt: skip
        book = self.step(
            "rubrics",
            0,
            lambda: task(
                write_rubric_book,
                self.run_dir,
                list(c.required_criteria),
                c.criteria_min,
                c.criteria_max,
            ),
        )
        for problem in book.get("problems", []):
            self.log(f"rubrics: {problem}")
        self.step("retrieval", 0, lambda: write_retrieval(self.run_dir))

    def students(self, label: str, in_dir: str, out_dir: str, after: int) -> dict[str, Any]:
        """The student S_after answers `in_dir` into `out_dir` (the same machinery as TAPIR's)."""
        from tapir_ray.student import Adapter, run_student

        student = self.student_after(after)
        adapter = (Adapter.load(f"round-{after}", student["adapter"], student["adapter_sha256"])
                   if student["adapter"] else None)  # fmt: skip
        n, counter = storage.parquet_rows(in_dir), {"n": 0}
        cfg = self.cfg.student.model_copy(update={"model": student["model"]})
        with Progress(label, n, lambda: counter["n"], log=self.log):
            m = run_student(ray.data.read_parquet(in_dir), cfg, out_dir, run_dir=self.run_dir, round_=max(after, 0),
                            adapter=adapter, use_gpu=self.use_gpu, on_rows=lambda k: counter.__setitem__("n", k))  # fmt: skip
        return {**m, "rows_in": n, "dead_lettered": m.get("dead_lettered", 0)}

    def round(self, k: int) -> None:
        c, rd = self.citing, f"round-{k}"
        ray.get(self.actor.update_round.remote(k, {"questions": c.curriculum_questions}))
        ids = self.questions(k)
        n = self.step(
            f"{rd}/student_in",
            k,
            lambda: {"rows": write_round_student_inputs(self.run_dir, k, ids)},
        )["rows"]
        # The student answers and the teacher revises each answer as it arrives (one pipeline).
        revised = self.step(f"{rd}/student_revise", k, lambda: self.answer_and_ask(
            f"{rd} · student answers → teacher revisions", k, self.student_after(k - 1), n, folder=self.path(rd),
            to_requests=_revise_requests, fn_args=(), per_row=1, out="revise", role="revise", endpoint="teacher",
            params=self.teacher_params(), parse=P.parse_answer))  # fmt: skip
        train_set = self.step(
            f"{rd}/train_set", k, lambda: write_revision_train_set(self.run_dir, k)
        )
        trained = self.step(f"{rd}/train", k, lambda: self.train(k, self.student_after(k - 1)))
        ray.get(
            self.actor.update_round.remote(
                k, {"adapter": trained["adapter"], "adapter_sha256": trained["adapter_sha256"]}
            )
        )
        evaluation = self.evaluate(k)
        ray.get(self.actor.update_round.remote(k, {"revise": revised, "train_set": train_set, "train": trained,
                                                   "mean_edit_distance": train_set.get("mean_edit_distance"), "eval": evaluation}))  # fmt: skip
        from tapir_ray.report import write_round_metrics

        write_round_metrics(self.run_dir, k)

    def evaluate(self, k: int) -> dict[str, Any]:
        """S_k answers val and test questions and self-revises T_inf times; each draft is judged
        against the SFT warm-up student per criterion; T_inf is chosen on val when asked."""
        c, rd = self.citing, f"round-{k}"
        ids = eval_ids(self.run_dir, self.seed, c.eval_questions)
        every = ids["val"] + ids["test"]
        self.step(
            "eval-baseline/in",
            0,
            lambda: {
                "rows": write_plain_requests(self.run_dir, every, self.path("eval-baseline", "in"))
            },
        )
        self.step(
            "eval-baseline/student",
            0,
            lambda: self.students(
                "warm-up student answers",
                self.path("eval-baseline", "in"),
                self.path("eval-baseline", "student"),
                0,
            ),
        )
        for t in range(c.eval_drafts + 1):
            folder = self.path(rd, "eval", f"draft-{t}")
            if t == 0:
                self.step(
                    f"{rd}/eval/draft-0_in",
                    k,
                    lambda f=folder: {"rows": write_plain_requests(self.run_dir, every, f + "_in")},
                )
            else:
                prev = self.path(rd, "eval", f"draft-{t - 1}")
                self.step(
                    f"{rd}/eval/draft-{t}_in",
                    k,
                    lambda f=folder, p=prev: {
                        "rows": write_self_revision_requests(self.run_dir, every, p, f + "_in")
                    },
                )
            self.step(
                f"{rd}/eval/draft-{t}",
                k,
                lambda f=folder, t=t: self.students(
                    f"{rd} · evaluation draft {t}", f + "_in", f, k
                ),
            )
        prefill, criteria = self.prefill("judge"), list(c.required_criteria)
        self.step(
            f"{rd}/eval/judge_in",
            k,
            lambda: {
                "rows": write_criterion_judge_requests(
                    self.run_dir,
                    k,
                    c.eval_drafts,
                    criteria,
                    prefill,
                )
            },
        )
        params, parse = P.preference_request(self.cfg.curriculum.tapir.judge, prefill)
        self.step(f"{rd}/eval/judge", k, lambda: self.ask(f"{rd} · judge per criterion", self.path(rd, "eval", "judge_in"), self.path(rd, "eval", "judge"),
                  role="eval-judge", endpoint="judge", params=params, parse=parse, round_=k))  # fmt: skip
        return self.step(
            f"{rd}/eval/results",
            k,
            lambda: task(
                criterion_results,
                self.run_dir,
                k,
                ids,
                c.eval_drafts,
                criteria,
                self.seed,
                c.tune_inference_revisions,
            ),
        )


# --- self-revising inference: `tapir-ray generate` ---------------------------------------------


class GenerateError(Exception):
    """A problem with the generation request, said in one line."""


def read_questions(path: str) -> list[dict[str, str]]:
    """JSON / JSONL rows with `instruction` (and optional `input`), or a text file of one
    instruction per line."""
    if not path.endswith((".json", ".jsonl")):
        lines = storage.read_text(path).splitlines()
        return [{"instruction": line.strip(), "input": ""} for line in lines if line.strip()]
    try:
        rows = storage.read_json_rows(path, ("instruction",))
    except ValueError as exc:
        raise GenerateError(str(exc)) from None
    return [{"instruction": r["instruction"], "input": str(r.get("input") or "")} for r in rows]


def generate(run_dir: str, *, round_: int, input_path: str, self_revise: int | None = None,
             out_path: str | None = None, log=print) -> str:  # fmt: skip
    """Answer every question with S_round, then revise the answer `self_revise` times with the
    rubric retrieved for it (default: the T_inf the run chose on val for that round, else the
    configured one); writes all drafts as JSONL and returns the output path."""
    import time

    import numpy as np
    import yaml

    from tapir_ray.config import parse_config
    from tapir_ray.curriculum import read_state
    from tapir_ray.embed import encode, load_encoder
    from tapir_ray.runtime import ensure_ray

    run_dir = storage.absolute(run_dir)
    state = read_state(run_dir)
    if state is None or state.get("algorithm") != "citing":
        raise GenerateError(f"{run_dir}: not a CITING run (no state.json with algorithm citing)")
    if str(round_) not in state.get("rounds", {}) or not state["rounds"][str(round_)].get(
        "adapter"
    ):
        have = sorted(int(r) for r, i in state.get("rounds", {}).items() if i.get("adapter"))
        raise GenerateError(
            f"--round {round_}: the run has no trained round {round_} (it has {have})"
        )
    questions = read_questions(input_path)
    cfg = parse_config(yaml.safe_load(storage.read_text(storage.join(run_dir, "config.yaml"))))
    if self_revise is None:
        chosen = (state["rounds"][str(round_)].get("eval") or {}).get("t_inf")
        self_revise = chosen if chosen is not None else cfg.curriculum.citing.inference_revisions
        how = "chosen on val for this round" if chosen is not None else "citing.inference_revisions"
        log(f"self-revisions: {self_revise} ({how})")
    ensure_ray(cfg.resources)
    book = load_book(run_dir)
    cents = storage.read_table(storage.join(run_dir, "centroids")).to_pylist()
    centroid = {c["type"]: np.asarray(c["centroid"], dtype=np.float32) for c in cents}
    texts = [P.user_content(q["instruction"], q["input"]) for q in questions]
    types = retrieve(encode(load_encoder(cfg.curriculum.citing.embedding_model), texts), centroid)
    rubric = {t.name: t.rubric() for t in book.types}
    work = storage.join(run_dir, "generate", time.strftime("%Y%m%d-%H%M%S"))
    ids = [f"q{k:06d}" for k in range(len(questions))]
    drafts: list[dict[str, str]] = []
    with CitingRun(cfg, run_dir, {}, log, attach=True) as runner:
        for t in range(self_revise + 1):
            if t == 0:
                msgs = [[{"role": "user", "content": q}] for q in texts]
            else:
                msgs = [
                    revision_messages(q, rubric[c], drafts[-1][i])
                    for q, c, i in zip(texts, types, ids, strict=True)
                ]
            folder = storage.join(work, f"draft-{t}")
            write_requests(
                [{"id": i, "messages": json.dumps(m)} for i, m in zip(ids, msgs, strict=True)],
                folder + "_in",
            )
            runner.students(f"generate · draft {t}", folder + "_in", folder, round_)
            got = _responses(folder)
            drafts.append({i: got.get(i, drafts[-1][i] if drafts else "") for i in ids})
    out_path = out_path or storage.join(work, "answers.jsonl")
    lines = [json.dumps({"instruction": q["instruction"], "input": q["input"], "type": c, "rubric": rubric[c],
                         "drafts": [d[i] for d in drafts], "answer": drafts[-1][i]}, ensure_ascii=False)
             for q, c, i in zip(questions, types, ids, strict=True)]  # fmt: skip
    storage.write_text_atomic(out_path, "\n".join(lines) + "\n")
    return out_path
