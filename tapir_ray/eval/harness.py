"""`tapir-ray eval`: numbers a person can trust for every round of a run.

Suites (each writes `<run>/eval/<suite>/<target>/` and `<run>/eval/summary.json`):

- `alpaca`: pairwise win rate of the student against a reference (the teacher's answers by
  default, another run's or round's answers, or a file), judged in both answer orders, with a 95 %
  bootstrap interval and the length-controlled win rate (tapir_ray/eval/winrate.py);
- `mtbench`: the bundled 80 MT-Bench questions, two turns (the second sees the student's first
  answer), single-answer 1–10 grading per turn, reference-guided for math, reasoning and coding
  where a reference exists; mean overall, per turn and per category;
- `nll`: the held-out NLL of the teacher's answers (no judge), on the split training never saw.

Targets are `base` (no adapter) and every trained round (`round-0` is the warm-up). Judge calls go
through the oracle layer of the run (cache, limits, ledger): re-running an evaluation costs
nothing, and each student's answers are kept, so only new targets generate; with both alpaca and
mtbench asked for, a target answers their first prompts in one student stage. Evaluation prompts
whose normalised text appears in any round's training set are reported and left out.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray

from tapir_ray import storage
from tapir_ray.ingest.canonical import normalize_text
from tapir_ray.oracle import prompts as P
from tapir_ray.progress import Progress
from tapir_ray.rundir import RunDir

SUITES = ("alpaca", "mtbench", "nll")
REFERENCE_GUIDED = {"math", "reasoning", "coding"}


class EvalError(Exception):
    """A problem with the evaluation request, said in one line."""


# Held-out prompts the win-rate suite asks about when not told (`tapir-ray eval --limit`).
HELDOUT_PROMPTS = 1000


def _user(messages_json: str) -> str:
    messages = json.loads(messages_json)
    return next((m["content"] for m in messages if m.get("role") == "user"), "")


def _trained_here(batch: pa.Table, texts: frozenset[str]) -> set[str]:
    return {t for m in batch["messages"].to_pylist() if (t := normalize_text(_user(m))) in texts}


def trained_texts(run_dir: str, texts: set[str]) -> set[str]:
    """Which of `texts` (normalised evaluation prompts: a small set) some round trained on. The
    training sets grow with the pool: each block is checked where it is; only matches come back."""
    from tapir_ray import frames
    from tapir_ray.curriculum import read_state

    folders = [RunDir(run_dir).round(r).train_set
               for r in (read_state(run_dir) or {}).get("rounds", {})]  # fmt: skip
    folders = [f for f in folders if storage.exists(f)]
    if not texts or not folders:
        return set()
    ds = frames.read(folders, ["messages"])
    return set().union(*frames.fold(ds, _trained_here, texts=frozenset(texts)))


def _requests(rows: list[dict], folder: str) -> None:
    schema = pa.schema([("id", pa.string()), ("messages", pa.string())])
    storage.write_table(pa.Table.from_pylist(rows, schema=schema), folder)


def _answers(folder: str) -> dict[str, str]:
    t = storage.read_table(folder, ["id", "response"])
    return dict(zip(t["id"].to_pylist(), t["response"].to_pylist(), strict=True))


def _parsed(folder: str) -> dict[str, Any]:
    t = storage.read_table(folder, ["id", "parsed"])
    return {
        i: json.loads(p) for i, p in zip(t["id"].to_pylist(), t["parsed"].to_pylist(), strict=True)
    }


def load_reference_file(path: str) -> list[dict[str, str]]:
    """JSON or JSONL rows with instruction, optional input, and output (the reference answer)."""
    try:
        rows = storage.read_json_rows(path, ("instruction", "output"))
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    out = [
        {"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}
        for r in rows
    ]
    return out


class Evaluation:
    def __init__(self, runner, *, limit: int | None, log: Callable[[str], None]):
        self.runner, self.log, self.limit = runner, log, limit
        self.run_dir = runner.run_dir
        self.cfg = runner.cfg
        self._setup: dict[Any, tuple] = {}  # each suite's prompts, prepared once

    def path(self, *parts: str) -> str:
        return storage.join(self.run_dir, "eval", *parts)

    # -- targets and students --

    def targets(self, which: str) -> list[tuple[str, int]]:
        rounds = ray.get(self.runner.actor.get.remote())["rounds"]
        trained = sorted(int(r) for r, info in rounds.items() if info.get("adapter"))
        every = [("base", -1)] + [(f"round-{r}", r) for r in trained]
        if which == "all":
            return every
        name = which if which == "base" else f"round-{which}"
        match = [t for t in every if t[0] == name]
        if not match:
            have = ", ".join(t[0] for t in every)
            raise EvalError(f"--round {which}: the run has no such trained round (it has {have})")
        return match

    def answer(
        self, target: tuple[str, int], in_dir: str, out_dir: str, label: str
    ) -> dict[str, str]:
        """The target student's answers to `in_dir` (kept: a second evaluation reuses them)."""
        from tapir_ray.student import Adapter, run_student

        if not storage.is_done(out_dir):
            student = self.runner.student_after(target[1])
            adapter = (
                Adapter.load(target[0], student["adapter"], student["adapter_sha256"])
                if student["adapter"]
                else None
            )
            cfg = self.cfg.student.model_copy(update={"model": student["model"]})
            n, counter, started = storage.parquet_rows(in_dir), {"n": 0}, time.perf_counter()
            with Progress(label, n, lambda: counter["n"], log=self.log):
                run_student(ray.data.read_parquet(in_dir), cfg, out_dir, run_dir=self.run_dir,
                            round_=max(target[1], 0), adapter=adapter, use_gpu=self.runner.use_gpu,
                            on_rows=lambda k: counter.__setitem__("n", k))  # fmt: skip
            storage.mark_success(out_dir)
            self.log(f"{label}: {counter['n']}/{n} rows in {time.perf_counter() - started:.0f} s")
        return _answers(out_dir)

    def judge(self, label: str, rows: list[dict], folder: str, *, mode: str, round_: int) -> dict[str, Any]:  # fmt: skip
        """Judge `rows` through the run's oracle layer; re-asking is answered from its cache.
        mode "single": a 1–10 grade (the run's judge settings); "preference": which of two
        answers is better, read from the A/B token probabilities when the judge's turn is
        prefilled and logprob scoring is on (AlpacaEval's way, and the only one a small judge
        manages), else from its written verdict."""

        prefill = self.runner.prefill("judge")
        j = self.runner.tapir.judge
        if mode == "single":
            params = P.verdict_params(j, prefill)
            parse: Callable = P.JudgeParser("single", j.logprob_scoring, prefill, j.min_valid_mass)
            prefix = P.VERDICT_PREFILL
        else:
            params, parse = P.preference_request(j, prefill)
            prefix = P.PREFER_PREFILL
        for r in rows:
            prompt = r.pop("prompt")
            r["messages"] = json.dumps(P.prefilled(prompt, prefix) if prefill else prompt.messages)
        _requests(rows, storage.join(folder, "judge_in"))
        info = self.runner.ask(label, storage.join(folder, "judge_in"), storage.join(folder, "judge"),
                               role="eval-judge", endpoint="judge", params=params, parse=parse, round_=round_)  # fmt: skip
        self.log(
            f"{label}: {info['rows_out']}/{info['rows_in']} verdicts ({info['rows_in'] - info['rows_out']} dead-lettered)"
        )
        return {"verdicts": _parsed(storage.join(folder, "judge")), "oracle": info}

    def guard(
        self, rows: list[dict], text_of: Callable[[dict], str]
    ) -> tuple[list[dict], list[str]]:
        norm = [normalize_text(text_of(r)) for r in rows]
        seen = trained_texts(self.run_dir, set(norm))
        kept, dropped = [], []
        for r, text in zip(rows, norm, strict=True):
            (dropped if text in seen else kept).append(r)
        return kept, [r["id"] for r in dropped]

    # -- suites --

    def _alpaca_setup(self, reference: str | None) -> tuple[list[dict], list, str, dict]:
        """The win rate's prompts (written to alpaca/prompts/), once per evaluation."""
        key = ("alpaca", reference)
        if key not in self._setup:
            prompts, ref_name = self._alpaca_prompts(reference)
            prompts, excluded = self.guard(
                prompts, lambda r: P.user_content(r["instruction"], r["input"])
            )
            if not prompts:
                raise EvalError("alpaca: no evaluation prompts left after the contamination guard")
            ref_answers = self._reference_answers(prompts, reference)
            prompts = [p for p in prompts if p["id"] in ref_answers]
            _requests(
                [{"id": p["id"], "messages": json.dumps([{"role": "user", "content": P.user_content(p["instruction"], p["input"])}])} for p in prompts],
                self.path("alpaca", "prompts"),
            )  # fmt: skip
            self._setup[key] = (prompts, excluded, ref_name, ref_answers)
        return self._setup[key]

    def first_turns(self, targets: list[tuple[str, int]], reference: str | None) -> None:
        """With both alpaca and mtbench asked for: each target answers the win rate's prompts and
        MT-Bench's first turns in one student stage (one engine start, not two)."""
        self._alpaca_setup(reference)
        self._mtbench_setup()
        for target in targets:
            pairs = [
                (self.path("alpaca", "prompts"), self.path("alpaca", target[0], "student")),
                (self.path("mtbench", "turn1_in"), self.path("mtbench", target[0], "turn1")),
            ]
            self.answer_together(
                target, pairs, f"eval · {target[0]} answers (alpaca, mtbench turn 1)"
            )

    def answer_together(
        self, target: tuple[str, int], pairs: list[tuple[str, str]], label: str
    ) -> None:
        """One student stage over several prompt sets of a target; each set's answers land in its
        own folder, as `answer` writes them. Evaluation sets are small and bounded (AlpacaEval's
        805 prompts, MT-Bench's 80), so they are combined in memory."""
        import pyarrow.compute as pc

        todo = [(k, i, o) for k, (i, o) in enumerate(pairs) if not storage.is_done(o)]
        if len(todo) < 2:
            return  # nothing to share: `answer` runs what is left on its own
        folder = self.path("first-turns", target[0])
        parts = []
        for k, in_dir, _ in todo:
            t = storage.read_table(in_dir, ["id", "messages"])
            parts.append(t.set_column(0, "id", pc.binary_join_element_wise(f"{k}", t["id"], "|")))
        storage.write_table(pa.concat_tables(parts), storage.join(folder, "in"))
        self.answer(target, storage.join(folder, "in"), storage.join(folder, "out"), label)
        table = storage.read_table(storage.join(folder, "out"))
        for k, _, out_dir in todo:
            prefix = f"{k}|"
            part = table.filter(pc.starts_with(table["id"], prefix))
            ids = pc.utf8_slice_codeunits(part["id"], len(prefix))
            storage.write_table(
                part.set_column(part.schema.get_field_index("id"), "id", ids), out_dir
            )
            storage.mark_success(out_dir)

    def alpaca(self, targets: list[tuple[str, int]], reference: str | None) -> dict[str, Any]:
        prompts, excluded, ref_name, ref_answers = self._alpaca_setup(reference)
        from tapir_ray.eval.judge_health import judge_health, order_consistency
        from tapir_ray.eval.winrate import win_rate

        results = {}
        for target in targets:
            folder = self.path("alpaca", target[0])
            student = self.answer(target, self.path("alpaca", "prompts"), storage.join(folder, "student"),
                                  f"eval alpaca · {target[0]} answers")  # fmt: skip
            rows = []
            for p in prompts:
                if p["id"] not in student:
                    continue
                text = P.user_content(p["instruction"], p["input"])
                s, r = student[p["id"]], ref_answers[p["id"]]
                rows.append({"id": f"{p['id']}|SR", "prompt": P.judge_preference(text, s, r)})
                rows.append({"id": f"{p['id']}|RS", "prompt": P.judge_preference(text, r, s)})
            judged = self.judge(
                f"eval alpaca · {target[0]} judge",
                rows,
                folder,
                mode="preference",
                round_=target[1],
            )
            v = judged["verdicts"]
            ids = [p["id"] for p in prompts if f"{p['id']}|SR" in v and f"{p['id']}|RS" in v]
            wr = win_rate(
                [(tuple(v[f"{i}|SR"]), tuple(v[f"{i}|RS"])) for i in ids],
                [len(student[i]) for i in ids], [len(ref_answers[i]) for i in ids], seed=self.cfg.run.seed,
            )  # fmt: skip
            health = judge_health(
                asked=2 * len(prompts), answered=sum(f"{p['id']}|{o}" in v for p in prompts for o in ("SR", "RS")),
                consistency=order_consistency((v[f"{i}|SR"], v[f"{i}|RS"]) for i in ids),
            )  # fmt: skip
            for warning in health["warnings"]:
                self.log(
                    f"warning: eval alpaca · {target[0]}: the judge looks degenerate: {warning}"
                )
            results[target[0]] = {**wr.as_dict(), "reference": ref_name, "unjudged": len(prompts) - len(ids),
                                  "judge": health, "oracle": judged["oracle"]}  # fmt: skip
            storage.write_json_atomic(storage.join(folder, "result.json"), results[target[0]])
        return {
            "targets": results,
            "prompts": len(prompts),
            "excluded_contaminated": excluded,
            "reference": ref_name,
        }

    def _alpaca_prompts(self, reference: str | None) -> tuple[list[dict], str]:
        if reference and reference not in ("teacher",) and ":" not in reference.split("/")[-1]:
            rows = load_reference_file(reference)
            from tapir_ray.ingest.canonical import row_id

            out = [{"id": row_id(r["instruction"], r["input"]), **r} for r in rows]
            return out[: self.limit] if self.limit else out, f"file {reference}"
        from tapir_ray.recipe import heldout_items

        # The held-out split grows with the pool (2 % of a million rows is 20,000 prompts, each
        # judged in both orders); without --limit the suite takes a seeded sample of it.
        limit = self.limit or HELDOUT_PROMPTS
        rows = heldout_items(self.run_dir, self.cfg.run.seed, -2, limit)
        if not self.limit and len(rows) == limit:
            self.log(f"eval alpaca: the first {limit:,} held-out rows in seeded order "
                     "(--limit N for another number)")  # fmt: skip
        name = "teacher" if not reference or reference == "teacher" else reference
        return [
            {
                "id": r["id"],
                "instruction": r["instruction"],
                "input": r["input"],
                "output": r["teacher"],
            }
            for r in rows
        ], name

    def _reference_answers(self, prompts: list[dict], reference: str | None) -> dict[str, str]:
        if not reference or reference == "teacher" or ":" not in reference.split("/")[-1]:
            return {p["id"]: p["output"] for p in prompts}
        other_run, _, other_round = reference.rpartition(":")
        name = other_round if other_round == "base" else f"round-{other_round}"
        folder = storage.join(storage.absolute(other_run), "eval", "alpaca", name, "student")
        if not storage.is_done(folder):
            raise EvalError(
                f"--reference {reference}: {folder} has no answers; run `tapir-ray eval {other_run} --round {other_round} --suite alpaca` first"
            )
        return _answers(folder)

    def _mtbench_setup(self) -> tuple[list[dict], list]:
        """MT-Bench's questions (first turns written to mtbench/turn1_in/), once per evaluation."""
        from tapir_ray.assets import resolve_data

        if "mtbench" not in self._setup:
            path = resolve_data("bundled:mt-bench")
            questions = [
                json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()
            ]
            for q in questions:
                q["id"] = str(q["question_id"])
            if self.limit:  # every category represented: questions round-robin by category
                by_cat = defaultdict(list)
                for q in questions:
                    by_cat[q["category"]].append(q)
                order = [q for group in zip(*by_cat.values(), strict=False) for q in group]
                questions = order[: self.limit]
            questions, excluded = self.guard(questions, lambda q: q["turns"][0])
            _requests([{"id": q["id"], "messages": json.dumps([{"role": "user", "content": q["turns"][0]}])}
                       for q in questions], self.path("mtbench", "turn1_in"))  # fmt: skip
            self._setup["mtbench"] = (questions, excluded)
        return self._setup["mtbench"]

    def mtbench(self, targets: list[tuple[str, int]]) -> dict[str, Any]:
        questions, excluded = self._mtbench_setup()
        results = {}
        for target in targets:
            folder = self.path("mtbench", target[0])
            first = self.answer(target, self.path("mtbench", "turn1_in"), storage.join(folder, "turn1"),
                                f"eval mtbench · {target[0]} turn 1")  # fmt: skip
            asked = [q for q in questions if q["id"] in first]
            # The second turn sees the conversation so far: question 1, the student's own answer 1.
            _requests([{"id": q["id"], "messages": json.dumps([
                {"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": first[q["id"]]},
                {"role": "user", "content": q["turns"][1]}])} for q in asked], storage.join(folder, "turn2_in"))  # fmt: skip
            second = self.answer(target, storage.join(folder, "turn2_in"), storage.join(folder, "turn2"),
                                 f"eval mtbench · {target[0]} turn 2")  # fmt: skip
            rows = []
            for q in asked:
                ref = q.get("reference") if q["category"] in REFERENCE_GUIDED else None
                rows.append(
                    {
                        "id": f"{q['id']}|1",
                        "prompt": P.judge_single(
                            q["turns"][0], first[q["id"]], ref[0] if ref else None
                        ),
                    }
                )
                if q["id"] in second:
                    rows.append({"id": f"{q['id']}|2", "prompt": P.judge_second_turn(
                        q["turns"][0], first[q["id"]], q["turns"][1], second[q["id"]], ref[1] if ref else None)})  # fmt: skip
            judged = self.judge(
                f"eval mtbench · {target[0]} judge", rows, folder, mode="single", round_=target[1]
            )
            results[target[0]] = mtbench_scores(questions, judged["verdicts"]) | {
                "oracle": judged["oracle"]
            }
            storage.write_json_atomic(storage.join(folder, "result.json"), results[target[0]])
        return {"targets": results, "questions": len(questions), "excluded_contaminated": excluded}

    def nll(self, targets: list[tuple[str, int]]) -> dict[str, Any]:
        results = {}
        for target in targets:
            s = self.runner.student_after(target[1])
            started = time.perf_counter()
            out = self.runner.nll(target[1], s["adapter"], s["model"])
            results[target[0]] = {**out, "seconds": round(time.perf_counter() - started, 1)}
            self.log(f"eval nll · {target[0]}: {out.get('nll')}")
        return {"targets": results}


