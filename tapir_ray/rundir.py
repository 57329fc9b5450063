"""The run directory: every path a run reads or writes, named in one place.

    run = RunDir(run_dir)
    run.items, run.pool, run.embeddings, run.round(2).plan_final, run.round(2).expand(0).accepted

A Parquet folder is a stage's table, complete once the stage is marked done in state.json (or,
for a few, by a `_SUCCESS` file); its columns are declared where its rows are shaped (the schema
named after each path below).

    config.yaml  state.json  lease.json      the config as run; the curriculum's state; the driver's lease
    ingest/pool/  ingest/summary.json        canonical pool rows (ingest.canonical.SCHEMA) and counts
    quarantine/                              rejected input rows with their reasons
    teacher_in/  teacher/                    teacher requests (oracle.stage.REQUESTS) and answers
    labels_in/  labels_oracle/  labels/      task-label requests, the oracle's labels, every row's category
    embeddings/                              (id, embedding) of every pool row
    items/                                   pool + teacher answer + category + held-out flag (ITEMS)
    round-R/                                 one round (RoundDir)
    oracle-cache/  dead-letter/              replies, paid once; rows that finally failed, with reasons
    metrics/  eval/  logs/                   reports and plots; `tapir-ray eval`; the local oracle's log

CITING's types, rubrics and revisions live beside these (`types/`, `rubrics.json`,
`types_by_id/`, `round-R/revise/`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tapir_ray import storage


@dataclass(frozen=True)
class ExpandDir:
    """round-R/expand-A/: one expansion attempt (curriculum.expansion)."""

    root: str

    @property
    def requests(self) -> str:  # teacher requests, one per missing row
        return storage.join(self.root, "requests")

    @property
    def answers(self) -> str:  # the teacher's new instructions
        return storage.join(self.root, "answers")

    @property
    def label_requests(self) -> str:
        return storage.join(self.root, "label_requests")

    @property
    def labels(self) -> str:  # the classifier's re-check of each expansion
        return storage.join(self.root, "labels")

    @property
    def screened(self) -> str:  # SCREENED: every answer with its rejection reason, if any
        return storage.join(self.root, "screened")

    @property
    def checked(self) -> str:  # CHECKED: the rest, embedded
        return storage.join(self.root, "checked")

    @property
    def accepted(self) -> str:  # ACCEPTED
        return storage.join(self.root, "accepted")


@dataclass(frozen=True)
class RoundDir:
    """round-R/: one round's stages, in the order they run."""

    root: str
    number: int

    def __str__(self) -> str:
        return self.root

    def join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def name(self) -> str:  # "round-R": the prefix of this round's stage names
        return f"round-{self.number}"

    @property
    def student_in(self) -> str:  # STUDENT_IN: unused candidates with the judge's context
        return self.join("student_in")

    @property
    def student(self) -> str:  # the student's answers (and its _METRICS.json)
        return self.join("student")

    @property
    def judge_in(self) -> str:
        return self.join("judge_in")

    @property
    def judge(self) -> str:  # the judge's verdicts (id|T, id|S)
        return self.join("judge")

    @property
    def scores(self) -> str:  # SCORES: teacher and student scores, MFD, hard flag
        return self.join("scores")

    @property
    def plan(self) -> str:  # PLAN: the selection; _PLAN.json its targets and shortfall
        return self.join("plan")

    @property
    def plan_info(self) -> str:
        return self.join("plan", "_PLAN.json")

    def expand(self, attempt: int) -> ExpandDir:
        return ExpandDir(self.join(f"expand-{attempt}"))

    def expansions(self, attempts: int) -> list[ExpandDir]:
        """The first `attempts` expansion attempts that left an accepted/ table."""
        return [e for e in map(self.expand, range(attempts)) if storage.exists(e.accepted)]

    @property
    def expanded(self) -> str:  # EXPANDED: the round's accepted expansions, as items
        return self.join("expanded")

    @property
    def plan_final(self) -> str:  # selection + expansions + duplicates, exact totals
        return self.join("plan_final")

    @property
    def refine_in(self) -> str:
        return self.join("refine_in")

    @property
    def refine(self) -> str:  # the teacher's task-aware answers
        return self.join("refine")

    @property
    def revise(self) -> str:  # CITING: the teacher's revisions of the student's answers
        return self.join("revise")

    @property
    def train_set(self) -> str:
        return self.join("train_set")

    @property
    def adapter(self) -> str:  # the LoRA adapter (SHA256 beside it)
        return self.join("adapter")

    @property
    def eval(self) -> str:  # CITING's per-round evaluation: drafts and per-criterion verdicts
        return self.join("eval")

    def eval_draft(self, t: int) -> str:  # draft t of each evaluation answer (draft-t_in: requests)
        return self.join("eval", f"draft-{t}")

    @property
    def eval_judge_in(self) -> str:
        return self.join("eval", "judge_in")

    @property
    def eval_judge(self) -> str:
        return self.join("eval", "judge")


@dataclass(frozen=True)
class RunDir:
    root: str

    def __str__(self) -> str:
        return self.root

    def join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def round(self, number: int) -> RoundDir:
        return RoundDir(self.join(f"round-{number}"), number)

    @property
    def config(self) -> str:
        return self.join("config.yaml")

    @property
    def state(self) -> str:
        return self.join("state.json")

    @property
    def lease(self) -> str:
        return self.join("lease.json")

    @property
    def ingest(self) -> str:
        return self.join("ingest")

    @property
    def pool(self) -> str:
        return self.join("ingest", "pool")

    @property
    def quarantine(self) -> str:
        return self.join("quarantine")

    @property
    def teacher_in(self) -> str:
        return self.join("teacher_in")

    @property
    def teacher(self) -> str:
        return self.join("teacher")

    @property
    def labels_in(self) -> str:
        return self.join("labels_in")

    @property
    def labels_oracle(self) -> str:
        return self.join("labels_oracle")

    @property
    def labels(self) -> str:
        return self.join("labels")

    @property
    def embeddings(self) -> str:
        return self.join("embeddings")

    @property
    def items(self) -> str:
        return self.join("items")

    @property
    def oracle_cache(self) -> str:
        return self.join("oracle-cache")

    @property
    def dead_letter(self) -> str:
        return self.join("dead-letter")

    @property
    def metrics(self) -> str:
        return self.join("metrics")

    @property
    def report(self) -> str:
        return self.join("metrics", "report.md")

    @property
    def ledger(self) -> str:
        return self.join("metrics", "oracle-ledger.json")

    @property
    def eval(self) -> str:
        return self.join("eval")

    @property
    def logs(self) -> str:
        return self.join("logs")

    @property
    def centroids(self) -> str:  # CITING: one mean embedding per question type
        return self.join("centroids")

    @property
    def types_by_id(self) -> str:  # CITING: every question's type
        return self.join("types_by_id")

    @property
    def rubrics(self) -> str:  # CITING: the rubric book (rubrics.json)
        return self.join("rubrics.json")

    @property
    def generated(self) -> str:  # `tapir-ray generate`: one folder per call
        return self.join("generate")

    def types(self, name: str) -> str:  # CITING's question types: induce_in, induced, merged, ...
        return self.join("types", name)

    @property
    def eval_baseline_in(self) -> str:  # CITING: the evaluation questions as requests
        return self.join("eval-baseline", "in")

    @property
    def eval_baseline(self) -> str:  # CITING: the warm-up student's answers to them
        return self.join("eval-baseline", "student")
