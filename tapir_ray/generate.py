"""CITING's self-revising inference, `tapir-ray generate`: the student S_k answers each question,
then revises its answer T_inf times with the rubric retrieved for the question (the T_inf the run
chose on val for that round, unless told otherwise). It reads a finished CITING run and runs the
student stages through the run's context (recipe.py); nothing here is specific to one round."""

from __future__ import annotations

import json

import numpy as np

from tapir_ray import storage
from tapir_ray.citing_run import CitingRun
from tapir_ray.curriculum.citing import retrieve, revision_messages
from tapir_ray.curriculum.citing_stages import load_book, responses
from tapir_ray.oracle import prompts as P
from tapir_ray.oracle.stage import write_requests
from tapir_ray.rundir import RunDir


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
    cfg = parse_config(yaml.safe_load(storage.read_text(RunDir(run_dir).config)))
    if self_revise is None:
        chosen = (state["rounds"][str(round_)].get("eval") or {}).get("t_inf")
        self_revise = chosen if chosen is not None else cfg.curriculum.citing.inference_revisions
        how = "chosen on val for this round" if chosen is not None else "citing.inference_revisions"
        log(f"self-revisions: {self_revise} ({how})")
    ensure_ray(cfg.resources)
    book = load_book(run_dir)
    cents = storage.read_table(RunDir(run_dir).centroids).to_pylist()
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
            got = responses(folder)
            drafts.append({i: got.get(i, drafts[-1][i] if drafts else "") for i in ids})
    out_path = out_path or storage.join(work, "answers.jsonl")
    lines = [json.dumps({"instruction": q["instruction"], "input": q["input"], "type": c, "rubric": rubric[c],
                         "drafts": [d[i] for d in drafts], "answer": drafts[-1][i]}, ensure_ascii=False)
             for q, c, i in zip(questions, types, ids, strict=True)]  # fmt: skip
    storage.write_text_atomic(out_path, "\n".join(lines) + "\n")
    return out_path
