"""The run loop: the one module that knows the order of the stages.

TAPIR (ALGORITHMS.md), one row's path through the run directory:

    ingest/pool ─► teacher/ (y_T) ─► labels/ (task category) ─► items/ (+ held-out flag)
      [round-0: warm-up LoRA on a slice → S_0]
      round r = 1..R:
        student/ (S_{r-1} answers the unused candidates) ─► judge/ (f_J of y_T and y_S)
        ─► scores/ (MFD = f_J(y_T) − f_J(y_S); hard iff MFD ≥ δ)
        ─► plan/ (per-category quotas N_r·π*, hard share α_r, easy = unused easy + replay)
        ─► expand-*/ (teacher-written instructions for short categories, label re-checked,
                      near-duplicates and evaluation prompts rejected; duplication last)
        ─► refine/ (task-styled teacher answers) ─► train_set/ ─► adapter/ (S_r = SFT(S_{r−1}))
        ─► held-out NLL ─► metrics/round-r.json
    ─► metrics/report.md (+ plots)

Every stage writes Parquet under `<run>/` and is recorded done in `state.json` by the
CurriculumActor, so `--resume` skips what is done. Inside an unfinished oracle stage the response
cache answers every request that had returned (nothing is paid twice); an unfinished training
resumes from its last checkpoint. Joins of stage outputs run as Ray tasks on small columns, never
on the driver.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from tapir_ray import storage
from tapir_ray.config import Config
from tapir_ray.curriculum.actor import curriculum_actor, read_state
from tapir_ray.curriculum.plan import (
    Selection,
    duplicate_fill,
    in_fraction,
    mfd_histogram,
    rank_key,
    round_sizes,
    select_random,
    select_round,
)
from tapir_ray.lease import LeaseHeld, RunLease
from tapir_ray.oracle import prompts as P
from tapir_ray.progress import Progress


class RunError(RuntimeError):
    """A problem with the run as asked (existing run dir, missing endpoint), told in one line."""


def _task(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run `fn` as a Ray task (joins of stage outputs stay off the driver) and wait for it."""
    return ray.get(ray.remote(num_cpus=0)(fn).remote(*args, **kwargs))


# --- the oracle endpoints of a run -----------------------------------------------------------------


@contextlib.contextmanager
def oracle_endpoints(cfg: Config, run_dir: str, log: Callable[[str], None]) -> Iterator[dict]:
    """role → (EndpointConfig, base_url, cache identity); starts the local server when asked."""
    from tapir_ray.oracle.local import LocalOracle, VLLMOracle

    roles = {"teacher": cfg.oracle.endpoint("teacher"), "judge": cfg.oracle.endpoint("judge")}
    missing = [r for r, ep in roles.items() if ep.base_url is None]
    server = None
    backend = cfg.oracle.local_server()
    if missing and not cfg.oracle.local:
        raise RunError(
            f"oracle.{missing[0]}.base_url is not set; set it, or set oracle.local: true to serve a local model"
        )
    try:
        if missing:
            storage.makedirs(storage.join(run_dir, "logs"))
            log(f"starting the local oracle ({backend}, {cfg.oracle.local_model}) ...")
            log_path = storage.join(run_dir, "logs", "oracle.log")
            if backend == "vllm":
                from tapir_ray.assets import resolve_model

                server = VLLMOracle(
                    resolve_model(cfg.oracle.local_model), max_num_seqs=cfg.oracle.local_max_batch,
                    max_model_len=cfg.oracle.local_max_model_len, port=cfg.oracle.local_port,
                    log_path=log_path,
                )  # fmt: skip
            else:
                args = ["--backend", backend, "--max-batch", str(cfg.oracle.local_max_batch)]
                if cfg.oracle.local_port:
                    args += ["--port", str(cfg.oracle.local_port)]
                if backend == "hf":
                    args += ["--model", cfg.oracle.local_model]
                server = LocalOracle(*args, startup_timeout=600, log_path=log_path)
            server.__enter__()
            log(f"local oracle listening at {server.base_url}")
        out = {}
        for role, ep in roles.items():
            if ep.base_url is None:
                # Both local servers continue a prefilled assistant turn (vLLM also constrains a
                # classification to its labels); the port changes between runs,
                # so the cache keys on a stable name instead of the URL.
                # It takes no key: none is sent to it.
                ep = ep.model_copy(update={"continue_final_message": True, "api_key_env": None,
                                           "structured_choice": backend == "vllm"})  # fmt: skip
                identity = f"local://{backend}/{cfg.oracle.local_model}"
                out[role] = (ep, server.base_url, identity)
            else:
                out[role] = (ep, ep.base_url, ep.base_url)
        yield out
    finally:
        if server is not None:
            server.stop()


# --- tasks over stage outputs (run on the cluster) -------------------------------------------------


