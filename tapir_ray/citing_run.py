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

Each stage is a `Recipe.step` (recipe.py: skipped when done; an oracle stage resumes from the
cache). The stages' bodies over blocks are in curriculum/citing_stages.py, CITING's rules in
curriculum/citing.py, its self-revising inference (`tapir-ray generate`) in generate.py.
"""

from __future__ import annotations

from typing import Any

import ray

from tapir_ray.curriculum.citing_stages import (
    TypeParser,
    TypesParser,
    criterion_results,
    eval_ids,
    merged_types,
    questions_of,
    revise_requests,
    write_assign_requests,
    write_citing_items,
    write_criterion_judge_requests,
    write_merge_request,
    write_plain_requests,
    write_retrieval,
    write_revision_train_set,
    write_round_student_inputs,
    write_rubric_book,
    write_rubric_requests,
    write_self_revision_requests,
    write_type_requests,
    write_types_by_description,
    write_warmup_set,
)
from tapir_ray.oracle import prompts as P
from tapir_ray.recipe import Recipe, task


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
        self.step("types/induce", 0, lambda: self.ask("question types", self.paths.types("induce_in"), self.paths.types("induced"),
                  role="types", endpoint="teacher", params=fixed, parse=TypesParser(c.max_types), round_=0, max_dead_share=1.0))  # fmt: skip
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
        self.step("types/merge", 0, lambda: self.ask("merge types", self.paths.types("merge_in"), self.paths.types("merged"),
                  role="types", endpoint="teacher", params=fixed, parse=TypesParser(c.max_types), round_=0, max_dead_share=1.0))  # fmt: skip
        self.step(
            "types/assign_in",
            0,
            lambda: {"rows": write_assign_requests(self.run_dir, ids, prefill)},
        )
        names = [t["name"] for t in task(merged_types, self.run_dir)]
        self.step("types/assign", 0, lambda: self.ask("type per question", self.paths.types("assign_in"), self.paths.types("assigned"),
                  role="classify", endpoint="teacher", params=self.label_params(names, 24), parse=TypeParser(names), round_=0, max_dead_share=1.0))  # fmt: skip
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
        self.step("types/rubric", 0, lambda: self.ask("rubrics", self.paths.types("rubric_in"), self.paths.types("rubrics"),
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
            f"{rd} · student answers → teacher revisions", k, self.student_after(k - 1), n,
            to_requests=revise_requests, fn_args=(), per_row=1, out="revise", role="revise", endpoint="teacher",
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
                "rows": write_plain_requests(self.run_dir, every, self.paths.eval_baseline_in)
            },
        )
        self.step(
            "eval-baseline/student",
            0,
            lambda: self.students(
                "warm-up student answers",
                self.paths.eval_baseline_in,
                self.paths.eval_baseline,
                0,
            ),
        )
        for t in range(c.eval_drafts + 1):
            folder = self.paths.round(k).eval_draft(t)
            if t == 0:
                self.step(
                    f"{rd}/eval/draft-0_in",
                    k,
                    lambda f=folder: {"rows": write_plain_requests(self.run_dir, every, f + "_in")},
                )
            else:
                prev = self.paths.round(k).eval_draft(t - 1)
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
        self.step(f"{rd}/eval/judge", k, lambda: self.ask(f"{rd} · judge per criterion", self.paths.round(k).eval_judge_in, self.paths.round(k).eval_judge,
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
