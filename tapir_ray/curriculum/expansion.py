"""TAPIR's instruction expansion: teacher requests for the categories the plan could not fill
(each inspired by a different exemplar, hard ones first), the classifier's re-check of each
expansion, and acceptance (its category holds; no exact or near duplicate of the pool, of an
evaluation prompt or of another accepted expansion).

A round's shortfall grows with the pool (a 1M-row pool can ask for hundreds of thousands of
expansions a round), so every step runs over blocks: exemplars are chosen by id from per-block
answers, their texts joined in by Ray Data; acceptance screens each block (label, evaluation
prompts), marks exact duplicates of the pool by a join, embeds with `embed()`, and compares with
the pool block by block (`max_similarity`). The one sequential step is the in-order keep rule
among the expansions themselves (`greedy_distinct`): it streams over sorted chunks and holds only
what it keeps (their vectors and ids).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from tapir_ray import frames, storage
from tapir_ray.oracle import prompts as P
from tapir_ray.oracle.stage import REQUESTS
from tapir_ray.rundir import RunDir

_S = pa.string()
# One attempt's expansions that passed the per-row screen (`reason` null) or not (its reason).
SCREENED = pa.schema([("id", _S), ("request_id", _S), ("instruction", _S), ("category", _S),
                      ("parent_id", _S), ("reason", _S)])  # fmt: skip
CHECKED = SCREENED.append(pa.field("embedding", pa.list_(pa.float32())))
ACCEPTED = pa.schema([("id", _S), ("instruction", _S), ("input", _S), ("category", _S),
                      ("parent_id", _S), ("request_id", _S), ("embedding", pa.list_(pa.float32()))])  # fmt: skip
EXPANDED = ACCEPTED.remove(6).remove(5)  # expanded/: a round's expansions, as items
# Expansions compared with the pool per pass over its embeddings: 32,768 × 384 float32 = 48 MiB.
ACCEPT_CHUNK = 32_768
DUPLICATE = "duplicate of the pool or another expansion"


def _exemplars(batch: pa.Table, want: dict[str, int]) -> dict[str, list]:
    """Per short category, this block's first exemplar ids: hard ones first, then by rank."""
    out: dict[str, list] = {}
    for cat, source, rank, i in zip(*(batch[c].to_pylist() for c in ("category", "source", "rank", "id")), strict=True):  # fmt: skip
        if want.get(cat):
            out.setdefault(cat, []).append(((source != "hard", rank), i))
    return {c: sorted(v)[: want[c]] for c, v in out.items()}


def _expand_messages(batch: pa.Table, attempt: int) -> pa.Table:
    """A block of expansion requests joined with their exemplar's text → teacher messages."""
    msgs = []
    cols = ("instruction", "input", "category")
    for instruction, input_, cat in zip(*(batch[c].to_pylist() for c in cols), strict=True):
        text = P.user_content(instruction, input_)
        # The attempt number makes retries distinct requests even with a single exemplar.
        prompt = P.expand(text + ("" if attempt == 0 else f"\n\n(Variation {attempt + 1}.)"), cat)
        msgs.append(json.dumps(prompt.messages))
    return pa.table({"id": batch["id"], "messages": pa.array(msgs, _S),
                     "category": batch["category"], "parent_id": batch["parent_id"]})  # fmt: skip


def write_expansion_requests(
    run_dir: str, round_: int, attempt: int, missing: dict[str, int]
) -> int:
    """One teacher request per missing item, each inspired by a different exemplar of its category
    (hard exemplars first), so a retry never repeats an earlier request. Only exemplar ids meet in
    one place; their texts are joined in block by block."""
    run = RunDir(run_dir)
    rd = run.round(round_)
    plan = frames.read(rd.plan, ["id", "category", "source", "rank"], {"rank": pa.uint64()})
    # Attempt a uses exemplars up to (a + 1)·n in exemplar order: each block sends back its first.
    want = {c: n * (attempt + 1) for c, n in missing.items()}
    best: dict[str, list] = {}
    for part in frames.fold(plan, _exemplars, want=want):
        for cat, found in part.items():
            best[cat] = sorted(best.get(cat, []) + found)[: want[cat]]
    ids, cats, parents = [], [], []
    for cat, n in sorted(missing.items()):
        exemplars = [i for _, i in best.get(cat, [])]
        for j in range(n if exemplars else 0):
            ids.append(f"x{round_}.{attempt}.{cat}.{j}")
            cats.append(cat)
            parents.append(exemplars[(j + attempt * n) % len(exemplars)])
    asks = ray.data.from_arrow(pa.table({"id": ids, "category": cats, "parent_id": parents}, pa.schema(
        [("id", _S), ("category", _S), ("parent_id", _S)])))  # fmt: skip
    texts = frames.read(run.items, ["id", "instruction", "input"]).rename_columns({"id": "parent_id"})  # fmt: skip
    joined = frames.join(asks, texts, "inner", size=frames.rows(run.items), on="parent_id")
    out = rd.expand(attempt).requests
    schema = pa.schema([("id", _S), ("messages", _S), ("category", _S), ("parent_id", _S)])
    return frames.write(
        joined.map_batches(_expand_messages, fn_args=(attempt,), batch_format="pyarrow"),
        out,
        schema,
    )