def _messages(instruction: str, input_text: str) -> str:
    return json.dumps([{"role": "user", "content": P.user_content(instruction, input_text)}])


def build_items(run_dir: str, seed: int, heldout_fraction: float) -> dict[str, Any]:
    """items/ = pool rows with their teacher answer and category, flagged held-out or candidate."""
    pool = storage.read_table(
        storage.join(run_dir, "ingest", "pool"), ["id", "instruction", "input"]
    )
    teacher = storage.read_table(storage.join(run_dir, "teacher"), ["id", "response"])
    teacher = teacher.rename_columns(["id", "teacher"])
    labels = storage.read_table(storage.join(run_dir, "labels"), ["id", "category"])
    items = pool.join(teacher, "id", join_type="inner").join(labels, "id", join_type="left outer")
    held = [in_fraction(seed, "heldout", i, heldout_fraction) for i in items["id"].to_pylist()]
    items = items.append_column("heldout", pa.array(held))
    # A candidate needs a category; held-out rows only need their teacher answer.
    keep = pc.or_(items["heldout"], pc.is_valid(items["category"]))
    items = items.filter(keep).sort_by("id")
    storage.write_table(items, storage.join(run_dir, "items"))
    return {
        "pool": pool.num_rows,
        "no_teacher_answer": pool.num_rows - teacher.num_rows,
        "items": items.num_rows,
        "heldout": int(pc.sum(items["heldout"]).as_py() or 0),
        "candidates": items.num_rows - int(pc.sum(items["heldout"]).as_py() or 0),
    }


def used_ids(run_dir: str, before_round: int) -> set[str]:
    ids: set[str] = set()
    for r in range(before_round):
        folder = storage.join(run_dir, f"round-{r}", "train_set")
        if storage.exists(folder):
            ids.update(storage.read_table(folder, ["id"])["id"].to_pylist())
    return ids


def _write_requests(rows: list[dict], folder: str) -> None:
    """An oracle or student stage's input: id and messages (JSON), even when there are no rows."""
    schema = pa.schema([("id", pa.string()), ("messages", pa.string())])
    storage.write_table(pa.Table.from_pylist(rows, schema=schema), folder)


def write_student_inputs(run_dir: str, round_: int) -> int:
    items = storage.read_table(storage.join(run_dir, "items"))
    used = used_ids(run_dir, round_)
    rows = [
        {"id": i, "messages": _messages(ins, inp)}
        for i, ins, inp, h in zip(
            items["id"].to_pylist(), items["instruction"].to_pylist(),
            items["input"].to_pylist(), items["heldout"].to_pylist(), strict=True,
        )
        if not h and i not in used
    ]  # fmt: skip
    _write_requests(rows, storage.join(run_dir, f"round-{round_}", "student_in"))
    return len(rows)


def write_judge_inputs(run_dir: str, round_: int, mode: str, prefill: bool) -> int:
    items = storage.read_table(storage.join(run_dir, "items"))
    student = storage.read_table(
        storage.join(run_dir, f"round-{round_}", "student"), ["id", "response"]
    )
    joined = items.join(student.rename_columns(["id", "student"]), "id", join_type="inner")
    rows = []
    for r in joined.to_pylist():
        text = P.user_content(r["instruction"], r["input"])
        if mode == "single":
            for tag, answer in (("T", r["teacher"]), ("S", r["student"])):
                prompt = P.judge_single(text, answer)
                msgs = P.prefilled(prompt, P.VERDICT_PREFILL) if prefill else prompt.messages
                rows.append({"id": f"{r['id']}|{tag}", "messages": json.dumps(msgs)})
        else:
            for tag, a, b in (
                ("TS", r["teacher"], r["student"]),
                ("ST", r["student"], r["teacher"]),
            ):
                prompt = P.judge_pairwise(text, a, b)
                msgs = P.prefilled(prompt, P.PAIR_PREFILL) if prefill else prompt.messages
                rows.append({"id": f"{r['id']}|{tag}", "messages": json.dumps(msgs)})
    _write_requests(rows, storage.join(run_dir, f"round-{round_}", "judge_in"))
    return len(rows)


