"""TAPIR's recipe (ALGORITHMS.md) over the run layer (recipe.py), one row's path through the run
directory:

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
CurriculumActor (`Recipe.step`), so `--resume` skips what is done. Inside an unfinished oracle stage the response
cache answers every request that had returned (nothing is paid twice), an unfinished streaming
phase generates only the answers it had not written, and an unfinished training resumes from its
last checkpoint. The glue between stages (joins of answers to items by id,
requests, scores, the plan, the training set) is Ray Data over blocks (tapir_ray/frames.py); the
driver sees per-block summaries (counts, sums, histograms), never the rows.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from tapir_ray import frames, storage
from tapir_ray.config import Config
from tapir_ray.curriculum.classifier import LabelParser, embedding_classifier, labels_from_parsed
from tapir_ray.curriculum.expansion import (
    accept_expansions,
    accepted,
    write_expansion_labels_in,
    write_expansion_requests,
)
from tapir_ray.curriculum.plan import (
    Selection,
    duplicate_fill,
    in_fraction,
    rank_key,
    round_sizes,
)
from tapir_ray.curriculum.scoring import judge_requests, write_scores
from tapir_ray.oracle import prompts as P
from tapir_ray.oracle.stage import REQUESTS, chat_messages
from tapir_ray.recipe import Recipe, heldout_rows, task

# --- tasks over stage outputs (run on the cluster) -------------------------------------------------


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
    msgs = [chat_messages(i, x) for i, x in zip(batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True)]  # fmt: skip
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
        for r in accepted(run_dir, round_, a):
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


# --- the TAPIR run ------------------------------------------------------------------------------


class TapirRun(Recipe):
    ALGORITHM = "tapir"

    def __init__(self, cfg: Config, run_dir: str, endpoints: dict, log: Callable[[str], None],
                 *, attach: bool = False):  # fmt: skip
        super().__init__(cfg, run_dir, endpoints, log, attach=attach)
        self.tapir = cfg.curriculum.tapir
        self.labels = list(self.tapir.taxonomy)

    @property
    def reuse_reference(self) -> bool:
        return self.tapir.reuse_reference_outputs

    @property
    def embedding_model(self) -> str:
        return self.tapir.classifier.embedding_model

    # -- plumbing --

    # -- stages before the rounds --

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
                        params=self.label_params(labels), parse=LabelParser(labels), round_=0)  # fmt: skip
        if settings.method == "oracle":
            labels_from_parsed(out_dir, self.path("labels"))
            return {**info, "method": "oracle"}
        self.embeddings()
        agreement = embedding_classifier(self.run_dir, settings.holdout_fraction, seed)
        return {**info, "method": "embedding", **agreement}

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
            to_requests=judge_requests, fn_args=(judge.mode, prefill, ("S",) if single else ()),
            per_row=1 if single else 2, out="judge",
            early=(judge_requests, (judge.mode, prefill, ("T",))) if single else None,
            role="judge", endpoint="judge", params=P.verdict_params(judge, prefill),
            parse=P.JudgeParser(judge.mode, judge.logprob_scoring, prefill, judge.min_valid_mass, report_mass=True),
        )  # fmt: skip

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
                 parse=LabelParser(self.labels), round_=r, max_dead_share=1.0)  # fmt: skip
        got = task(accept_expansions, self.run_dir, r, attempt, self.tapir.near_duplicate_threshold,
                    self.tapir.classifier.embedding_model, list(self.cfg.pool.decontaminate_against))  # fmt: skip
        return {**got, "oracle": asked}
