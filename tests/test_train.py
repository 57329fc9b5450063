"""Training on a real local Ray cluster with real DeepSpeed (CPU, gloo) and PEFT LoRA.

Two TorchTrainer fits here: a tiny random Llama fully fine-tuned under ZeRO-3, and a short LoRA run
of the bundled SmolLM2 under ZeRO-3 (adapter gathered from the shards), exported and checked in
transformers. ZeRO-2 LoRA training on 2 workers, and a training whose driver is killed mid-fit and
resumed from its checkpoint, run inside the TAPIR end-to-end tests (tests/test_tapir.py).
The tiny models are fully fine-tuned: with a random, frozen base a LoRA adapter barely moves the
loss in a few steps, which would test the model rather than the trainer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray

from tapir_ray.chat import IGNORE_INDEX, prompt_ids
from tapir_ray.config import TrainConfig
from tapir_ray.train import Tokenize, export_model, train_round

pytestmark = pytest.mark.timeout(900)

TINY_LLAMA = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
)  # fmt: skip


def fixed_set(n: int = 16) -> list[dict]:
    """A small fixed set the model can fit: each question has one short, regular answer."""
    return [
        {
            "messages": json.dumps([{"role": "user", "content": f"What is {i} plus {i}?"}]),
            "response": f"{i} plus {i} is {2 * i}.",
        }
        for i in range(n)
    ]


def tiny_config(tokenizer_vocab: int) -> dict:
    return {**TINY_LLAMA, "vocab_size": tokenizer_vocab}


def train_cfg(**overrides) -> TrainConfig:
    base = dict(num_workers=2, micro_batch_size=2, global_batch_size=4, epochs=1, max_steps=12, lr=3e-3, full_finetune=True,
                warmup_ratio=0.0, scheduler="constant", max_length=128, checkpoint_every_steps=4, precision="fp32")  # fmt: skip
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def vocab(smollm2) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(smollm2))


def test_labels_mask_every_prompt_token(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    out = Tokenize(smollm2, 256)(
        {
            "messages": [r["messages"] for r in fixed_set(3)],
            "response": [r["response"] for r in fixed_set(3)],
        }
    )
    for row, ids, labels in zip(fixed_set(3), out["input_ids"], out["labels"], strict=True):
        prompt = prompt_ids(tok, json.loads(row["messages"]))
        assert list(ids[: len(prompt)]) == prompt
        assert all(label == IGNORE_INDEX for label in labels[: len(prompt)])
        assert (
            tok.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=True).strip()
            == row["response"]
        )


def test_tiny_llama_trains_under_zero3(ray_cluster, smollm2, vocab, tmp_path):
    result = train_round(
        ray.data.from_items(fixed_set() * 4), train_cfg(deepspeed_stage=3), str(tmp_path / "round-1"),
        model=smollm2, model_config=tiny_config(vocab),
    )  # fmt: skip
    losses = [m["loss"] for m in result.metrics]
    assert [m["step"] for m in result.metrics] == list(range(1, 13))
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(
        m["tokens_per_s"] > 0 and m["samples_per_s"] > 0 and m["lr"] > 0 for m in result.metrics
    )
    from safetensors.torch import load_file

    weights = load_file(
        os.path.join(result.adapter_dir, "model.safetensors")
    )  # the full model, gathered
    assert weights and all(t.numel() > 0 for t in weights.values())  # not empty ZeRO-3 partitions
    embed = next(t for k, t in weights.items() if "embed_tokens" in k)
    assert tuple(embed.shape) == (vocab, TINY_LLAMA["hidden_size"])


def test_smollm2_lora_adapter_exports_and_changes_generation(ray_cluster, smollm2, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = [{"messages": json.dumps([{"role": "user", "content": q}]), "response": "Banana."}
            for q in ("Name a fruit.", "What should I eat?", "Say something.", "Pick a word.")] * 4  # fmt: skip
    cfg = train_cfg(
        deepspeed_stage=3,
        max_steps=8,
        lr=2e-3,
        precision="auto",  # bf16 where the CPU computes it natively (emulated it costs ~10× here)
        checkpoint_every_steps=8,
        full_finetune=False,
    )
    result = train_round(
        ray.data.from_items(data), cfg, str(tmp_path / "round-1"), model="bundled:smollm2-135m"
    )
    assert result.steps == 8 and result.metrics[-1]["loss"] < result.metrics[0]["loss"]
    from safetensors.torch import load_file

    weights = load_file(os.path.join(result.adapter_dir, "adapter_model.safetensors"))
    assert weights and all(
        "lora_" in k and t.numel() > 0 for k, t in weights.items()
    )  # gathered from ZeRO-3 shards
    assert result.adapter_sha256 == (Path(result.adapter_dir) / "SHA256").read_text().strip()

    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": "Name a fruit."}])])

    def greedy(model) -> str:
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id
            )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    before = greedy(base)
    tuned = PeftModel.from_pretrained(base, result.adapter_dir)
    after = greedy(tuned)
    assert after.startswith("Banana") and not before.startswith("Banana")

    merged_dir = export_model(
        result.adapter_dir, str(tmp_path / "merged"), base_model="bundled:smollm2-135m", merge=True
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert greedy(merged) == after  # the merged export generates as the adapter does