def mtbench_scores(questions: list[dict], verdicts: dict[str, Any]) -> dict[str, Any]:
    """Mean 1–10 grade overall, per turn and per category (over the turns that were graded)."""
    per_turn: dict[str, list[float]] = {"1": [], "2": []}
    per_cat: dict[str, list[float]] = defaultdict(list)
    for q in questions:
        for turn in ("1", "2"):
            score = verdicts.get(f"{q['id']}|{turn}")
            if score is not None:
                per_turn[turn].append(float(score))
                per_cat[q["category"]].append(float(score))
    every = per_turn["1"] + per_turn["2"]

    def mean(xs):
        return round(sum(xs) / len(xs), 3) if xs else None

    return {
        "score": mean(every),
        "turn_1": mean(per_turn["1"]),
        "turn_2": mean(per_turn["2"]),
        "graded": len(every),
        "asked": 2 * len(questions),
        "categories": {c: mean(v) for c, v in sorted(per_cat.items())},
    }


def evaluate(run_dir: str, *, rounds: str = "all", suites: list[str] | None = None,
             reference: str | None = None, limit: int | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Evaluate a run's students; returns (and writes to <run>/eval/summary.json) the results."""
    import yaml

    from tapir_ray.config import parse_config
    from tapir_ray.curriculum import read_state
    from tapir_ray.launch import oracle_endpoints, runner_class
    from tapir_ray.runtime import ensure_ray

    run_dir = storage.absolute(run_dir)
    if read_state(run_dir) is None:
        raise EvalError(f"{run_dir}: no run here (no state.json)")
    suites = suites or list(SUITES)
    cfg = parse_config(
        yaml.safe_load(storage.read_text(RunDir(run_dir).config)),
        source=RunDir(run_dir).config,
    )
    ensure_ray(cfg.resources)
    summary_path = storage.join(run_dir, "eval", "summary.json")
    summary = storage.read_json(summary_path) if storage.exists(summary_path) else {}
    needs_judge = any(s in ("alpaca", "mtbench") for s in suites)
    with (
        oracle_endpoints(cfg, run_dir, log) if needs_judge else _no_endpoints() as endpoints,
        runner_class(cfg)(cfg, run_dir, endpoints, log, attach=True) as runner,
    ):
        ev = Evaluation(runner, limit=limit, log=log)
        targets = ev.targets(rounds)
        if "alpaca" in suites and "mtbench" in suites:
            ev.first_turns(targets, reference)
        for suite in suites:
            started = time.perf_counter()
            if suite == "alpaca":
                out = ev.alpaca(targets, reference)
            elif suite == "mtbench":
                out = ev.mtbench(targets)
            else:
                out = ev.nll(targets)
            out["seconds"] = round(time.perf_counter() - started, 1)
            previous = summary.get(suite, {}).get("targets", {})
            out["targets"] = {**previous, **out["targets"]}
            summary[suite] = out
            storage.write_json_atomic(summary_path, summary)
            log(f"eval {suite}: done in {out['seconds']:.0f} s")
        ray.get(runner.actor.set_ledger.remote(ray.get(runner.ledger.flush.remote())))
    from tapir_ray.eval.report import write_eval_report

    log(write_eval_report(run_dir))
    return summary


class _no_endpoints:
    def __enter__(self) -> dict:
        return {}

    def __exit__(self, *exc) -> None:
        return None