def label_requests(batch: pa.Table, labels: list[str], prefill: bool) -> pa.Table:
    msgs = []
    for parsed in batch["parsed"].to_pylist():  # one block of the teacher's expansions
        prompt = P.classify(json.loads(parsed), labels)
        msgs.append(
            json.dumps(P.prefilled(prompt, P.LABEL_PREFILL) if prefill else prompt.messages)
        )
    return pa.table({"id": batch["id"], "messages": pa.array(msgs, _S)})


def write_expansion_labels_in(
    run_dir: str, round_: int, attempt: int, labels: list[str], prefill: bool
) -> int:
    """label_requests/: a classification request per expansion the teacher wrote, block by block."""
    attempt_dir = RunDir(run_dir).round(round_).expand(attempt)
    answers = frames.read(attempt_dir.answers, ["id", "parsed"])
    requests = answers.map_batches(
        label_requests, fn_args=(labels, prefill), batch_format="pyarrow"
    )
    return frames.write(requests, attempt_dir.label_requests, REQUESTS)


def _screen(batch: pa.Table, eval_prompts: frozenset) -> pa.Table:
    """A block of expansions (with their request and their re-check label) → SCREENED rows: the
    expansion's row id and the first rule it breaks, if any, of those a row decides alone."""
    from tapir_ray.ingest.canonical import normalize_text, row_id

    ids, texts, reasons = [], [], []
    cols = ("parsed", "label", "category")
    for parsed, label, cat in zip(*(batch[c].to_pylist() for c in cols), strict=True):
        text = json.loads(parsed)
        ids.append(row_id(text))
        texts.append(text)
        if label is None:
            reasons.append("label dead-lettered")
        elif json.loads(label) != cat:
            reasons.append("re-classified into another category")
        elif normalize_text(text) in eval_prompts:
            reasons.append("an evaluation prompt")
        else:
            reasons.append(None)
    columns = [pa.array(ids, _S), batch["id"], pa.array(texts, _S), batch["category"],
               batch["parent_id"], pa.array(reasons, _S)]  # fmt: skip
    return pa.Table.from_arrays(columns, schema=SCREENED)


def _flag_duplicate(batch: pa.Table) -> pa.Table:
    """`seen` (its id is a pool row's or an earlier attempt's expansion) becomes the row's reason."""
    reason = pc.if_else(
        pc.and_(batch["seen"], pc.is_null(batch["reason"])), pa.scalar(DUPLICATE), batch["reason"]
    )
    return batch.drop_columns(["seen", "reason"]).append_column("reason", reason).select(SCREENED.names)  # fmt: skip


