"""CITING's rules on their own: the seeded split, the rubric file, retrieval by type centroid
(checked against the mean-inner-product rule by hand), and the revision training format."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError

from tapir_ray.curriculum.citing import (
    QuestionType,
    RubricBook,
    edit_distance,
    ensure_required,
    retrieve,
    revision_messages,
    split_of,
    type_centroids,
)
from tapir_ray.oracle.cache import ResponseCache


def test_the_split_is_stable_across_runs_pool_order_and_size():
    ids = [f"id-{k}" for k in range(20_000)]
    first = {i: split_of(7, i) for i in ids}
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert {i: split_of(7, i) for i in shuffled[:5000]} == {i: first[i] for i in shuffled[:5000]}
    shares = Counter(first.values())
    assert abs(shares["train"] / len(ids) - 0.8) < 0.01
    assert (
        abs(shares["val"] / len(ids) - 0.1) < 0.01 and abs(shares["test"] / len(ids) - 0.1) < 0.01
    )
    other = [split_of(8, i) for i in ids[:1000]]
    assert other != [first[i] for i in ids[:1000]]  # the seed matters
    assert {split_of(7, i, [0.5, 0.25, 0.25]) for i in ids[:200]} == {"train", "val", "test"}


def test_rubric_json_round_trips_and_keeps_the_required_criteria():
    criteria = ensure_required(
        [
            "States the final result clearly.",
            "Is comprehensive: covers every part of the question.",
        ],
        ["articulate", "in-depth", "comprehensive"],
        criteria_max=3,
    )
    # Two required qualities were missing; the teacher's last criterion made room for them.
    assert criteria == [
        "States the final result clearly.",
        "Articulate: the answer is articulate.",
        "In-depth: the answer is in-depth.",
    ]
    book = RubricBook(types=[
        QuestionType(name="Math word problem", definition="Arithmetic in a story.", criteria=criteria, members=12),
        QuestionType(name="Creative writing", definition="Poems, stories.", criteria=["Articulate.", "In-depth.", "Comprehensive."]),
    ])  # fmt: skip
    text = book.to_json()
    assert '"name": "Math word problem"' in text and text.count("\n") > 10  # readable
    again = RubricBook.from_json(text)
    assert again == book and again.get("Math word problem").members == 12
    assert (
        again.get("Math word problem").rubric().splitlines()[1]
        == "2. Articulate: the answer is articulate."
    )
    assert book.check(3, 7) == []
    assert RubricBook(types=[QuestionType(name="x", criteria=["one"])]).check(3, 7) == [
        "type 'x': 1 criteria, expected 3..7"
    ]
    with pytest.raises(ValidationError, match="unique"):
        RubricBook(types=[QuestionType(name="A"), QuestionType(name="a")])


def test_retrieval_by_centroid_equals_the_mean_inner_product_rule_by_hand():
    def unit(*v):
        v = np.array(v, dtype=np.float32)
        return v / np.linalg.norm(v)

    members = {
        "math": [unit(1, 0, 0), unit(1, 1, 0)],
        "writing": [unit(0, 0, 1), unit(0, 1, 1), unit(0, 1, 0)],
    }
    emb = np.stack([v for vs in members.values() for v in vs])
    types = [t for t, vs in members.items() for _ in vs]
    cents = type_centroids(emb, types)
    queries = np.stack([unit(1, 0.2, 0), unit(0.1, 1, 0.9), unit(0.3, 1, 0)])
    by_hand = []
    for q in queries:
        mean_ip = {t: float(np.mean([q @ m for m in vs])) for t, vs in members.items()}
        by_hand.append(max(mean_ip, key=mean_ip.get))
        for t in members:  # <e(q), μ_c> is the mean inner product with c's members
            assert float(q @ cents[t]) == pytest.approx(mean_ip[t], abs=1e-6)
    assert retrieve(queries, cents) == by_hand == ["math", "writing", "math"]
    # (0.3, 1, 0) normalised is (0.287, 0.958, 0): math's members give (0.287 + 0.880) / 2 = 0.584,
    # writing's (0 + 0.677 + 0.958) / 3 = 0.545. Its single best match is writing's (0, 1, 0) at
    # 0.958, so a nearest-neighbour rule would say writing; the members' mean says math.


def test_the_revision_training_example_masks_the_prompt_and_learns_the_revision(smollm2):
    from transformers import AutoTokenizer

    from tapir_ray.chat import IGNORE_INDEX, prompt_ids, sft_example

    tok = AutoTokenizer.from_pretrained(smollm2)
    rubric = QuestionType(name="Math", criteria=["Shows each step.", "States the answer."]).rubric()
    messages = revision_messages("What is 12 * 3?", rubric, "It is 35.")
    content = messages[0]["content"]
    assert "1. Shows each step." in content and "[Previous answer]\nIt is 35." in content
    revised = "12 * 3 = 36.\nThe answer is 36."
    ex = sft_example(tok, messages, revised, max_length=512)
    n_prompt = len(prompt_ids(tok, messages))
    assert ex["input_ids"][:n_prompt] == prompt_ids(tok, messages)  # what inference renders
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    learned = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert (
        tok.decode(learned).startswith(revised)
        and len(learned) < len(ex["input_ids"]) - n_prompt + 3
    )
    assert edit_distance("It is 35.", revised) > edit_distance("It is 35.", "It is 36.") > 0
    assert edit_distance("same words", "same words") == 0.0


def test_teacher_replies_for_types_rubrics_and_revisions_parse():
    """The teacher's CITING prompts, answered by the scripted server's rules (the replies a real
    teacher gives have the same shape), and what the parsers make of messier replies."""
    from tapir_ray.oracle import prompts as P
    from tapir_ray.oracle.server import scripted_reply

    batch = ["Solve the equation x + 2 = 5.", "Write a poem about rain.", "Calculate 15 percent of 80.",
             "Write a python function that reverses a list."]  # fmt: skip
    types = P.parse_types(scripted_reply(P.induce_types(batch, 20).messages), max_types=20)
    assert [t["name"] for t in types] == [
        "Math questions",
        "Writing questions",
        "Code Generation questions",
    ]
    more = types + [{"name": "Math problems", "definition": "Word problems."}]
    merged = P.parse_types(scripted_reply(P.merge_types(more, 20).messages))
    math_type = next(t for t in merged if t["name"] == "Math questions")
    assert math_type["merged_from"] == ["Math questions", "Math problems"] and len(merged) == 3
    criteria = P.parse_criteria(scripted_reply(P.write_rubric("Math questions", "Arithmetic.", batch[:1], 3, 7,
                                                               ["articulate", "in-depth", "comprehensive"]).messages))  # fmt: skip
    assert len(criteria) == 4 and criteria[0].startswith("Articulate")
    rubric = QuestionType(name="Math questions", criteria=criteria).rubric()
    first = P.parse_answer(scripted_reply(P.revise(batch[0], rubric, "x is 3.").messages))
    assert first.startswith("x is 3.") and first != "x is 3."
    # A revision that already meets the rubric comes back unchanged: edit distance 0.
    assert P.parse_answer(scripted_reply(P.revise(batch[0], rubric, first).messages)) == first
    # Messier replies.
    assert P.parse_types(
        'Sure! ```json\n[{"name": " Math  Qs ", "definition": "d"}, {"name": "math qs"}, {"x": 1}]\n```'
    ) == [{"name": "Math Qs", "definition": "d", "merged_from": []}]
    assert P.parse_criteria("Criteria:\n1) Clear.\n- Deep.\n3. Complete.\n4. clear.\nThanks") == [
        "Clear.",
        "Deep.",
        "Complete.",
    ]
    for bad in ("no list here", "[1, 2]", '[{"name": ""}]'):
        with pytest.raises(P.ParseError):
            P.parse_types(bad)
    with pytest.raises(P.ParseError):
        P.parse_criteria("Be clear, deep and complete.")


def test_the_rubric_book_keeps_types_with_members_and_curriculum_samples_are_seeded():
    from tapir_ray.curriculum.citing import aliases, build_book, curriculum_ids

    merged = [{"name": "Math questions", "definition": "Arithmetic.", "merged_from": ["Math questions", "Math problems"]},
              {"name": "Writing questions", "definition": "Prose.", "merged_from": []},
              {"name": "Law questions", "definition": "Legal.", "merged_from": []}]  # fmt: skip
    names = aliases(merged)
    assert (
        names["math problems"] == "Math questions"
        and names["writing questions"] == "Writing questions"
    )
    assigned = {"q1": "Math questions", "q2": "Math questions", "q3": "Writing questions"}
    book = build_book(merged, assigned, {"Math questions": ["Shows each step.", "Is in-depth."]},
                      required=["articulate", "in-depth", "comprehensive"], criteria_max=7)  # fmt: skip
    assert [(t.name, t.members) for t in book.types] == [
        ("Math questions", 2),
        ("Writing questions", 1),
    ]
    assert book.get("Math questions").criteria == [
        "Shows each step.", "Is in-depth.", "Articulate: the answer is articulate.",
        "Comprehensive: the answer is comprehensive.",
    ]  # fmt: skip
    assert book.check(3, 7) == []
    train = [f"t{k}" for k in range(100)]
    same = [curriculum_ids(train, 10, 3, r, resample=False) for r in (1, 2, 3)]
    assert same[0] == same[1] == same[2] and len(set(same[0])) == 10
    fresh = [curriculum_ids(train, 10, 3, r, resample=True) for r in (1, 2)]
    assert fresh[0] != fresh[1] and curriculum_ids(train, 10, 3, 2, resample=True) == fresh[1]


def test_later_rounds_revise_the_previous_rounds_answer_with_the_rubric(ray_cluster, tmp_path):
    """Round k > 1's student input is its own previous answer to revise; a question new to the
    round (re-sampling) starts from the plain question."""
    import json

    import pyarrow as pa

    from tapir_ray import storage
    from tapir_ray.curriculum.citing_stages import write_round_student_inputs

    run = str(tmp_path)
    storage.write_table(pa.table({"id": ["a", "b"], "instruction": ["Add 2 and 2.", "Name a fruit."], "input": ["", ""],
                                  "teacher": ["4", "Apple"], "split": ["train", "train"]}), f"{run}/items")  # fmt: skip
    book = RubricBook(
        types=[
            QuestionType(name="Math", criteria=["Shows the sum.", "Is articulate.", "Is in-depth."])
        ]
    )
    storage.write_text_atomic(f"{run}/rubrics.json", book.to_json())
    storage.write_table(
        pa.table({"id": ["a", "b"], "type": ["Math", "Math"]}), f"{run}/types_by_id"
    )
    storage.write_table(pa.table({"id": ["a"], "response": ["It is 5."]}), f"{run}/round-1/student")
    assert write_round_student_inputs(run, 2, ["a", "b"]) == 2
    rows = {
        r["id"]: json.loads(r["messages"])
        for r in storage.read_table(f"{run}/round-2/student_in").to_pylist()
    }
    assert (
        "[Previous answer]\nIt is 5." in rows["a"][0]["content"]
        and "1. Shows the sum." in rows["a"][0]["content"]
    )
    assert rows["b"] == [{"role": "user", "content": "Name a fruit."}]


def citing_config(run_dir: str, base_url: str, model: str) -> dict:
    """The TAPIR test's run, with CITING's curriculum: a scripted teacher, `model` as the student."""
    from tests.test_tapir import tapir_config

    raw = tapir_config(run_dir, base_url, model, rounds=1)
    raw["run"]["seed"] = 5
    raw["student"]["max_model_len"] = 512  # the revision prompt carries the rubric and an answer
    raw["oracle"]["teacher"]["rpm"] = 600  # 10 requests/s: slow enough to be caught mid-stage
    raw["oracle"]["teacher_max_tokens"] = 48
    # Rubrics and revisions go through the server's Batch API; everything else online.
    raw["oracle"]["mode"] = {"default": "online", "rubric": "batch", "revise": "batch"}
    raw["oracle"]["teacher"]["batch"] = {"poll_s": 0.2, "poll_max_s": 1.0}
    raw["curriculum"] = {"algorithm": "citing",
                         "citing": {"warmup_rows": 8, "max_types": 6, "induction_batch_size": 4, "revision_rounds": 1,
                                    "curriculum_questions": 8, "inference_revisions": 1, "max_self_revisions": 1, "eval_questions": 3}}  # fmt: skip
    # ZeRO-3: the adapter is gathered from the parameter shards when it is saved.
    raw["train"].update(num_workers=1, max_length=256, deepspeed_stage=3)
    return raw


@pytest.mark.timeout(1500)
def test_one_citing_round_end_to_end_killed_and_resumed(ray_cluster, tiny_llama, tmp_path):
    """A CITING run (scripted teacher and judge over HTTP, the tiny Llama student, LoRA under
    DeepSpeed ZeRO-3) whose driver is SIGKILLed while the judge compares answers; `--resume`
    finishes it.
    Then `tapir-ray generate` answers and self-revises new questions with the retrieved rubric."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import ray
    import yaml

    from tapir_ray import storage
    from tapir_ray.oracle.local import LocalOracle
    from tests.conftest import REPO
    from tests.test_tapir import _kill, _stage, _wait

    run_dir = str(tmp_path / "run")
    with LocalOracle("--backend", "scripted", "--latency-ms", "20-60") as server:
        cfg_path = tmp_path / "citing.yaml"
        cfg_path.write_text(yaml.safe_dump(citing_config(run_dir, server.base_url, tiny_llama)))
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        cmd = [sys.executable, "-m", "tapir_ray.cli", "run", str(cfg_path)]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        start = {}

        def mid_judging() -> bool:
            if _stage(run_dir) != "round-1/eval/judge":
                return False
            ok = server.stats()["ok"]
            return ok - start.setdefault("ok", ok) >= 10

        _wait(lambda: mid_judging() or proc.poll() is not None, 1200, "the evaluation judge")
        _kill(proc)
        final = subprocess.run(
            [*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
        )
        assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
        stats = server.stats()
    state = json.loads((Path(run_dir) / "state.json").read_text())
    assert state["status"] == "done" and state["algorithm"] == "citing"
    assert state["stages"]["round-1/eval/judge"]["attempts"] == 2
    cached = {e.get("response_id") for _, e in ResponseCache(f"{run_dir}/oracle-cache").entries()}
    assert all(
        not set(ids[:-1]) & cached for ids in stats["repeated_ids"]
    )  # nothing returned was asked twice
    # The split is the seeded hash of the id.
    items = storage.read_table(f"{run_dir}/items").to_pylist()
    assert all(r["split"] == split_of(5, r["id"]) for r in items)
    # Types and rubrics: readable JSON, every rubric within 3..7 criteria and covering the required ones.
    book = RubricBook.from_json((Path(run_dir) / "rubrics.json").read_text())
    assert book.types and book.check(3, 7) == []
    for t in book.types:
        assert all(
            any(q in c.casefold() for c in t.criteria)
            for q in ("articulate", "in-depth", "comprehensive")
        )
    assert sum(t.members for t in book.types) == state["stages"]["rubrics"]["typed_questions"] > 0
    assert state["stages"]["retrieval"]["retrieval_agreement"] is not None
    typed = storage.read_table(f"{run_dir}/types_by_id").to_pylist()
    assert {r["id"] for r in typed} >= {r["id"] for r in items} and {r["type"] for r in typed} <= {
        t.name for t in book.types
    }
    # The revision round: (question, rubric, previous answer) → the teacher's revision.
    student = {
        r["id"]: r["response"] for r in storage.read_table(f"{run_dir}/round-1/student").to_pylist()
    }
    train = storage.read_table(f"{run_dir}/round-1/train_set").to_pylist()
    assert len(train) == 8 == len(student)
    # One streaming phase: the teacher revised each answer as the student's blocks arrived.
    phase = state["stages"]["round-1/student_revise"]
    assert phase["rows_in"] == phase["rows_out"] == 8 and phase["student"]["rows_generated"] == 8
    for r in train:
        content = json.loads(r["messages"])[0]["content"]
        assert "[Rubric]\n1. " in content and f"[Previous answer]\n{student[r['id']]}" in content
        assert r["answer_prev"] == student[r["id"]] and 0 < r["edit_distance"] <= 1
    info = state["rounds"]["1"]
    assert info["mean_edit_distance"] > 0 and info["train"]["steps"] > 0
    assert (Path(run_dir) / "round-1/adapter/adapter_config.json").exists()
    from safetensors.torch import load_file

    weights = load_file(Path(run_dir) / "round-1/adapter/adapter_model.safetensors")
    assert weights and all("lora_" in k and t.numel() > 0 for k, t in weights.items())  # gathered
    # Evaluation on the test split against the SFT warm-up student, per criterion, both orders.
    ev = info["eval"]
    assert ev["t_inf"] in (0, 1) and set(ev["test"]) == {"articulate", "in-depth", "comprehensive"}
    for v in ev["test"].values():
        assert v["prompts"] > 0 and v["wins"] + v["ties"] + v["losses"] == 2 * v["prompts"]
    report = (Path(run_dir) / "metrics/report.md").read_text()
    assert "Question types and rubrics" in report and "articulate vs SFT" in report
    # oracle.mode: the batch roles went through batches, at the batch price; the others online.
    spend = state["ledger"]["rounds"]
    assert spend["0"]["rubric"]["batch_requests"] == spend["0"]["rubric"]["requests"] > 0
    assert spend["1"]["revise"]["batch_requests"] == spend["1"]["revise"]["requests"] > 0
    assert spend["1"]["eval-judge"]["batch_requests"] == 0 < spend["1"]["eval-judge"]["requests"]
    assert stats["batches"] >= 2 and "Batch API" in report
    # Self-revising inference on new questions.
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "\n".join(
            json.dumps({"instruction": q}) for q in ("Add 7 and 5.", "Write a haiku about snow.")
        )
    )
    out = tmp_path / "answers.jsonl"
    gen = subprocess.run([sys.executable, "-m", "tapir_ray.cli", "generate", run_dir, "--round", "1", "--input",
                          str(questions), "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-3000:]
    # No --self-revise: the T_inf the round's evaluation chose on val.
    assert f"self-revisions: {ev['t_inf']} (chosen on val for this round)" in gen.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(
        len(r["drafts"]) == ev["t_inf"] + 1 and r["answer"] == r["drafts"][-1] for r in rows
    )
    assert all(
        r["type"] in {t.name for t in book.types} and r["rubric"].startswith("1. ") for r in rows
    )
    assert json.loads((Path(run_dir) / "state.json").read_text())["status"] == "done"
    bad = subprocess.run([sys.executable, "-m", "tapir_ray.cli", "generate", run_dir, "--round", "4",
                                             "--input", str(questions)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "no trained round 4" in bad.stderr


def test_a_teacher_that_induces_no_types_leaves_the_taxonomy_standing_in(tmp_path):
    """A very small teacher may write no usable type list; the run then uses the task taxonomy's
    categories, and a dead-lettered merge keeps the candidates as they were."""
    import json

    import pyarrow as pa

    from tapir_ray import storage
    from tapir_ray.curriculum.citing_stages import merged_types, write_merge_request

    run = str(tmp_path)
    empty = pa.table({"id": pa.array([], pa.string()), "parsed": pa.array([], pa.string())})
    storage.write_table(empty, f"{run}/types/induced")
    info = write_merge_request(run, 2, ["Math", "Reasoning", "Others"])
    assert info == {"candidates": 2, "from_taxonomy": True}
    # The taxonomy's categories have no synonyms: nothing is sent to merge them.
    assert storage.read_table(f"{run}/types/merge_in").num_rows == 0
    storage.write_table(empty.select(["parsed"]), f"{run}/types/merged")
    assert [t["name"] for t in merged_types(run)] == ["Math", "Reasoning"]
    induced = pa.table(
        {"id": ["batch-00000"], "parsed": [json.dumps([{"name": "Poems", "definition": "Verse."}])]}
    )
    storage.write_table(induced, f"{run}/types/induced")
    assert write_merge_request(run, 2, ["Math"]) == {"candidates": 1, "from_taxonomy": False}
    request = json.loads(storage.read_table(f"{run}/types/merge_in")["messages"][0].as_py())
    assert "- Poems: Verse." in request[1]["content"]


def test_questions_the_teacher_named_no_type_for_take_the_nearest_type_description(
    ray_cluster, tmp_path
):
    """A dead-lettered type assignment is typed by the closest "name: definition" (MiniLM); the
    teacher's own assignments stand; `type_fallback: none` leaves them untyped. A type whose rubric
    was dead-lettered keeps its questions with the required criteria, and the run says so."""
    import json

    import pyarrow as pa

    from tapir_ray import storage
    from tapir_ray.curriculum.citing_stages import write_rubric_book, write_types_by_description
    from tapir_ray.embed import encode, load_encoder

    run, model = str(tmp_path), "bundled:all-minilm-l6-v2"
    questions = {"q1": "What is 17 multiplied by 3?", "q2": "Write a short poem about autumn leaves.",
                 "q3": "Solve for x: 2x + 6 = 10.", "q4": "Compose a haiku about the sea."}  # fmt: skip
    vectors = encode(load_encoder(model), list(questions.values()))
    storage.write_table(pa.table({"id": list(questions), "embedding": pa.array(vectors.tolist(), pa.list_(pa.float32()))}),
                        f"{run}/embeddings")  # fmt: skip
    types = [{"name": "Arithmetic", "definition": "Calculations with numbers and equations."},
             {"name": "Poetry", "definition": "Writing poems and verse."}]  # fmt: skip
    storage.write_json_atomic(f"{run}/types/candidates.json", types)
    storage.write_table(pa.table({"parsed": pa.array([], pa.string())}), f"{run}/types/merged")
    # The teacher typed q4 (wrongly, on purpose: its word stands) and named no type for the rest.
    storage.write_table(pa.table({"id": ["q4"], "parsed": [json.dumps("Arithmetic")]}), f"{run}/types/assigned")  # fmt: skip
    info = write_types_by_description(run, list(questions), model, "description")
    assert info == {"by_teacher": 1, "by_description": 3}
    got = dict(zip(*(storage.read_table(f"{run}/types/by_description")[c].to_pylist() for c in ("id", "parsed")), strict=True))  # fmt: skip
    assert {i: json.loads(v) for i, v in got.items()} == {"q1": "Arithmetic", "q2": "Poetry", "q3": "Arithmetic"}  # fmt: skip
    # Rubrics: the teacher wrote one for Arithmetic only.
    storage.write_table(pa.table({"id": ["Arithmetic"], "parsed": [json.dumps(["Shows each step."])]}), f"{run}/types/rubrics")  # fmt: skip
    required = ["articulate", "in-depth", "comprehensive"]
    summary = write_rubric_book(run, required, 3, 7)
    book = RubricBook.from_json((tmp_path / "rubrics.json").read_text())
    members = {t.name: t.members for t in book.types}
    assert members == {"Arithmetic": 3, "Poetry": 1} and summary["typed_questions"] == 4
    poetry = next(t for t in book.types if t.name == "Poetry")
    assert len(poetry.criteria) == 3 and all(q in " ".join(poetry.criteria) for q in required)
    assert summary["problems"] == [
        "Poetry: the teacher wrote no rubric; the required criteria stand in"
    ]
    # With no fallback the untyped questions stay untyped.
    assert write_types_by_description(run, list(questions), model, "none") == {"by_teacher": 1, "by_description": 0}  # fmt: skip
    assert storage.read_table(f"{run}/types/by_description").num_rows == 0


def test_the_evaluation_holds_out_citings_test_split_and_tapirs_heldout_rows(ray_cluster, tmp_path):
    """`tapir-ray eval` reads one rule for both curricula: the rows no student trained on that
    have a reference answer (CITING's test split; TAPIR's held-out fraction)."""
    import pyarrow as pa

    from tapir_ray import storage
    from tapir_ray.recipe import heldout, heldout_rows

    citing = pa.table({"id": ["a", "b", "c", "d"], "instruction": ["Q1", "Q2", "Q3", "Q4"], "input": [""] * 4,
                       "teacher": ["A1", "A2", None, "A4"], "split": ["train", "test", "test", "val"]})  # fmt: skip
    assert heldout(citing)["id"].to_pylist() == ["b"]
    tapir = citing.drop_columns(["split"]).append_column(
        "heldout", pa.array([True, False, True, True])
    )
    assert heldout(tapir)["id"].to_pylist() == ["a", "d"]
    storage.write_table(citing, f"{tmp_path}/items")
    assert heldout_rows(str(tmp_path), 0, 10) == [
        {"messages": '[{"role": "user", "content": "Q2"}]', "response": "A2"}
    ]
