"""Bundled offline assets: the real GGUF → safetensors conversion (once per session), MiniLM, data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tapir_ray import assets
from tests.conftest import CONVERSION_STDERR, run_cli

pytestmark = pytest.mark.timeout(600)


def test_racing_conversions_produce_one_complete_folder(smollm2, asset_cache):
    names = sorted(os.listdir(smollm2))
    assert {"config.json", "model.safetensors", "tokenizer.json", ".tapir-ray-complete"} <= set(
        names
    )
    leftovers = [
        n for n in os.listdir(asset_cache / "models") if n.startswith(".smollm2") and "tmp" in n
    ]
    assert leftovers == []  # the loser never left a half-written temporary folder behind
    assert assets.resolve_model("bundled:smollm2-135m") == smollm2  # later calls reuse it
    # The one-time conversion prints no progress bars and no library notices of its own.
    assert CONVERSION_STDERR and not [
        line for err in CONVERSION_STDERR for line in err.splitlines()
        if "it/s]" in line or "[WARNING]" in line
    ], CONVERSION_STDERR  # fmt: skip


def test_converted_smollm2_generates_with_its_chat_template(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_bundled_minilm_embeds():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(assets.resolve_model("bundled:all-minilm-l6-v2"), device="cpu")
    a, b, c = model.encode(
        ["How do I bake bread?", "Give me a bread recipe.", "Solve x + 2 = 5."],
        normalize_embeddings=True,
    )
    assert a.shape == (384,)
    assert float(a @ b) > float(a @ c)  # related questions are closer


def test_the_tiny_encoder_is_a_seeded_sentence_encoder_with_the_bundled_tokenizer(tmp_path):
    from tapir_ray.embed import encode, load_encoder

    first, second = assets.tiny_encoder(tmp_path / "a"), assets.tiny_encoder(tmp_path / "b")
    texts = ["How do I bake bread?", "Solve x + 2 = 5.", "How do I bake bread?"]
    a, b = encode(load_encoder(first), texts), encode(load_encoder(second), texts)
    assert a.shape == (3, assets.TINY_ENCODER["hidden_size"])
    assert abs(float(a[0] @ a[0]) - 1.0) < 1e-5 and float(a[0] @ a[1]) < 0.9999
    assert (a[0] == a[2]).all() and abs(a - b).max() < 1e-6  # the same weights, built twice
    assert not [n for n in os.listdir(tmp_path) if "tmp" in n]  # no half-built folder is left


def test_bundled_data_is_shipped_with_licenses():
    alpaca = json.loads(Path(assets.resolve_data("bundled:alpaca-5k")).read_text())
    assert len(alpaca) == 5000 and {"instruction", "input", "output"} <= set(alpaca[0])
    mt = [
        json.loads(line)
        for line in Path(assets.resolve_data("bundled:mt-bench")).read_text().splitlines()
    ]
    assert len(mt) == 80 and all(len(q["turns"]) == 2 for q in mt)
    licenses = (assets.DATA_DIR / "LICENSES.md").read_text()
    assert "CC BY-NC 4.0" in licenses and "Apache-2.0" in licenses


def test_unknown_bundled_names_are_clear_errors():
    with pytest.raises(assets.AssetError, match="unknown bundled model 'bundled:gpt5'"):
        assets.resolve_model("bundled:gpt5")
    with pytest.raises(assets.AssetError, match="unknown bundled data"):
        assets.resolve_data("bundled:nope")
    assert assets.resolve_model("/some/local/folder") == "/some/local/folder"


def test_doctor_reports_engines_and_assets(ray_cluster, smollm2):
    import ray

    result = run_cli(
        "doctor", "--no-endpoints", env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = {
        line.split()[0] + " " + line.split()[1]: line
        for line in result.stdout.splitlines()
        if line.strip()
    }
    assert "ray 2.60.0" in lines["ray ok"]
    assert "CPU 2" in lines["ray ok"]
    assert any(k.startswith("engine transformers") for k in lines)
    assert "safetensors converted" in result.stdout
    assert "bundled:mt-bench" in result.stdout


def test_doctor_flags_an_endpoint_that_does_not_answer(ray_cluster, tmp_path):
    import ray
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump({"oracle": {"teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}})
    )
    result = run_cli(
        "doctor", "--config", str(cfg), env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    )
    assert result.returncode == 1
    teacher = next(line for line in result.stdout.splitlines() if line.startswith("oracle teacher"))
    assert "FAIL" in teacher and "http://127.0.0.1:9/v1" in teacher
