"""Student inference with the real bundled SmolLM2: template parity, transformers, vLLM, dynamic LoRA."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from tapir_ray.chat import IGNORE_INDEX, fit_prompt, load_tokenizer, prompt_ids, sft_example
from tapir_ray.config import StudentConfig
from tapir_ray.oracle.stage import read_dead_letters
from tapir_ray.student import Adapter, run_student

pytestmark = pytest.mark.timeout(900)

CONVERSATIONS = [
    [{"role": "user", "content": "Name three primary colours."}],
    [
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": "What is 7 × 8?"},
    ],
]
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List two uses of copper.",
    "Explain gravity to a child in one sentence.",
]


def rows(prompts):
    return [
        {"id": f"p{i}", "messages": json.dumps([{"role": "user", "content": p}])}
        for i, p in enumerate(prompts)
    ]


def read_out(folder) -> dict[str, dict]:
    table = pq.read_table(str(folder))
    return {r["id"]: r for r in table.to_pylist()}


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="session")
def lora_adapter(smollm2, tmp_path_factory) -> Adapter:
    """A real PEFT adapter on SmolLM2 with non-zero random weights, so it changes what the model says."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=64,
            target_modules=["q_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
        ),
    )
    folder = tmp_path_factory.mktemp("adapter") / "round-1"
    peft_model.save_pretrained(folder)
    return Adapter.load("round-1", str(folder))


# --- template parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [None, "chatml", "llama-2", "llama-3"],
    ids=["bundled", "chatml", "llama2", "llama3"],
)
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "system+user"])
def test_inference_prompt_ids_equal_the_trainers(tokenizer, template, messages):
    """Every named student.chat_template renders the same prompt ids for inference and training."""
    tok = load_tokenizer(tokenizer.name_or_path, template)
    if template == "llama-3":  # a Llama-3 tokenizer has these as special tokens
        tok.add_special_tokens(
            {
                "additional_special_tokens": [
                    "<|start_header_id|>",
                    "<|end_header_id|>",
                    "<|eot_id|>",
                ]
            }
        )
    inference = prompt_ids(tok, messages)
    example = sft_example(tok, messages, "Red, yellow and blue.", max_length=512)
    n = len(inference)
    assert example["input_ids"][:n] == inference
    assert example["labels"][:n] == [IGNORE_INDEX] * n  # every prompt token is masked
    assert all(label != IGNORE_INDEX for label in example["labels"][n:])
    assert (
        tok.decode(example["input_ids"][n:], skip_special_tokens=True).strip()
        == "Red, yellow and blue."
    )
    if template in (None, "chatml"):
        # Here the trainer's ids are also the template's rendering of the whole conversation. Not so
        # for the Llama-3 template with this tokenizer: "\n\n" + text pre-tokenises differently
        # from "\n\n" at the end of a prompt, so rendering the whole conversation would shift the
        # prompt boundary away from what inference sees. That is why sft_example appends the
        # response to prompt_ids instead.
        full = tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": "Red, yellow and blue."}], tokenize=True
        )
        full = full["input_ids"] if hasattr(full, "keys") else full
        assert example["input_ids"] == list(full)


def test_a_student_without_a_chat_template_gets_the_named_default(tokenizer, tmp_path):
    """A base model ships no template: ChatML renders for inference and training alike, a named
    one when the config says so; `tapir-ray doctor` says which."""
    from tapir_ray.chat import template_in_use
    from tapir_ray.train import Tokenize

    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    messages = [{"role": "user", "content": "Name a colour."}]
    base = load_tokenizer(str(tmp_path))
    assert "<|im_start|>assistant" in base.decode(prompt_ids(base, messages))
    assert template_in_use(str(tmp_path), None) == "chatml (the student has none)"
    llama = load_tokenizer(str(tmp_path), "llama-2")
    assert "[INST] Name a colour. [/INST]" in llama.decode(prompt_ids(llama, messages))
    assert template_in_use(str(tmp_path), "llama-2") == "llama-2 (student.chat_template)"
    # The training tokenizer (the Ray Data UDF) renders the same prompt ids as inference.
    batch = Tokenize(str(tmp_path), 128, "llama-2")(
        {
            "messages": np.array([json.dumps(messages)], dtype=object),
            "response": np.array(["Red."], dtype=object),
        }
    )
    ids = list(batch["input_ids"][0])
    assert ids[: len(prompt_ids(llama, messages))] == prompt_ids(llama, messages)


def test_prepare_stage_renders_the_same_ids(ray_cluster, tokenizer, smollm2):
    from tapir_ray.student.prepare import PreparePrompts

    prep = PreparePrompts(smollm2, limit=1024, over_length="truncate")
    batch = prep({"id": ["a"], "messages": [json.dumps(CONVERSATIONS[1])]})
    assert list(batch["prompt_ids"][0]) == prompt_ids(tokenizer, CONVERSATIONS[1])