def write_scores(run_dir: str, round_: int, mode: str, delta: float) -> dict[str, Any]:
    """scores/ per candidate: f_J of teacher and student answers, MFD and the hard flag."""
    judged = storage.read_table(storage.join(run_dir, f"round-{round_}", "judge"), ["id", "parsed"])
    verdicts: dict[str, dict[str, Any]] = {}
    for row_id, parsed in zip(judged["id"].to_pylist(), judged["parsed"].to_pylist(), strict=True):
        item, tag = row_id.rsplit("|", 1)
        verdicts.setdefault(item, {})[tag] = json.loads(parsed)
    asked = storage.read_table(storage.join(run_dir, f"round-{round_}", "student"), ["id"])
    items = storage.read_table(storage.join(run_dir, "items"), ["id", "category"])
    category = dict(zip(items["id"].to_pylist(), items["category"].to_pylist(), strict=True))
    rows, unscored = [], 0
    for item in asked["id"].to_pylist():
        v = verdicts.get(item, {})
        if mode == "single" and {"T", "S"} <= set(v):
            teacher, student = float(v["T"]), float(v["S"])
        elif mode == "pairwise" and {"TS", "ST"} <= set(v):
            teacher, student = P.average_both_orders(tuple(v["TS"]), tuple(v["ST"]))
        else:
            unscored += 1  # a verdict was dead-lettered: this item sits this round out
            continue
        mfd = teacher - student
        rows.append({"id": item, "category": category[item], "score_teacher": teacher,
                     "score_student": student, "mfd": mfd, "hard": mfd >= delta})  # fmt: skip
    schema = pa.schema([("id", pa.string()), ("category", pa.string()), ("score_teacher", pa.float64()),
                        ("score_student", pa.float64()), ("mfd", pa.float64()), ("hard", pa.bool_())])  # fmt: skip
    storage.write_table(
        pa.Table.from_pylist(rows, schema=schema),
        storage.join(run_dir, f"round-{round_}", "scores"),
    )
    mfds = [r["mfd"] for r in rows]
    from tapir_ray.eval.judge_health import judge_health, order_consistency

    consistency = None
    if mode == "pairwise":
        consistency = order_consistency(
            (v["TS"], v["ST"]) for v in verdicts.values() if {"TS", "ST"} <= set(v)
        )
    health = judge_health(
        asked=2 * asked.num_rows, answered=sum(len(v) for v in verdicts.values()), consistency=consistency,
        scores_by_source={"teacher": [r["score_teacher"] for r in rows], "student": [r["score_student"] for r in rows]},
    )  # fmt: skip
    return {
        "judge": health,
        "scored": len(rows),
        "unscored": unscored,
        "hard": sum(r["hard"] for r in rows),
        "hard_share": round(sum(r["hard"] for r in rows) / len(rows), 4) if rows else None,
        "mean_mfd": round(sum(mfds) / len(mfds), 4) if mfds else None,
        "mean_score_teacher": round(sum(r["score_teacher"] for r in rows) / len(rows), 3) if rows else None,
        "mean_score_student": round(sum(r["score_student"] for r in rows) / len(rows), 3) if rows else None,
        "mfd_histogram": mfd_histogram(mfds),
    }  # fmt: skip


