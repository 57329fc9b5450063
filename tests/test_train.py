"""Training on a real local Ray cluster with real DeepSpeed (CPU, gloo) and PEFT LoRA.

One TorchTrainer fit here: a tiny random Llama fully fine-tuned under ZeRO-3 (the whole model
gathered from the shards). LoRA fits of the bundled SmolLM2 run inside the end-to-end tests: ZeRO-2
on 2 workers with a driver killed mid-fit and resumed from its checkpoint, its adapter exported and
merged (tests/test_tapir.py), and ZeRO-3 with the adapter gathered from the shards
(tests/test_citing.py).
The tiny models are fully fine-tuned: with a random, frozen base a LoRA adapter barely moves the
loss in a few steps, which would test the model rather than the trainer.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import ray

from tapir_ray.assets import TINY_LLAMA
from tapir_ray.chat import IGNORE_INDEX, prompt_ids
from tapir_ray.config import TrainConfig
from tapir_ray.train import Tokenize, train_round

pytestmark = pytest.mark.timeout(900)


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
    handler = signal.getsignal(signal.SIGINT)
    result = train_round(
        ray.data.from_items(fixed_set() * 2), train_cfg(deepspeed_stage=3, max_steps=8), str(tmp_path / "round-1"),
        model=smollm2, model_config=tiny_config(vocab), heldout=fixed_set(4), heldout_before=True,
    )  # fmt: skip
    # Ctrl-C after a fit reaches the run again: Ray Train's handler, which asked the finished
    # fit's controller to abort and swallowed the signal, is not left behind
    assert signal.getsignal(signal.SIGINT) is handler
    losses = [m["loss"] for m in result.metrics]
    assert [m["step"] for m in result.metrics] == list(range(1, 9))
    assert losses[-1] < 0.85 * losses[0], losses
    # The held-out NLL before the first step is the starting model's (a warm-up fit reports the
    # base student's this way), computed by every ZeRO-3 rank together; after the fit it has fallen.
    before, after = result.heldout_before["nll"], result.heldout["nll"]
    assert before == pytest.approx(losses[0], rel=0.1) and after < 0.85 * before, (before, after)
    assert result.heldout_before["rows"] == result.heldout["rows"] == 4
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
