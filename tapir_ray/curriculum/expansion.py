"""TAPIR's instruction expansion: teacher requests for the categories the plan could not fill
(each inspired by a different exemplar, hard ones first), the classifier's re-check of each
expansion, and acceptance (its category holds; no exact or near duplicate of the pool, of an
evaluation prompt or of another accepted expansion: blockwise matrix products, embed.py)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import ray

from tapir_ray import frames, storage
from tapir_ray.oracle import prompts as P
from tapir_ray.oracle.stage import REQUESTS


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


def label_requests(batch: pa.Table, labels: list[str], prefill: bool) -> pa.Table:
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
        label_requests, fn_args=(labels, prefill), batch_format="pyarrow"
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
    kept_before = [r for a in range(attempt) for r in accepted(run_dir, round_, a)]
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


def accepted(run_dir: str, round_: int, attempt: int) -> list[dict]:
    folder = storage.join(run_dir, f"round-{round_}", f"expand-{attempt}", "accepted")
    return storage.read_table(folder).to_pylist() if storage.exists(folder) else []