def test_fit_prompt_keeps_the_template_and_shortens_the_content(tokenizer):
    long = [{"role": "user", "content": "word " * 400}]
    ids, truncated = fit_prompt(tokenizer, long, 100)
    assert truncated and len(ids) <= 100
    text = tokenizer.decode(ids)
    assert text.rstrip().endswith("<|im_start|>assistant") and text.startswith("<|im_start|>system")


# --- transformers engine -----------------------------------------------------------------------------


def test_over_long_prompts_can_go_to_the_dead_letter(ray_cluster, tiny_llama, tmp_path):
    student = StudentConfig(model=tiny_llama, engine="transformers", max_model_len=256, over_length="dead-letter",
                            batch_size=4, cpus_per_replica=0.5, sampling={"max_tokens": 8})  # fmt: skip
    over_long = "Summarise this text: " + "lorem ipsum " * 400
    metrics = run_student(
        ray.data.from_items(rows([PROMPTS[0], over_long])),
        student,
        str(tmp_path / "out"),
        run_dir=str(tmp_path),
        round_=2,
    )
    assert set(read_out(tmp_path / "out")) == {"p0"} and metrics["dead_lettered"] == 1
    dead = read_dead_letters(str(tmp_path))
    assert (
        dead[0]["id"] == "p1"
        and dead[0]["status"] == "over_length"
        and "over max_model_len" in dead[0]["reason"]
    )


def test_the_transformers_engine_computes_with_the_nodes_cores(ray_cluster, tiny_llama):
    """Ray starts a 1-CPU actor with one OpenMP thread; the engine takes the node's cores (as
    vLLM-CPU does) unless `student.cpu_threads` says how many."""
    from tapir_ray.student.hf_engine import HFStudent

    def threads(**kwargs) -> int:
        engine = ray.remote(num_cpus=0.5)(HFStudent).remote(tiny_llama, {"max_tokens": 4}, **kwargs)
        try:
            return ray.get(engine.__ray_call__.remote(lambda self: self.torch.get_num_threads()))
        finally:
            ray.kill(engine)

    assert threads() == len(os.sched_getaffinity(0)) and threads(cpu_threads=1) == 1


