"""The run layer both curricula stand on: what a recipe (rounds.py: TAPIR, citing_run.py: CITING)
runs its stages with, so that each recipe reads as its algorithm.

- `Recipe`: the run context (config, run directory, endpoints, the curriculum actor, the ledger,
  one limiter per endpoint) and the stage runner: `step` runs a stage once and records it in
  state.json (`--resume` skips what is done; `run --until` stops after a stage), `ask` and
  `ask_stream` send a stage's requests through the oracle stage (cache, budget, dead letters,
  progress), `answer_and_ask` streams the student's answers into an oracle stage, `train` fits a
  round. The stages both recipes share are here too: ingest, teacher answers, embeddings.
- Row shaping that both recipes and the tools reading a run use: chat requests, scoring-phase
  requests built from answers as they arrive, the row-level resume split, held-out rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from tapir_ray import frames, storage
from tapir_ray.config import Config
from tapir_ray.curriculum.actor import curriculum_actor
from tapir_ray.curriculum.plan import rank_key
from tapir_ray.oracle import prompts as P
from tapir_ray.oracle.stage import REQUESTS, chat_messages
from tapir_ray.progress import Progress
from tapir_ray.rundir import RunDir


class RunError(RuntimeError):
    """A problem with the run as asked (existing run dir, missing endpoint), told in one line."""


class StopAfter(Exception):  # noqa: N818 (not an error: the stop `run --until` asked for)
    """Raised once the stage `run --until` names is done; `--resume` continues from there."""


def task(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run `fn` as a Ray task (joins of stage outputs stay off the driver) and wait for it."""
    return ray.get(ray.remote(num_cpus=0)(fn).remote(*args, **kwargs))


# --- row shaping shared by the recipes ---------------------------------------------------------


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

    columns = frames.column_names(student_in) or REQUESTS.names
    inputs = frames.read(student_in, columns, num_cpus=LIGHT_CPUS)
    kept = frames.rows(student_dir)
    if not kept:
        return inputs, None, 0
    done = frames.read(student_dir, ["id", "response"])
    todo = frames.join(inputs, done.select_columns(["id"]), "left_anti", size=n)
    return todo, frames.join(inputs.drop_columns(["messages"]), done, "inner", size=n), kept


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
    folder = RunDir(run_dir).items
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
    return [{"messages": chat_messages(r["instruction"], r["input"]), "response": r["teacher"]}
            for r in heldout_items(run_dir, seed, -1, limit)]  # fmt: skip


# --- the recipe base ---------------------------------------------------------------------------


