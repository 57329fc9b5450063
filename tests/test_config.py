"""Config validation: every error class names its key path; secrets are never echoed or stored."""

from __future__ import annotations

import pytest
import yaml

from tapir_ray.config import ConfigError, load_config, parse_config
from tests.conftest import REPO, run_cli

SECRET = "sk-proj-abcdefghijklmnopqrstuvwxyz0123"


def problems(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "run.yaml")
    return info.value.problems


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"stundent": {}}, "stundent: unknown key (expected one of: run, pool, student"),
        (
            {"train": {"lora": {"rank": 8}}},
            "train.lora.rank: unknown key (expected one of: r, alpha",
        ),
        (
            {"oracle": {"teacher": {"rpm": "fast"}}},
            "oracle.teacher.rpm: got 'fast', expected a valid integer",
        ),
        ({"pool": {"limit": -3}}, "pool.limit: got -3, expected greater than 0"),
        (
            {"train": {"deepspeed_stage": 5}},
            "train.deepspeed_stage: got 5, expected one of 0, 1, 2 or 3",
        ),
        (
            {"student": {"engine": "tgi"}},
            "student.engine: got 'tgi', expected one of 'auto', 'vllm' or 'transformers'",
        ),
        (
            {"curriculum": {"tapir": {"alpha": [0.3, 1.5, 0.7]}}},
            "curriculum.tapir.alpha.1: got 1.5, expected less than or equal to 1",
        ),
        (
            {"curriculum": {"tapir": {"rounds": 2}}},
            "curriculum.tapir: alpha has 3 entries; expected one per round (2)",
        ),
        (
            {"curriculum": {"citing": {"split": [0.5, 0.2, 0.2]}}},
            "curriculum.citing: split must sum to 1",
        ),
        (
            {"train": {"micro_batch_size": 3}},
            "train: global_batch_size (32) must be a multiple of micro_batch_size × num_workers (6)",
        ),
        ({"train": {"precision": "fp16"}}, "train: precision fp16 is not supported on CPU"),
        (
            {"oracle": {"teacher": {"base_url": "ftp://host"}}},
            "oracle.teacher.base_url: got 'ftp://host', expected an http(s) URL",
        ),
        (
            {"curriculum": {"tapir": {"judge_random": True}}},
            "curriculum.tapir: judge_random applies to selection: random",
        ),
        ({"run": None}, "run: got None, expected a mapping of keys"),
        ({"pool": {"paths": []}}, "pool.paths: got [], expected list should have at least 1 item"),
    ],
)
def test_each_error_class_names_the_key_path(data, expected):
    found = problems(data)
    assert any(line.startswith(expected) for line in found), found


def test_several_problems_give_one_line_each():
    found = problems({"pool": {"limit": 0, "format": "xml"}, "train": {"epochs": -1}})
    assert len(found) == 3
    assert {line.split(":")[0] for line in found} == {"pool.limit", "pool.format", "train.epochs"}


def test_a_union_problem_is_one_line():
    found = problems({"train": {"lora": {"target_modules": 5}}})
    assert found == [
        "train.lora.target_modules: got 5, expected a valid list or one of 'all-linear'"
    ]


def test_a_key_in_place_of_an_env_name_is_refused_and_not_echoed():
    found = problems({"oracle": {"teacher": {"api_key_env": SECRET}}})
    assert found[0].startswith(
        "oracle.teacher.api_key_env: got <redacted>, expected the name of an environment variable"
    )
    assert SECRET not in "\n".join(found)


def test_an_api_key_field_is_unknown_and_not_echoed():
    found = problems({"oracle": {"judge": {"api_key": SECRET}}})
    assert found[0].startswith("oracle.judge.api_key: unknown key")
    assert SECRET not in "\n".join(found)


def test_defaults_follow_the_papers():
    cfg = parse_config({})
    tapir = cfg.curriculum.tapir
    assert (tapir.rounds, tapir.alpha, tapir.delta) == (3, [0.3, 0.5, 0.7], 1.0)
    assert abs(sum(tapir.taxonomy.values()) - 1.0) < 1e-6 and len(tapir.taxonomy) == 32
    assert tapir.taxonomy["Math"] == 0.167 and tapir.taxonomy["Paraphrase"] == 0.017
    assert (cfg.train.lora.r, cfg.train.lora.alpha, cfg.train.lora.dropout) == (16, 32, 0.05)
    assert (cfg.train.learning_rate, cfg.train.warmup_ratio, cfg.train.max_length) == (
        2e-4,
        0.03,
        2048,
    )
    assert cfg.train.model_copy(update={"full_finetune": True}).learning_rate == 2e-5
    citing = cfg.curriculum.citing
    assert (citing.split, citing.revision_rounds, citing.curriculum_questions) == (
        [0.8, 0.1, 0.1],
        3,
        1000,
    )
    assert cfg.oracle.endpoint("judge") is cfg.oracle.teacher  # the judge defaults to the teacher
    # T_inf is chosen on val among 0..3 self-revisions; untuned, the configured one is used.
    assert citing.eval_drafts == 3
    assert citing.model_copy(update={"tune_inference_revisions": False}).eval_drafts == 1
    assert (cfg.oracle.max_dead_letter_share, cfg.oracle.teacher.retry_deadline_s) == (0.05, 600.0)
    assert (
        cfg.curriculum.tapir.selection == "mfd" and cfg.curriculum.tapir.judge.min_valid_mass == 0.5
    )


def test_api_key_is_read_from_the_named_variable(monkeypatch):
    cfg = parse_config({"oracle": {"teacher": {"api_key_env": "MY_TEACHER_KEY"}}})
    monkeypatch.setenv("MY_TEACHER_KEY", SECRET)
    assert cfg.oracle.teacher.api_key() == SECRET
    assert SECRET not in cfg.to_yaml()


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  dir: x\n pool: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("line ")


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_job_configs_are_valid(job):
    load_config(job)


def test_cli_validate_prints_problems_without_traceback(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"train": {"deepspeed_stage": 7}, "oracle": {"teacher": {"api_key_env": SECRET}}}
        )
    )
    result = run_cli("config", "validate", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert sorted(lines) == sorted(
        [
            f"tapir-ray: {path}: train.deepspeed_stage: got 7, expected one of 0, 1, 2 or 3",
            f"tapir-ray: {path}: oracle.teacher.api_key_env: got <redacted>, expected the name of an environment "
            "variable (e.g. OPENAI_API_KEY), never the key itself",
        ]
    )
    assert "Traceback" not in result.stderr and SECRET not in result.stderr + result.stdout


def test_cli_show_prints_the_resolved_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"run": {"dir": "runs/x"}, "oracle": {"teacher": {"api_key_env": "TEACHER_KEY"}}}
        )
    )
    result = run_cli("config", "show", str(path), env={"TEACHER_KEY": SECRET})
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["run"]["dir"] == "runs/x"
    assert shown["oracle"]["teacher"]["api_key_env"] == "TEACHER_KEY"
    assert shown["curriculum"]["tapir"]["delta"] == 1.0  # defaults are filled in
    assert SECRET not in result.stdout


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_config_validates(path):
    cfg = load_config(path)
    assert cfg.curriculum.tapir.rounds == len(cfg.curriculum.tapir.alpha)
