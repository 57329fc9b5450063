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
requests, scores, the plan, the training set) is Ray Data over blocks (curriculum/tapir_stages.py,
over tapir_ray/frames.py); the driver sees per-block summaries (counts, sums, histograms), never
the rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray

from tapir_ray import storage
from tapir_ray.config import Config
from tapir_ray.curriculum.classifier import LabelParser, embedding_classifier, labels_from_parsed
from tapir_ray.curriculum.expansion import (
    accept_expansions,
    write_expansion_labels_in,
    write_expansion_requests,
)
from tapir_ray.curriculum.plan import in_fraction, round_sizes
from tapir_ray.curriculum.scoring import judge_requests, write_scores
from tapir_ray.curriculum.tapir_stages import (
    build_items,
    write_final_plan,
    write_plan,
    write_refine_inputs,
    write_student_inputs,
    write_train_set,
    write_warmup_plan,
)
from tapir_ray.oracle import prompts as P
from tapir_ray.recipe import Recipe, heldout_rows, task

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
        pool = ray.data.read_parquet(self.paths.pool)
        seed, heldout = self.seed, self.tapir.heldout_fraction
        n_pool = storage.parquet_rows(self.paths.pool)
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

        storage.remove(self.paths.labels_in)
        pool.map_batches(to_request, batch_format="pyarrow").write_parquet(self.paths.labels_in)
        out_dir = self.paths.labels_oracle
        info = self.ask("task labels", self.paths.labels_in, out_dir, role="classify", endpoint="teacher",
                        params=self.label_params(labels), parse=LabelParser(labels), round_=0)  # fmt: skip
        if settings.method == "oracle":
            labels_from_parsed(out_dir, self.paths.labels)
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
        if tapir.warmup:
            self.step(
                "round-0/plan",
                0,
                lambda: {"rows": write_warmup_plan(self.run_dir, tapir.warmup_rows, self.seed)},
            )
            self.step(
                "round-0/train_set",
                0,
                lambda: write_train_set(self.run_dir, 0, self.paths.items, "teacher", {}),
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
        """The base student's held-out NLL: the first fit (the warm-up's, else round 1's, which
        starts from the base model too) computes it before its first step; a task loads the base
        model only when that fit did not (a run from an older version resumed)."""
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
        tapir, here = self.tapir, self.paths.round(r)
        rd = here.name
        student = self.student_after(r - 1)
        ray.get(
            self.actor.update_round.remote(
                r, {"alpha": alpha, "size": size, "student_adapter": student["adapter"]}
            )
        )
        scores_dir: str | None = here.scores
        if tapir.selection == "random" and not tapir.judge_random:  # the control arm: no judge
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
            scores_dir = self.paths.round(1).scores
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
            f"{rd} · refine", here.refine_in, here.refine, role="refine", endpoint="teacher",
            params=self.teacher_params(), parse=P.parse_answer, round_=r))  # fmt: skip
        train_set = self.step(
            f"{rd}/train_set",
            r,
            lambda: write_train_set(self.run_dir, r, here.refine, "response", tapir.styles),
        )
        first = r == 1 and not tapir.warmup  # the base model's fit: its NLL before training too
        trained = self.step(f"{rd}/train", r, lambda: self.train(r, student, before=first))
        ray.get(
            self.actor.update_round.remote(
                r, {"adapter": trained["adapter"], "adapter_sha256": trained["adapter_sha256"]}
            )
        )
        if first:
            self.base_nll(self.student_after(-1), trained.get("heldout_before"))
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
            f"{rd} · student answers → judge verdicts", r, student, n,
            to_requests=judge_requests, fn_args=(judge.mode, prefill, ("S",) if single else ()),
            per_row=1 if single else 2, out="judge",
            early=(judge_requests, (judge.mode, prefill, ("T",))) if single else None,
            role="judge", endpoint="judge", params=P.verdict_params(judge, prefill),
            parse=P.JudgeParser(judge.mode, judge.logprob_scoring, prefill, judge.min_valid_mass, report_mass=True),
        )  # fmt: skip

    def _plan(self, r: int, scores_dir: str | None, size: int, alpha: float) -> dict:
        info = write_plan(self.run_dir, r, scores_dir, size, alpha, self.tapir.taxonomy,
                     self.seed, self.tapir.random_quotas, self.tapir.selection == "random")  # fmt: skip
        storage.write_json_atomic(self.paths.round(r).plan_info, info)
        return info

    def expand(self, r: int, attempt: int, missing: dict[str, int]) -> dict:
        rd, folder = f"round-{r}", self.paths.round(r).expand(attempt)
        self.embeddings()
        write_expansion_requests(self.run_dir, r, attempt, missing)
        asked = self.ask(f"{rd} · expansion {attempt + 1}", folder.requests, folder.answers,
                         role="expand", endpoint="teacher", params={"max_tokens": self.tapir.expansion_max_tokens, "temperature": 0.0},
                         parse=P.parse_instruction, round_=r, max_dead_share=1.0)  # fmt: skip
        prefill = self.prefill("teacher")
        write_expansion_labels_in(self.run_dir, r, attempt, self.labels, prefill)
        self.ask(f"{rd} · expansion labels", folder.label_requests, folder.labels,
                 role="classify", endpoint="teacher", params=self.label_params(self.labels),
                 parse=LabelParser(self.labels), round_=r, max_dead_share=1.0)  # fmt: skip
        got = task(accept_expansions, self.run_dir, r, attempt, self.tapir.near_duplicate_threshold,
                   self.tapir.classifier.embedding_model, list(self.cfg.pool.decontaminate_against),
                   self.embedding_gpus())  # fmt: skip
        return {**got, "oracle": asked}