class Recipe:
    """What a curriculum runs its stages with; a subclass is one algorithm (its `run`)."""

    ALGORITHM = ""

    def __init__(self, cfg: Config, run_dir: str, endpoints: dict, log: Callable[[str], None],
                 *, attach: bool = False):  # fmt: skip
        """`attach=True`: a tool reading the run (eval, generate), see `curriculum_actor`."""
        from tapir_ray.oracle.ledger import Ledger

        self.cfg, self.run_dir, self.endpoints, self.log = cfg, run_dir, endpoints, log
        self.paths = RunDir(run_dir)
        self.seed = cfg.run.seed
        self.actor = curriculum_actor(
            run_dir, self.ALGORITHM, self.seed, pin_to_head=cfg.resources.pin_curriculum_to_head,
            attach=attach,
        )  # fmt: skip
        self.ledger = Ledger.remote(
            self.paths.ledger, cfg.oracle.max_usd, cache_root=self.paths.oracle_cache
        )
        self.limiters: dict[str, Any] = {}
        self.until: str | None = None  # `run --until STAGE`
        self.use_gpu = (
            bool(ray.cluster_resources().get("GPU", 0)) and cfg.student.gpus_per_replica > 0
        )

    def __enter__(self) -> Recipe:
        return self

    def __exit__(self, *exc: object) -> None:
        """Ends the run's actor (state.json holds everything), so the run can be read by another
        driver at once rather than when this process lets go of the handle."""
        with contextlib.suppress(Exception):
            ray.kill(self.actor)

    # -- plumbing --

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
        ResponseCache(self.paths.oracle_cache).compact()
        ray.get(self.ledger.settle.remote(round_, role))  # rows a killed attempt left unfinished
        before = ray.get(self.ledger.done.remote(round_, role))
        # Batches of at most a quarter of an actor's share: an actor pool waits for a full batch, so
        # requests that arrive early in a streaming stage (the teacher's verdicts) would otherwise
        # wait for the later ones (the student's), and a small stage keeps every actor busy.
        ds = oracle_map(
            requests(), role=role, endpoint=ep, base_url=url, identity=identity, stage=stage,
            run_dir=self.run_dir, round_=round_, params=params, ledger=self.ledger, parse=parse,
            limiter=self.limiters[key], actors=self.cfg.oracle.actors, cpus_per_actor=self.cfg.oracle.cpus_per_actor,
            nice=self.cfg.oracle.nice,
            batch_size=max(8, min(64, math.ceil(total / (4 * self.cfg.oracle.actors)))), mode=self.cfg.oracle.mode_for(role),
        )  # fmt: skip
        started = time.perf_counter()
        done = lambda: min(total, ray.get(self.ledger.done.remote(round_, role)) - before)  # noqa: E731
        with Progress(label, total, done, log=self.log, detail=detail):
            frames.write_as_it_goes(ds, out_dir)
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

    def answer_and_ask(self, label: str, r: int, student: dict, n: int, *, to_requests: Callable,
                       fn_args: tuple, per_row: int, out: str, early: tuple[Callable, tuple] | None = None,
                       **ask: Any) -> dict[str, Any]:  # fmt: skip
        """round-r/student_in → the student → `to_requests` → the oracle → round-r/`out`, as one
        streaming pipeline: the oracle works while the student generates. The requests of
        student_in carry the columns `to_requests` needs besides the answer (`student`) through the
        engine, so no join is needed. Each block of answers is written to round-r/student as it
        passes: a rerun after a kill generates only the rows not answered yet, and the oracle's
        replies on rows already answered come from the cache. `per_row`: requests per answer.
        `early` (fn, args): one request per row of student_in that needs no student answer, sent
        from the stage's start (while the engine starts), merged into the same output."""
        from tapir_ray.student import Adapter, answer, answers_metrics, persist

        rd = self.paths.round(r)
        student_in, student_dir = rd.student_in, rd.student
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
                                                use_gpu=self.use_gpu, carry=tuple(context), rows=n - kept)  # fmt: skip
                parts.insert(0, persist(fresh, student_dir, tag))
            answers = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
            return scoring_requests(answers, student_in, context, (to_requests, fn_args), early)

        # The engine answers in blocks: the progress line counts them as they are kept.
        answered_rows = storage.RowsWritten(student_dir)
        answered = lambda: f"{answered_rows()}/{n} answered"  # noqa: E731
        pre = n if early is not None else 0
        info = self.ask_stream(label, requests, pre + per_row * n, rd.join(out), round_=r,
                               sent=lambda: pre + per_row * answered_rows(), detail=answered, **ask)  # fmt: skip
        answered = answered_rows()
        metrics = answers_metrics(
            student_dir, tag, started, round=r, **facts["engine"], rows_in=n, rows_out=answered,
            adapter_id=adapter.id if adapter else "base", adapter_sha256=adapter.sha256 if adapter else "",
        )  # fmt: skip
        storage.write_json_atomic(storage.join(student_dir, "_METRICS.json"), metrics)
        storage.mark_success(student_dir, {"rows": answered})
        return {**info, "student": metrics}

    def students(self, label: str, in_dir: str, out_dir: str, after: int) -> dict[str, Any]:
        """The student S_after answers every request of `in_dir` into `out_dir` (the engine of a
        scoring phase, without an oracle stage behind it)."""
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

    def prefill(self, endpoint: str) -> bool:
        return self.endpoints[endpoint][0].continue_final_message

    def label_params(self, labels: list[str], max_tokens: int = 16) -> dict[str, Any]:
        return P.label_params(labels, max_tokens, self.endpoints["teacher"][0].structured_choice)

    def teacher_params(self) -> dict[str, Any]:
        return {
            "max_tokens": self.cfg.oracle.teacher_max_tokens,
            "temperature": self.cfg.oracle.teacher_temperature,
        }

    # -- stages both recipes run --

    def ingest(self) -> dict:
        from tapir_ray.ingest import ingest

        summary = ingest(self.cfg.pool, self.paths.ingest, quarantine_dir=self.paths.quarantine,
                         block_rows=self.cfg.resources.ingest_batch_size)  # fmt: skip
        self.log(summary.table())
        if summary.kept == 0:
            raise RunError(
                f"the pool is empty after ingest: {summary.read} rows read = {summary.quarantined} quarantined "
                f"+ {summary.duplicates} duplicates + {summary.decontaminated} evaluation prompts "
                f"(reasons in {self.paths.quarantine})"
            )
        return {"rows_in": summary.read, "rows_out": summary.kept, "quarantined": summary.quarantined,
                "duplicates": summary.duplicates, "decontaminated": summary.decontaminated,
                "reconciles": summary.reconciles}  # fmt: skip

    @property
    def reuse_reference(self) -> bool:
        """Whether the pool's own outputs stand in for teacher answers (the teacher fills gaps)."""
        raise NotImplementedError

    @property
    def embedding_model(self) -> str:
        """The sentence encoder of the recipe's embedding stages."""
        raise NotImplementedError

    def teacher(self) -> dict:
        reuse = self.reuse_reference
        pool = ray.data.read_parquet(self.paths.pool)

        def split(batch: pa.Table, want_reference: bool) -> pa.Table:
            has = pc.greater(pc.utf8_length(pc.fill_null(batch["output"], "")), 0)
            mask = has if want_reference else pc.invert(has)
            return batch.filter(mask) if reuse else (batch.slice(0, 0) if want_reference else batch)

        def to_request(batch: pa.Table) -> pa.Table:
            msgs = [json.dumps(P.answer(i, x).messages) for i, x in zip(batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True)]  # fmt: skip
            return pa.table({"id": batch["id"], "messages": msgs})

        storage.remove(self.paths.teacher_in)
        pool.map_batches(split, fn_args=(False,), batch_format="pyarrow").map_batches(
            to_request, batch_format="pyarrow").write_parquet(self.paths.teacher_in)  # fmt: skip
        storage.remove(self.paths.teacher)
        reference = pool.map_batches(split, fn_args=(True,), batch_format="pyarrow").select_columns(
            ["id", "output"]
        )
        n_ref = reference.count()
        if n_ref:
            reference.map_batches(lambda b: pa.table({"id": b["id"], "response": b["output"]}), batch_format="pyarrow")\
                .write_parquet(storage.join(self.paths.teacher, "reference"))  # fmt: skip
        info = self.ask("teacher answers", self.paths.teacher_in, storage.join(self.paths.teacher, "asked"),
                        role="teacher", endpoint="teacher", params=self.teacher_params(), parse=P.parse_answer, round_=0)  # fmt: skip
        return {**info, "reference_outputs": n_ref}

    def embedding_gpus(self) -> float:
        """The GPUs `embed()` may use: the cluster's (0 with `resources.embed_on_gpu: false`)."""
        return ray.cluster_resources().get("GPU", 0) if self.cfg.resources.embed_on_gpu else 0

    def embeddings(self) -> dict:
        """embeddings/: unit-norm sentence embeddings of every pool row (near-duplicate checks,
        the embedding classifier); computed once per run, when first needed."""
        if storage.is_done(self.paths.embeddings):
            return {}
        from tapir_ray.embed import embed, gpu_actors

        def text(batch: pa.Table) -> pa.Table:
            t = [P.user_content(i, x) for i, x in zip(batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True)]  # fmt: skip
            return pa.table({"id": batch["id"], "text": t})

        storage.remove(self.paths.embeddings)
        gpus = self.embedding_gpus()
        ds = embed(ray.data.read_parquet(self.paths.pool).map_batches(text, batch_format="pyarrow"),
                   self.embedding_model, gpus=gpus, drop_text=True)  # id, embedding  # fmt: skip
        frames.write_as_it_goes(ds, self.paths.embeddings)
        storage.mark_success(self.paths.embeddings)
        actors = gpu_actors(gpus)
        where = f"{actors} GPU actor(s)" if actors else "CPU"
        return {"rows": storage.parquet_rows(self.paths.embeddings), "on": where}

    # -- training --

    def train(self, round_: int, student: dict, before: bool = False) -> dict:
        """Round `round_`'s fit; `before`: also the held-out NLL of the model it starts from."""
        from tapir_ray.train import train_round

        ds = ray.data.read_parquet(self.paths.round(round_).train_set)
        full = self.cfg.train.full_finetune
        result = train_round(
            ds, self.cfg.train, self.paths.round(round_).root, model=student["model"],
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
                "rows": storage.parquet_rows(self.paths.round(round_).train_set)}  # fmt: skip

    def fit_heldout(self) -> list[dict[str, Any]] | None:
        """Rows whose NLL each fit computes after training (none unless the recipe says)."""
        return None

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