def _passing(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"]))


def _near_eval(batch: pa.Table, eval_vecs: Any, threshold: float) -> pa.Table:
    """A near-duplicate of an evaluation prompt gets that reason (one block against all of them)."""
    from tapir_ray.embed import as_matrix

    vecs = ray.get(eval_vecs) if isinstance(eval_vecs, ray.ObjectRef) else eval_vecs
    if not len(vecs) or not batch.num_rows:
        return batch
    near = (as_matrix(batch["embedding"]) @ vecs.T).max(axis=1) >= threshold
    reason = pc.if_else(pa.array(near), pa.scalar("near-duplicate of an evaluation prompt"), batch["reason"])  # fmt: skip
    return batch.set_column(batch.schema.get_field_index("reason"), "reason", reason)


def _reasons(batch: pa.Table) -> Counter:
    return Counter(r for r in batch["reason"].to_pylist() if r is not None)


def accept_expansions(
    run_dir: str, round_: int, attempt: int, threshold: float, embedding_model: str,
    eval_refs: list[str], gpus: float = 0,
) -> dict[str, Any]:  # fmt: skip
    """Keep an expansion only if it re-classifies into its category and is neither a (near-)
    duplicate of the pool, of an evaluation prompt, nor of another kept expansion (this
    attempt's, in request order, or an earlier attempt's). Writes screened/ (every answer and
    its reason), checked/ (the embedded rest) and accepted/ (ACCEPTED: each kept expansion with
    its embedding, which later attempts compare against)."""
    run = RunDir(run_dir)
    folder = run.round(round_).expand(attempt)
    _screen_and_embed(run, round_, attempt, threshold, embedding_model, eval_refs, gpus)
    reasons = sum(frames.fold(frames.read(folder.screened, ["reason"]), _reasons), Counter())
    by_category = _keep_in_order(run, round_, attempt, threshold, reasons)
    return {"requested": frames.rows(folder.requests), "answered": frames.rows(folder.answers),
            "accepted": sum(by_category.values()), "rejected": {k: v for k, v in reasons.items() if v},
            "accepted_by_category": dict(by_category)}  # fmt: skip


def _screen_and_embed(
    run: RunDir, round_: int, attempt: int, threshold: float, embedding_model: str,
    eval_refs: list[str], gpus: float,
) -> None:  # fmt: skip
    """screened/: each answer with its row id and the rules a row decides alone (label, exact
    evaluation prompt, exact duplicate of the pool or an earlier attempt: a join by row id);
    checked/: the rows that passed, embedded on the cluster and checked against the evaluation
    prompts' embeddings block by block."""
    import numpy as np

    from tapir_ray.embed import embed, encode, load_encoder
    from tapir_ray.ingest.pipeline import load_eval_prompts

    rd = run.round(round_)
    folder = rd.expand(attempt)
    answered = frames.rows(folder.answers)
    answers = frames.read(folder.answers, ["id", "parsed"])
    requests = frames.read(folder.requests, ["id", "category", "parent_id"])
    labels = frames.read(folder.labels, ["id", "parsed"]).rename_columns({"parsed": "label"})
    eval_prompts = frozenset(load_eval_prompts(eval_refs))
    joined = frames.join(frames.join(answers, requests, "inner", size=answered), labels, "left_outer", size=answered)  # fmt: skip
    screened = joined.map_batches(_screen, fn_args=(eval_prompts,), batch_format="pyarrow")
    earlier = [run.pool, *(e.accepted for e in rd.expansions(attempt))]
    seen = frames.read(earlier, ["id"])
    marked = frames.mark(screened, seen, "seen", rows=answered, ids_rows=sum(map(frames.rows, earlier)))  # fmt: skip
    frames.write(marked.map_batches(_flag_duplicate, batch_format="pyarrow"), folder.screened, SCREENED)  # fmt: skip
    eval_vecs = encode(load_encoder(embedding_model), sorted(eval_prompts)) if eval_prompts else np.zeros((0, 1), np.float32)  # fmt: skip
    passing = frames.read(folder.screened, SCREENED.names).map_batches(_passing, batch_format="pyarrow")  # fmt: skip
    checked = embed(passing, embedding_model, "instruction", gpus=gpus).map_batches(
        _near_eval, fn_args=(ray.put(eval_vecs), threshold), batch_format="pyarrow"
    )
    frames.write(checked, folder.checked, CHECKED)


def _keep_in_order(
    run: RunDir, round_: int, attempt: int, threshold: float, reasons: Counter
) -> Counter:
    """accepted/: the in-order keep rule over checked/, streamed in request order in chunks of
    ACCEPT_CHUNK: each chunk is compared with the pool's embeddings on the cluster, then with
    everything kept before it (earlier attempts' included). Adds its rejections to `reasons`;
    returns the kept rows per category. Holds only what it keeps: ids and vectors."""
    import numpy as np
    import pyarrow.parquet as pq

    from tapir_ray.embed import as_matrix, greedy_distinct, max_similarity

    rd = run.round(round_)
    folder = rd.expand(attempt)
    out = folder.accepted
    storage.remove(out)
    prior = [storage.read_table(e.accepted, ["embedding"])["embedding"] for e in rd.expansions(attempt)]  # fmt: skip
    kept_vecs = [m for m in (as_matrix(c) for c in prior) if len(m)]
    pool_emb = ray.data.read_parquet(run.embeddings)
    types = {"embedding": CHECKED.field("embedding").type}
    ordered = frames.sort(
        frames.read(folder.checked, CHECKED.names, types),
        "request_id",
        size=frames.rows(folder.checked),
    )
    seen_ids: set[str] = set()
    by_category: Counter = Counter()
    fs, path = storage.fs_and_path(out)
    fs.makedirs(path, exist_ok=True)
    parts = 0
    for chunk in ordered.iter_batches(batch_size=ACCEPT_CHUNK, batch_format="pyarrow"):
        fresh = np.zeros(chunk.num_rows, dtype=bool)
        for i, (rid, why) in enumerate(zip(chunk["id"].to_pylist(), chunk["reason"].to_pylist(), strict=True)):  # fmt: skip
            if rid in seen_ids:  # an exact copy of an expansion earlier in this attempt
                reasons[DUPLICATE] += 1
                continue
            seen_ids.add(rid)
            if why is not None:  # a near-duplicate of an evaluation prompt
                reasons[why] += 1
            fresh[i] = why is None
        vecs = as_matrix(chunk["embedding"])
        eligible = fresh.copy()
        eligible[fresh] = max_similarity(vecs[fresh], pool_emb) < threshold
        keep = np.zeros(chunk.num_rows, dtype=bool)
        keep[eligible] = greedy_distinct(vecs[eligible], kept_vecs, threshold)
        reasons["near-duplicate of the pool or another expansion"] += int((fresh & ~keep).sum())
        if not keep.any():
            continue
        kept = chunk.filter(pa.array(keep))
        kept_vecs.append(vecs[keep])
        by_category.update(kept["category"].to_pylist())
        blank = pa.array([""] * kept.num_rows, _S)
        with fs.open(f"{path}/part-{parts:05d}.parquet", "wb") as f:
            pq.write_table(
                kept.append_column("input", blank).select(ACCEPTED.names).cast(ACCEPTED), f
            )
        parts += 1
    if not parts:
        storage.write_table(ACCEPTED.empty_table(), out)
    return by_category