def test_torch_threads_wait_passively_unless_the_environment_says(monkeypatch):
    """Every worker of a run, and the local servers, get OMP_WAIT_POLICY=PASSIVE (engines on
    every core beside other torch processes; runtime.CPU_THREADS_ENV); a user's setting stands."""
    from tapir_ray.runtime import worker_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert worker_env()["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert worker_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_vllm_stage_is_imported_ahead_by_a_background_thread():
    """A run imports ray.data.llm's vLLM stage (and vLLM) while its first stages work, not when
    its first scoring phase builds the processor: the module the processor imports is the one
    preloaded, and the preload leaves it in sys.modules (in a fresh process)."""
    import subprocess
    import sys

    pytest.importorskip("vllm")
    code = (
        "import sys\n"
        "from tapir_ray.student.vllm_engine import ENGINE_STAGE_MODULE, preload\n"
        "assert ENGINE_STAGE_MODULE not in sys.modules and 'vllm' not in sys.modules\n"
        "preload().join()\n"
        "print(ENGINE_STAGE_MODULE in sys.modules and 'vllm' in sys.modules)\n"
        "from ray.llm._internal.batch.stages import vLLMEngineStage\n"
        "assert vLLMEngineStage.__module__ == ENGINE_STAGE_MODULE, vLLMEngineStage.__module__\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True"


# --- vLLM engine (one engine start for the session) and LoRA ----------------------------------------


def test_vllm_with_dynamic_lora_matches_transformers_with_the_same_adapter(
    ray_cluster, smollm2, lora_adapter, tmp_path, capfd
):
    common = dict(model="bundled:smollm2-135m", max_model_len=512, batch_size=4, cpus_per_replica=1.0,
                  sampling={"max_tokens": 16, "temperature": 0.0})  # fmt: skip
    over_long = "Summarise this text: " + "lorem ipsum " * 400  # longer than max_model_len
    # One block of five rows, as a read of a small file gives it.
    data = ray.data.from_arrow(pa.Table.from_pylist(rows([*PROMPTS, over_long])))
    runs, metrics = {}, {}
    for name, engine, adapter in (
        ("base", "transformers", None),
        ("hf_lora", "transformers", lora_adapter),
        ("vllm_lora", "vllm", lora_adapter),
    ):
        metrics[name] = run_student(
            data,
            StudentConfig(engine=engine, **common),
            str(tmp_path / name),
            run_dir=str(tmp_path),
            round_=1,
            adapter=adapter,
        )
        runs[name] = read_out(tmp_path / name)
    base, hf_lora, vllm_lora = runs["base"], runs["hf_lora"], runs["vllm_lora"]
    # A healthy stage leaves no error line of Ray's core worker on this process's console (its
    # engine actor is not restartable, as no pool of ours is).
    console = capfd.readouterr()
    assert "core_worker" not in console.err + console.out, console.err[-2000:]
    over = f"p{len(PROMPTS)}"
    for name, out in runs.items():  # the output schema, the same from both engines
        assert set(out) == set(base) and metrics[name]["rows_out"] == len(PROMPTS) + 1
        # The answers leave the engine a batch (4 rows) at a time, not all five together: a
        # judge streaming behind the engine is fed as it goes.
        parts = sorted((tmp_path / name).glob("*.parquet"))
        assert len(parts) >= 2 and all(pq.ParquetFile(p).metadata.num_rows <= 4 for p in parts)
        assert metrics[name]["generated_tokens"] == sum(
            r["completion_tokens"] for r in out.values()
        )
        assert (
            metrics[name]["generated_tokens_per_s"] > 0
            and metrics[name]["time_to_first_output_s"] > 0
        )
        for r in out.values():
            assert r["finish_reason"] in ("stop", "length") and 0 < r["completion_tokens"] <= 16
            assert r["prompt_tokens"] > 10 and r["latency_s"] >= 0
        # The over-long prompt was shortened (its template kept) and answered: the batch completed.
        assert out[over]["truncated"] and out[over]["prompt_tokens"] <= 512 - 16
    assert "Paris" in base["p0"]["response"] and base["p0"]["engine"] == "transformers"
    assert base["p0"]["adapter_id"] == "base" and base["p0"]["adapter_sha256"] == ""

    changed = [p for p in base if base[p]["response"] != hf_lora[p]["response"]]
    assert len(changed) >= 3, "the adapter must measurably change the answers"
    for p, r in vllm_lora.items():
        assert (
            r["engine"] == "vllm"
            and r["adapter_id"] == "round-1"
            and r["adapter_sha256"] == lora_adapter.sha256
        )
        assert (
            r["completion_tokens"] > 0 and r["prompt_tokens"] == base[p]["prompt_tokens"]
        )  # same prompt ids
    # Both engines apply the adapter: their greedy answers agree far more with each other than with the base.
    agree = sum(vllm_lora[p]["response"][:20] == hf_lora[p]["response"][:20] for p in base)
    agree_base = sum(vllm_lora[p]["response"][:20] == base[p]["response"][:20] for p in base)
    assert agree > agree_base


def test_adapter_hash_detects_a_modified_adapter(lora_adapter, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(lora_adapter.path, copy)
    assert (
        Adapter.load("round-1", str(copy), expected_sha256=lora_adapter.sha256).sha256
        == lora_adapter.sha256
    )
    config = json.loads((copy / "adapter_config.json").read_text())
    config["lora_alpha"] = 1
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="stale or modified"):
        Adapter.load("round-1", str(copy), expected_sha256=lora_adapter.sha256)


def test_grouped_cpu_lora_kernels_match_vllms_per_token_ops():
    """Our vllm-cpu LoRA kernels (a vLLM plugin) compute what vLLM's own torch ops compute."""
    import importlib

    import torch

    from tapir_ray.student import vllm_cpu_lora as ours

    original = importlib.reload(importlib.import_module("vllm.lora.ops.torch_ops.lora_ops"))
    torch.manual_seed(0)
    tokens, hidden, rank, slots = 37, 24, 4, 3
    x = torch.randn(tokens, hidden)
    a = torch.randn(slots, 1, rank, hidden)  # shrink weights, vLLM's 4-d layout
    b = torch.randn(slots, 1, hidden * 2, rank)
    idx = torch.tensor([0] * 10 + [2] * 20 + [-1] * 7)  # two adapters and the "no adapter" slot
    want, got = torch.zeros(tokens, rank), torch.zeros(tokens, rank)
    original.bgmv_shrink(x, a, want, idx, 0.5)
    ours.bgmv_shrink(x, a, got, idx, 0.5)
    assert torch.allclose(want, got, atol=1e-5)
    for add in (False, True):
        want_e, got_e = torch.ones(tokens, hidden * 2), torch.ones(tokens, hidden * 2)
        original.bgmv_expand(want, b, want_e, idx, add)
        ours.bgmv_expand(got, b, got_e, idx, add)
        assert torch.allclose(want_e, got_e, atol=1e-4)
        want_s, got_s = torch.ones(tokens, hidden * 4), torch.ones(tokens, hidden * 4)
        original.bgmv_expand_slice(want, b, want_s, idx, hidden, hidden * 2, add)
        ours.bgmv_expand_slice(got, b, got_s, idx, hidden, hidden * 2, add)
        assert torch.allclose(want_s, got_s, atol=1e-4)
    # vLLM loads the plugin in its processes: after register() its CPU wrapper calls ours.
    from vllm.lora.punica_wrapper import punica_cpu

    ours.register()
    assert punica_cpu.bgmv_shrink is ours.bgmv_shrink
