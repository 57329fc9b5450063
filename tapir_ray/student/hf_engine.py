"""The transformers student engine: a Ray Data class UDF with batched, left-padded `generate`.

For machines without vLLM (and as the reference the vLLM path is compared with). The model loads
once per actor in bf16 where the hardware computes it natively, fp32 otherwise; the round's PEFT
adapter is applied on top (not merged), so the base weights stay shared across rounds.
"""

from __future__ import annotations

import os
import time

import numpy as np


class HFStudent:
    def __init__(
        self,
        model_path: str,
        sampling: dict,
        adapter_path: str | None = None,
        dtype: str = "auto",
        cpu_threads: int | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        self.torch = torch
        if not torch.cuda.is_available():
            # Ray starts a 1-CPU actor with OMP_NUM_THREADS=1: generation on one core while the
            # node's others idle (1.36x slower than `generate` outside Ray on 2 cores).
            torch.set_num_threads(cpu_threads or _cores())
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if dtype == "auto":
            from tapir_ray.runtime import best_dtype  # imports Ray: only where it is needed

            torch_dtype = best_dtype()
        else:
            torch_dtype = getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        if adapter_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path)
        self.model = model.eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.sampling = sampling
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        stop = {self.tokenizer.eos_token_id}
        if getattr(self.model, "generation_config", None) is not None:
            eos = self.model.generation_config.eos_token_id
            stop |= set(eos if isinstance(eos, list) else [eos])
        self.stop_ids = {s for s in stop if s is not None}
        self.start_s = time.perf_counter() - started

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        prompts = [list(p) for p in batch["prompt_ids"]]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor(
            [[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device
        )
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        s = self.sampling
        sample = s.get("temperature", 0.0) > 0
        if s.get("seed") is not None:
            torch.manual_seed(s["seed"])
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=s["max_tokens"],
                do_sample=sample,
                temperature=s["temperature"] if sample else None,
                top_p=s.get("top_p", 1.0) if sample else None,
                top_k=None,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.stop_ids),
            )
        elapsed = time.perf_counter() - started
        texts, n_out, finish = [], [], []
        for row in out[:, width:].tolist():
            stop_at = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            tokens = row[:stop_at] if stop_at is not None else row
            texts.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
            n_out.append(len(tokens))
            finish.append("stop" if stop_at is not None else "length")
        n = len(prompts)
        result = dict(batch)
        result.update(
            response=np.array(texts, dtype=object),
            prompt_tokens=np.array([len(p) for p in prompts], dtype=np.int64),
            completion_tokens=np.array(n_out, dtype=np.int64),
            finish_reason=np.array(finish, dtype=object),
            latency_s=np.full(n, elapsed / n),
            engine=np.array(["transformers"] * n, dtype=object),
            engine_start_s=np.full(n, self.start_s),
        )
        return result


def _cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
