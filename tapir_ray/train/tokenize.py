"""Tokenisation of SFT rows: (messages, response) → input_ids / labels, every prompt token masked."""

from __future__ import annotations

import json

import numpy as np


class Tokenize:
    """Ray Data UDF: (messages, response) → input_ids / labels with every prompt token masked."""

    def __init__(self, tokenizer_path: str, max_length: int, chat_template: str | None = None):
        from tapir_ray.chat import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path, chat_template)
        self.max_length = max_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tapir_ray.chat import sft_example

        ids, labels = [], []
        for messages, response in zip(batch["messages"], batch["response"], strict=True):
            ex = sft_example(self.tokenizer, json.loads(messages), str(response), self.max_length)
            ids.append(np.asarray(ex["input_ids"], dtype=np.int64))
            labels.append(np.asarray(ex["labels"], dtype=np.int64))
        return {"input_ids": _ragged(ids), "labels": _ragged(labels)}


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out
