"""Prompt preparation for the student: chat messages → prompt token ids within the length budget.

Runs as a Ray Data stage before either engine, so vLLM and transformers receive the same ids the
trainer builds (tapir_ray.chat). Over-long prompts are shortened or flagged for the dead-letter,
as `student.over_length` says; one bad row never reaches, or stops, an engine.
"""

from __future__ import annotations

import json

import numpy as np

from tapir_ray.chat import fit_prompt, prompt_ids


class PreparePrompts:
    def __init__(
        self, model_path: str, limit: int, over_length: str, chat_template: str | None = None
    ):
        from tapir_ray.chat import load_tokenizer

        self.tokenizer = load_tokenizer(model_path, chat_template)
        self.limit = limit
        self.over_length = over_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids_out, truncated, problem = [], [], []
        for raw in batch["messages"]:
            messages = json.loads(raw)
            ids = prompt_ids(self.tokenizer, messages)
            if len(ids) <= self.limit:
                ids_out.append(ids), truncated.append(False), problem.append("")
            elif self.over_length == "truncate":
                ids, _ = fit_prompt(self.tokenizer, messages, self.limit)
                ids_out.append(ids), truncated.append(True), problem.append("")
            else:
                ids_out.append([]), truncated.append(False)
                problem.append(
                    f"prompt is {len(ids)} tokens, over max_model_len - max_tokens ({self.limit})"
                )
        out = dict(batch)
        out["prompt_ids"] = np.array(
            [np.asarray(i, dtype=np.int64) for i in ids_out] + [None], dtype=object
        )[:-1]
        out["truncated"] = np.array(truncated, dtype=bool)
        out["problem"] = np.array(problem, dtype=object)
        return out
