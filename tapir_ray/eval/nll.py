"""Held-out NLL: the mean token negative log-likelihood of the teacher's answers under the student.

A cheap, judge-free signal for every round, computed on a split the training never sees. The
prompt is rendered exactly as in training (`tapir_ray.chat.sft_example`) and only answer tokens
count, so the number is comparable across rounds of a run.
"""

from __future__ import annotations

import json
from typing import Any

import ray


def heldout_nll(
    model: str,
    rows: list[dict[str, Any]],
    *,
    adapter_dir: str | None = None,
    max_length: int = 2048,
    batch_size: int = 8,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """rows: {messages (list or JSON), response}. Returns {nll, tokens, rows}."""
    import torch
    from transformers import AutoModelForCausalLM

    from tapir_ray.assets import resolve_model
    from tapir_ray.chat import load_tokenizer
    from tapir_ray.runtime import best_dtype

    path = resolve_model(model)
    tokenizer = load_tokenizer(path, chat_template)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=best_dtype())
    if adapter_dir:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter_dir)
    lm.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = sft_examples(tokenizer, rows, max_length)
    with torch.inference_mode():
        total, count = token_nll(lm, examples, pad, batch_size)
    return {"nll": round(total / count, 5) if count else None, "tokens": count, "rows": len(rows)}


def sft_examples(tokenizer, rows: list[dict[str, Any]], max_length: int) -> list[dict]:
    from tapir_ray.chat import sft_example

    out = []
    for r in rows:
        messages = json.loads(r["messages"]) if isinstance(r["messages"], str) else r["messages"]
        out.append(sft_example(tokenizer, messages, str(r["response"]), max_length))
    return out


def token_nll(lm, examples: list[dict], pad: int, batch_size: int = 8) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens) of the answer tokens of `examples` (sft_example
    dicts) under `lm`, in batches; the caller disables gradients."""
    import torch

    from tapir_ray.chat import IGNORE_INDEX

    total, count = 0.0, 0
    device = next(lm.parameters()).device
    for b in range(0, len(examples), batch_size):
        chunk = examples[b : b + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in chunk])
        labels = torch.tensor(
            [e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in chunk]
        )
        mask = torch.tensor(
            [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in chunk]
        )
        logits = lm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        target = labels[:, 1:]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        keep = target != IGNORE_INDEX
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total += float(-(picked * keep).sum())
        count += int(keep.sum())
    return total, count


@ray.remote(num_cpus=1)
def heldout_nll_task(model: str, rows: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    return heldout_nll(model, rows, **kwargs)