def write_plan(
    run_dir: str, round_: int, scores_dir: str | None, size: int, alpha: float, ratios: dict, seed: int,
    random_quotas: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """plan/: the round's selection; with no scores (selection: random) the control arm's."""
    items = storage.read_table(storage.join(run_dir, "items"), ["id", "category", "heldout"])
    items = items.filter(pc.invert(items["heldout"]))
    if scores_dir is None:
        used = used_ids(run_dir, round_)
        ids = items["id"].to_pylist()
        candidates = pa.table(
            {"id": ids, "category": items["category"], "used": [i in used for i in ids]}
        )
        sel = select_random(
            candidates,
            size=size,
            ratios=ratios if random_quotas else None,
            seed=seed,
            round_=round_,
        )
        storage.write_table(sel.table(), storage.join(run_dir, f"round-{round_}", "plan"))
        return {"size": size, "alpha": None, "selection": "random", "targets": sel.targets, "hard_targets": {},
                "shortfall": sel.shortfall, "selected": dict(Counter(sel.source))}  # fmt: skip
    scores = storage.read_table(scores_dir, ["id", "hard"])
    hard = dict(zip(scores["id"].to_pylist(), scores["hard"].to_pylist(), strict=True))
    used = used_ids(run_dir, round_)
    ids = items["id"].to_pylist()
    candidates = pa.table({
        "id": ids, "category": items["category"],
        "hard": pa.array([hard.get(i) for i in ids], pa.bool_()),
        "used": [i in used for i in ids],
    })  # fmt: skip
    sel = select_round(candidates, size=size, alpha=alpha, ratios=ratios, seed=seed, round_=round_)
    storage.write_table(sel.table(), storage.join(run_dir, f"round-{round_}", "plan"))
    return {
        "size": size,
        "alpha": alpha,
        "targets": sel.targets,
        "hard_targets": sel.hard_targets,
        "shortfall": sel.shortfall,
        "selected": dict(Counter(sel.source)),
        "hard_pool": {"path": scores_dir, "filter": "hard and not used", "rows": sum(1 for i in ids if hard.get(i) and i not in used)},
        "easy_pool": {"path": scores_dir, "filter": "not hard, or used (replay)", "rows": sum(1 for i in ids if (hard.get(i) is False) or i in used)},
    }  # fmt: skip


def write_expansion_requests(
    run_dir: str, round_: int, attempt: int, missing: dict[str, int]
) -> int:
    """One teacher request per missing item, each inspired by a different exemplar of its category
    (hard exemplars first), so a retry never repeats an earlier request."""
    plan = storage.read_table(storage.join(run_dir, f"round-{round_}", "plan")).to_pylist()
    text = {
        i: P.user_content(*t)
        for i, t in _item_texts(run_dir, round_, {r["id"] for r in plan}).items()
    }
    rows = []
    for cat, n in sorted(missing.items()):
        chosen = [r for r in plan if r["category"] == cat]
        exemplars = [r["id"] for r in chosen if r["source"] == "hard"] + [
            r["id"] for r in chosen if r["source"] != "hard"
        ]
        for j in range(n):
            parent = exemplars[(j + attempt * n) % len(exemplars)]
            # The attempt number makes retries distinct requests even with a single exemplar.
            prompt = P.expand(
                text[parent] + ("" if attempt == 0 else f"\n\n(Variation {attempt + 1}.)"), cat
            )
            rows.append({"id": f"x{round_}.{attempt}.{cat}.{j}", "messages": json.dumps(prompt.messages),
                         "category": cat, "parent_id": parent})  # fmt: skip
    storage.write_table(
        pa.Table.from_pylist(rows),
        storage.join(run_dir, f"round-{round_}", f"expand-{attempt}", "requests"),
    )
    return len(rows)


def write_expansion_labels_in(
    run_dir: str, round_: int, attempt: int, labels: list[str], prefill: bool
) -> int:
    folder = storage.join(run_dir, f"round-{round_}", f"expand-{attempt}")
    out = storage.read_table(storage.join(folder, "answers"), ["id", "parsed"]).to_pylist()
    rows = []
    for r in out:
        prompt = P.classify(json.loads(r["parsed"]), labels)
        msgs = P.prefilled(prompt, P.LABEL_PREFILL) if prefill else prompt.messages
        rows.append({"id": r["id"], "messages": json.dumps(msgs)})
    _write_requests(rows, storage.join(folder, "label_requests"))
    return len(rows)


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
    pool_ids = set(
        storage.read_table(storage.join(run_dir, "ingest", "pool"), ["id"])["id"].to_pylist()
    )
    eval_prompts = load_eval_prompts(eval_refs)
    kept_before = [r for a in range(attempt) for r in _accepted(run_dir, round_, a)]
    seen = pool_ids | {r["id"] for r in kept_before}
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
    duplicates for whatever is still missing; totals are exact."""
    base = storage.read_table(storage.join(run_dir, f"round-{round_}", "plan")).to_pylist()
    info = storage.read_json(storage.join(run_dir, f"round-{round_}", "plan", "_PLAN.json"))
    missing = dict(info["shortfall"])
    sel = Selection(ids=[r["id"] for r in base], category=[r["category"] for r in base],
                    source=[r["source"] for r in base])  # fmt: skip
    expansions = []
    for a in range(attempts):
        for r in _accepted(run_dir, round_, a):
            if missing.get(r["category"], 0) > 0:
                missing[r["category"]] -= 1
                sel.ids.append(r["id"])
                sel.category.append(r["category"])
                sel.source.append("expanded")
                expansions.append(r)
    missing = {c: n for c, n in missing.items() if n > 0}
    duplicate_fill(sel, missing, seed, round_)
    storage.write_table(sel.table(), storage.join(run_dir, f"round-{round_}", "plan_final"))
    storage.write_table(
        pa.Table.from_pylist(expansions, schema=pa.schema([("id", pa.string()), ("instruction", pa.string()),
                             ("input", pa.string()), ("category", pa.string()), ("parent_id", pa.string())])),
        storage.join(run_dir, f"round-{round_}", "expanded"),
    )  # fmt: skip
    return {"rows": len(sel.ids), "by_source": dict(Counter(sel.source)),
            "counts": dict(Counter(sel.category)), "duplicated": dict(missing)}  # fmt: skip


def _item_texts(run_dir: str, round_: int, ids: set[str]) -> dict[str, tuple[str, str]]:
    """(instruction, input) of the given ids: pool items, or this round's expansions."""
    items = storage.read_table(storage.join(run_dir, "items"), ["id", "instruction", "input"])
    items = items.filter(pc.is_in(items["id"], pa.array(sorted(ids), pa.string())))
    texts = {i: (a, b) for i, a, b in zip(items["id"].to_pylist(), items["instruction"].to_pylist(), items["input"].to_pylist(), strict=True)}  # fmt: skip
    expanded = storage.join(run_dir, f"round-{round_}", "expanded")
    if storage.exists(expanded):
        for r in storage.read_table(expanded).to_pylist():
            texts[r["id"]] = (r["instruction"], r["input"])
    return texts


def write_refine_inputs(run_dir: str, round_: int, styles: dict[str, str]) -> int:
    plan = storage.read_table(storage.join(run_dir, f"round-{round_}", "plan_final")).to_pylist()
    texts = _item_texts(run_dir, round_, {r["id"] for r in plan})
    rows, seen = [], set()
    for r in plan:
        if r["id"] in seen:
            continue
        seen.add(r["id"])
        style = styles.get(r["category"], "general")
        prompt = P.answer(*texts[r["id"]], style=style)
        rows.append({"id": r["id"], "messages": json.dumps(prompt.messages), "style": style})
    storage.write_table(
        pa.Table.from_pylist(rows), storage.join(run_dir, f"round-{round_}", "refine_in")
    )
    return len(rows)


def write_train_set(
    run_dir: str, round_: int, answers_dir: str, answer_column: str, styles: dict
) -> dict[str, Any]:
    """train_set/: one row per planned item (duplicates kept) whose answer exists."""
    plan = storage.read_table(storage.join(run_dir, f"round-{round_}", "plan_final")).to_pylist()
    answers = storage.read_table(answers_dir, ["id", answer_column])
    answer = dict(zip(answers["id"].to_pylist(), answers[answer_column].to_pylist(), strict=True))
    texts = _item_texts(run_dir, round_, {r["id"] for r in plan})
    rows, dropped = [], 0
    for r in plan:
        if r["id"] not in answer:
            dropped += 1  # its refinement was dead-lettered
            continue
        rows.append({"id": r["id"], "category": r["category"], "source": r["source"],
                     "style": styles.get(r["category"], "general"),
                     "messages": _messages(*texts[r["id"]]), "response": answer[r["id"]]})  # fmt: skip
    storage.write_table(
        pa.Table.from_pylist(rows), storage.join(run_dir, f"round-{round_}", "train_set")
    )
    return {
        "rows": len(rows),
        "dropped_no_answer": dropped,
        "counts": dict(Counter(r["category"] for r in rows)),
    }


def write_warmup_plan(run_dir: str, rows: int, seed: int) -> int:
    items = storage.read_table(storage.join(run_dir, "items"), ["id", "category", "heldout"])
    items = items.filter(pc.invert(items["heldout"]))
    chosen = sorted(zip(items["id"].to_pylist(), items["category"].to_pylist(), strict=True),
                    key=lambda x: rank_key(seed, 0, x[0]))[:rows]  # fmt: skip
    storage.write_table(
        pa.table({"id": [c[0] for c in chosen], "category": [c[1] for c in chosen], "source": ["warmup"] * len(chosen)}),
        storage.join(run_dir, "round-0", "plan_final"),
    )  # fmt: skip
    return len(chosen)


def heldout(items: pa.Table) -> pa.Table:
    """The rows no student trains on, with a reference answer: TAPIR's held-out fraction, CITING's
    test split."""
    mask = items["heldout"] if "heldout" in items.column_names else pc.equal(items["split"], "test")
    return items.filter(pc.and_(mask, pc.is_valid(items["teacher"])))


def heldout_rows(run_dir: str, seed: int, limit: int) -> list[dict[str, Any]]:
    items = storage.read_table(storage.join(run_dir, "items"))
    rows = heldout(items).to_pylist()  # only the held-out rows leave Arrow
    rows.sort(key=lambda r: rank_key(seed, -1, r["id"]))
    return [
        {"messages": _messages(r["instruction"], r["input"]), "response": r["teacher"]}
        for r in rows[:limit]
    ]


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
        """Run a stage once: skipped when state.json says it is done (its info is returned)."""
        if ray.get(self.actor.stage_done.remote(name)):
            return ray.get(self.actor.get.remote())["stages"][name]
        self.stage_name = name
        self.actor.begin_stage.remote(name, round_, total)
        started = time.perf_counter()
        info = fn() or {}
        info["seconds"] = round(time.perf_counter() - started, 2)
        ray.get(self.actor.end_stage.remote(name, info))
        ray.get(self.actor.set_ledger.remote(ray.get(self.ledger.flush.remote())))
        self.log(f"{name}: done in {info['seconds']:.1f} s {_brief(info)}")
        return info

    def ask(self, label: str, in_dir: str, out_dir: str, *, role: str, endpoint: str, params: dict,
            parse: Callable | None, round_: int, max_dead_share: float | None = None) -> dict[str, Any]:  # fmt: skip
        """Send every row of `in_dir` to the oracle as `role`; answers to `out_dir` (Parquet).
        More dead letters than `max_dead_share` (default oracle.max_dead_letter_share) of the rows
        fail the stage in one line; a rerun (--resume) asks them again, the rest from the cache.
        Stages with a designed fallback for missing replies pass 1.0."""
        from tapir_ray.oracle.limiter import limiter_for
        from tapir_ray.oracle.stage import (
            TooManyDeadLetters,
            budget_left,
            check_dead_share,
            clear_dead_letters,
            oracle_map,
        )

        ep, url, identity = self.endpoints[endpoint]
        key = f"{identity}|{ep.model}"
        if key not in self.limiters:  # one per endpoint for the whole run, shared by every stage
            self.limiters[key] = limiter_for(key, ep.rpm, ep.tpm)
        total = storage.parquet_rows(in_dir)
        storage.remove(out_dir)
        stage = f"{getattr(self, 'stage_name', label)}/{out_dir.rstrip('/').rsplit('/', 1)[-1]}"
        clear_dead_letters(self.run_dir, stage)
        if total == 0:
            return {"rows_in": 0, "rows_out": 0, "dead_lettered": 0}
        before = ray.get(self.ledger.done.remote(round_, role))
        ds = oracle_map(
            ray.data.read_parquet(in_dir), role=role, endpoint=ep, base_url=url, identity=identity, stage=stage,
            run_dir=self.run_dir, round_=round_, params=params, ledger=self.ledger, parse=parse,
            limiter=self.limiters[key], actors=self.cfg.oracle.actors, cpus_per_actor=self.cfg.oracle.cpus_per_actor,
            batch_size=max(8, min(64, math.ceil(total / self.cfg.oracle.actors))), mode=self.cfg.oracle.mode_for(role),
        )  # fmt: skip
        started = time.perf_counter()
        done = lambda: min(total, ray.get(self.ledger.done.remote(round_, role)) - before)  # noqa: E731
        with Progress(label, total, done, log=self.log):
            ds.write_parquet(out_dir)
        seconds = time.perf_counter() - started
        rows_out = storage.parquet_rows(out_dir)
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
        out_dir = self.path("labels") if settings.method == "oracle" else self.path("labels_oracle")
        info = self.ask("task labels", self.path("labels_in"), out_dir, role="classify", endpoint="teacher",
                        params=self.label_params(labels), parse=_label_parser(labels), round_=0)  # fmt: skip
        if settings.method == "oracle":
            _task(_labels_from_parsed, out_dir, out_dir)
            return {**info, "method": "oracle"}
        self.embeddings()
        agreement = _task(_embedding_classifier, self.run_dir, settings.holdout_fraction, seed)
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

        rows = _task(heldout_rows, self.run_dir, self.seed, self.tapir.nll_max_rows)
        if not rows:
            return {"nll": None, "rows": 0}
        return ray.get(
            heldout_nll_task.remote(
                model, rows, adapter_dir=adapter_dir, max_length=self.cfg.train.max_length,
                chat_template=self.cfg.student.chat_template,
            )
        )  # fmt: skip

    # -- training --

    def train(self, round_: int, student: dict) -> dict:
        from tapir_ray.train import train_round

        ds = ray.data.read_parquet(self.path(f"round-{round_}", "train_set"))
        full = self.cfg.train.full_finetune
        result = train_round(
            ds, self.cfg.train, self.path(f"round-{round_}"), model=student["model"],
            init_adapter=None if full else student["adapter"], seed=self.seed + round_,
            chat_template=self.cfg.student.chat_template,
            heldout=self.fit_heldout(),
        )  # fmt: skip
        losses = [m["loss"] for m in result.metrics if m.get("loss") is not None]
        tps = [m["tokens_per_s"] for m in result.metrics if m.get("tokens_per_s")]
        return {"steps": result.steps, "first_loss": losses[0] if losses else None, "final_loss": result.final_loss,
                "tokens_per_s": round(sum(tps) / len(tps), 1) if tps else None,
                "adapter": result.adapter_dir, "adapter_sha256": result.adapter_sha256, "heldout": result.heldout,
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
            "items", 0, lambda: _task(build_items, self.run_dir, self.seed, tapir.heldout_fraction)
        )
        base = self.student_after(-1)
        nll0 = self.step("round-0/nll-base", 0, lambda: self.nll(0, None, base["model"]))
        ray.get(self.actor.update_round.remote(0, {"nll_base": nll0.get("nll")}))
        if tapir.warmup:
            self.step(
                "round-0/plan",
                0,
                lambda: {
                    "rows": _task(write_warmup_plan, self.run_dir, tapir.warmup_rows, self.seed)
                },
            )
            self.step(
                "round-0/train_set",
                0,
                lambda: _task(write_train_set, self.run_dir, 0, self.path("items"), "teacher", {}),
            )
            trained = self.step("round-0/train", 0, lambda: self.train(0, base))
            ray.get(
                self.actor.update_round.remote(
                    0, {"adapter": trained["adapter"], "adapter_sha256": trained["adapter_sha256"]}
                )
            )
            nll = self.step("round-0/nll", 0, lambda: self.round_nll(0, trained))
            ray.get(self.actor.update_round.remote(0, {"nll": nll.get("nll"), "train": trained}))
        sizes = round_sizes(tapir, items["candidates"])
        for r in range(1, tapir.rounds + 1):
            self.round(r, sizes[r - 1], tapir.alpha[r - 1])
        ray.get(self.actor.finish.remote("done"))
        ray.get(self.actor.set_ledger.remote(ray.get(self.ledger.flush.remote())))
        return ray.get(self.actor.get.remote())

    def fit_heldout(self) -> list[dict[str, Any]] | None:
        """Rows whose NLL each fit computes after training: the per-round held-out NLL."""
        return _task(heldout_rows, self.run_dir, self.seed, self.tapir.nll_max_rows)

    def round_nll(self, round_: int, trained: dict) -> dict:
        """The held-out NLL after a round: the fit computed it (its model was loaded), else (a
        round trained before it did) a task loads the round's student."""
        return trained.get("heldout") or self.nll(round_, *self._nll_args(round_))

    def _nll_args(self, round_: int) -> tuple[str | None, str]:
        s = self.student_after(round_)
        return s["adapter"], s["model"]

    def round(self, r: int, size: int, alpha: float) -> None:
        from tapir_ray.student import Adapter, run_student

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
                lambda: {"rows": _task(write_student_inputs, self.run_dir, r)},
            )["rows"]

            def answer() -> dict:
                adapter = (Adapter.load(f"round-{r - 1}", student["adapter"], student["adapter_sha256"])
                           if student["adapter"] else None)  # fmt: skip
                counter = {"n": 0}
                cfg = self.cfg.student.model_copy(update={"model": student["model"]})
                with Progress(f"{rd} · student answers", n, lambda: counter["n"], log=self.log):
                    m = run_student(ray.data.read_parquet(self.path(rd, "student_in")), cfg, self.path(rd, "student"),
                                    run_dir=self.run_dir, round_=r, adapter=adapter, use_gpu=self.use_gpu,
                                    on_rows=lambda k: counter.__setitem__("n", k))  # fmt: skip
                return {**m, "rows_in": n, "dead_lettered": m.get("dead_lettered", 0)}

            self.step(f"{rd}/student", r, answer, total=n)
            mode, prefill = tapir.judge.mode, self.prefill("judge")
            self.step(
                f"{rd}/judge_in",
                r,
                lambda: {"rows": _task(write_judge_inputs, self.run_dir, r, mode, prefill)},
            )
            self.step(f"{rd}/judge", r, lambda: self.ask(
                f"{rd} · judge", self.path(rd, "judge_in"), self.path(rd, "judge"), role="judge", endpoint="judge",
                params=self._judge_params(prefill), parse=P.JudgeParser(mode, tapir.judge.logprob_scoring, prefill, tapir.judge.min_valid_mass), round_=r))  # fmt: skip
            scored = self.step(
                f"{rd}/scores", r, lambda: _task(write_scores, self.run_dir, r, mode, tapir.delta)
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
            lambda: _task(write_final_plan, self.run_dir, r, attempts, self.seed),
        )
        self.step(
            f"{rd}/refine_in",
            r,
            lambda: {"rows": _task(write_refine_inputs, self.run_dir, r, tapir.styles)},
        )
        refined = self.step(f"{rd}/refine", r, lambda: self.ask(
            f"{rd} · refine", self.path(rd, "refine_in"), self.path(rd, "refine"), role="refine", endpoint="teacher",
            params=self.teacher_params(), parse=P.parse_answer, round_=r))  # fmt: skip
        train_set = self.step(
            f"{rd}/train_set",
            r,
            lambda: _task(
                write_train_set, self.run_dir, r, self.path(rd, "refine"), "response", tapir.styles
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

    def _judge_params(self, prefill: bool) -> dict[str, Any]:
        j = self.tapir.judge
        params: dict[str, Any] = {
            "temperature": j.temperature,
            "max_tokens": min(j.max_tokens, 8) if prefill else j.max_tokens,
        }
        if j.logprob_scoring:
            params.update(logprobs=True, top_logprobs=20)
            if prefill and j.mode == "single":  # the score is read at the first two positions:
                params["max_tokens"] = 2  # a tokenizer that splits digits writes 10 as "1", "0"
        return params

    def _plan(self, r: int, scores_dir: str | None, size: int, alpha: float) -> dict:
        info = _task(write_plan, self.run_dir, r, scores_dir, size, alpha, self.tapir.taxonomy,
                     self.seed, self.tapir.random_quotas)  # fmt: skip
        storage.write_json_atomic(self.path(f"round-{r}", "plan", "_PLAN.json"), info)
        return info

    def expand(self, r: int, attempt: int, missing: dict[str, int]) -> dict:
        rd, folder = f"round-{r}", self.path(f"round-{r}", f"expand-{attempt}")
        self.embeddings()
        _task(write_expansion_requests, self.run_dir, r, attempt, missing)
        asked = self.ask(f"{rd} · expansion {attempt + 1}", storage.join(folder, "requests"), storage.join(folder, "answers"),
                         role="expand", endpoint="teacher", params={"max_tokens": 256, "temperature": 0.0},
                         parse=P.parse_instruction, round_=r, max_dead_share=1.0)  # fmt: skip
        prefill = self.prefill("teacher")
        _task(write_expansion_labels_in, self.run_dir, r, attempt, self.labels, prefill)
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


def _labels_from_parsed(answers_dir: str, out_dir: str) -> None:
    t = storage.read_table(answers_dir, ["id", "parsed"])
    cats = [json.loads(x) for x in t["parsed"].to_pylist()]
    storage.write_table(pa.table({"id": t["id"], "category": pa.array(cats, pa.string())}), out_dir)


def _embedding_classifier(run_dir: str, holdout: float, seed: int) -> dict[str, Any]:
    """Centroids from the oracle-labelled sample; the held-out part measures agreement with the
    oracle; every other pool row gets its nearest centroid's label."""

    from tapir_ray.embed import as_matrix, centroids, nearest_centroid

    oracle = storage.read_table(storage.join(run_dir, "labels_oracle"), ["id", "parsed"])
    labelled = {
        i: json.loads(p)
        for i, p in zip(oracle["id"].to_pylist(), oracle["parsed"].to_pylist(), strict=True)
    }
    emb = storage.read_table(storage.join(run_dir, "embeddings"))
    ids = emb["id"].to_pylist()
    vecs = as_matrix(emb["embedding"])
    fit = [
        k
        for k, i in enumerate(ids)
        if i in labelled and not in_fraction(seed, "classifier-holdout", i, holdout)
    ]
    test = [
        k
        for k, i in enumerate(ids)
        if i in labelled and in_fraction(seed, "classifier-holdout", i, holdout)
    ]
    cents = centroids(vecs[fit], [labelled[ids[k]] for k in fit])
    predicted = nearest_centroid(vecs, cents)
    agree = sum(predicted[k] == labelled[ids[k]] for k in test)
    cats = [labelled.get(i, predicted[k]) for k, i in enumerate(ids)]
    storage.write_table(pa.table({"id": ids, "category": cats}), storage.join(run_dir, "labels"))
    return {"oracle_labelled": len(labelled), "classifier_fit_rows": len(fit), "classifier_holdout_rows": len(test),
            "classifier_agreement": round(agree / len(test), 4) if test else None}  # fmt: skip


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


# --- entry points ---------------------------------------------------------------------------------


def runner_class(cfg: Config) -> type[TapirRun]:
    if cfg.curriculum.algorithm == "citing":
        from tapir_ray.citing_run import CitingRun

        return CitingRun
    return TapirRun


def run(cfg: Config, *, resume: bool | str = False, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the curriculum the config names; returns the final state.
    `resume="auto"` resumes when run.dir holds a run and starts one otherwise."""
    from tapir_ray.runtime import ensure_ray

    run_dir = storage.absolute(cfg.run.dir)
    state = read_state(run_dir)
    if (
        resume == "auto"
    ):  # a retried cluster job: continue a run that started, start one that did not
        resume = state is not None
    if state is not None and not resume:
        raise RunError(
            f"{run_dir} already holds a run (status {state['status']}); add --resume to continue it, or choose a new run.dir"
        )
    if state is None and resume:
        raise RunError(f"{run_dir}: no run to resume (no state.json)")
    if not cfg.oracle.local:
        endpoints = [("teacher", cfg.oracle.teacher), ("judge", cfg.oracle.judge)]
        for role, ep in endpoints:
            if ep is not None and ep.api_key_env and not os.environ.get(ep.api_key_env):
                raise RunError(
                    f"oracle.{role}.api_key_env: ${ep.api_key_env} is not set in this environment (on a cluster, set it on the head node, e.g. from a Kubernetes Secret)"
                )
    storage.makedirs(run_dir)
    try:
        lease = RunLease(run_dir).acquire()  # one driver per run, before anything is written
    except LeaseHeld as exc:
        raise RunError(str(exc)) from None
    storage.write_text_atomic(storage.join(run_dir, "config.yaml"), cfg.to_yaml())
    ensure_ray(cfg.resources)
    started = time.perf_counter()
    with (
        lease,
        oracle_endpoints(cfg, run_dir, log) as endpoints,
        runner_class(cfg)(cfg, run_dir, endpoints, log) as runner,
    ):
        try:
            state = runner.run()
        except BaseException:
            with contextlib.suppress(Exception):
                ray.get(runner.actor.finish.remote("failed"), timeout=10)
            raise
    from tapir_ray.report import write_report

    text = write_report(run_dir)
    log(text)
    log(
        f"run finished in {time.perf_counter() - started:.0f} s; report: {storage.join(run_dir, 'metrics', 'report.md')}"
    )
    return state
