"""Student inference: the current student answers every candidate instruction, every round.

    rows (id, messages JSON) → PreparePrompts (chat template → ids; over-long: truncate or dead-letter)
                             → vLLM (ray.data.llm, dynamic LoRA) or transformers (batched generate)
                             → rows + response, prompt/completion tokens, finish reason, engine,
                               adapter id and sha256, latency

`student.engine: auto` takes vLLM when it is importable. Public surface: `answer()` (lazy
Dataset) and `run_student()` (writes `<dir>/` Parquet + metrics and returns them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from tapir_ray import storage
from tapir_ray.assets import resolve_model
from tapir_ray.config import StudentConfig
from tapir_ray.runtime import cached_udf, map_batches_once
from tapir_ray.student.adapter import Adapter, adapter_sha256
from tapir_ray.student.prepare import PreparePrompts

__all__ = ["Adapter", "adapter_sha256", "answer", "pick_engine", "run_student"]

OUTPUT_COLUMNS = ["id", "response", "prompt_tokens", "completion_tokens", "finish_reason", "engine",
                  "adapter_id", "adapter_sha256", "latency_s", "truncated"]  # fmt: skip


def pick_engine(engine: str) -> str:
    if engine != "auto":
        return engine
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


def _split_problems(
    prepared: ray.data.Dataset, dead_dir: str, round_: int
) -> tuple[ray.data.Dataset, int]:
    """Rows flagged by PreparePrompts go to the dead-letter; the rest go on."""
    with _fn_filters():
        bad = prepared.filter(lambda r: bool(r["problem"])).materialize()
    n_bad = bad.count()
    if n_bad:
        lines = [
            json.dumps(
                {
                    "id": r["id"],
                    "role": "student",
                    "round": round_,
                    "status": "over_length",
                    "reason": r["problem"],
                }
            )
            for r in bad.select_columns(["id", "problem"]).iter_rows()
        ]
        storage.write_text_atomic(
            storage.join(dead_dir, f"round-{round_}-student-{time.time_ns()}.jsonl"),
            "\n".join(lines) + "\n",
        )
    with _fn_filters():
        return prepared.filter(lambda r: not r["problem"]), n_bad


@contextlib.contextmanager
def _fn_filters():
    """Ray Data suggests expression filters (`expr=`) for speed, but one runs as a task of its own
    holding a whole CPU, not fused with the prompt stage: on 2 CPUs that starved the engine actor.
    The function filters stay, without the suggestion on the console."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn'")
        yield


def answer(
    ds: ray.data.Dataset,
    student: StudentConfig,
    *,
    run_dir: str,
    round_: int,
    adapter: Adapter | None = None,
    use_gpu: bool = False,
) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """The student's answers to `ds` (id, messages) as a lazy Dataset, and facts about the run."""
    model_path = resolve_model(student.model)
    sampling = student.sampling.model_dump()
    limit = student.max_model_len - sampling["max_tokens"]
    prepared = ds.map_batches(
        cached_udf,
        fn_args=(PreparePrompts, (model_path, limit, student.over_length, student.chat_template)),
        batch_size=64,
        num_cpus=0.25,
    )
    if student.over_length == "truncate":
        # Every prompt fits once shortened: no row can go to the dead-letter, so the rows stream
        # straight into the engine, whose start-up overlaps their preparation.
        good, dead = prepared, 0
    else:
        good, dead = _split_problems(
            prepared.materialize(), storage.join(run_dir, "dead-letter"), round_
        )
    engine = pick_engine(student.engine)
    adapter_id = adapter.id if adapter else "base"
    adapter_sha = adapter.sha256 if adapter else ""

    if engine == "vllm":
        from tapir_ray.student.vllm_engine import build_vllm_processor

        processor = build_vllm_processor(
            model_path, sampling=sampling, max_model_len=student.max_model_len, batch_size=student.batch_size,
            replicas=student.replicas, tensor_parallel_size=student.tensor_parallel_size, use_gpu=use_gpu,
            cpus_per_replica=student.cpus_per_replica, max_lora_rank=student.max_lora_rank,
            adapter_path=adapter.path if adapter else None, dtype=student.dtype,
            accelerator_type=student.accelerator_type,
        )  # fmt: skip
        out = processor(good.drop_columns(["messages"]))
    else:
        from tapir_ray.student.hf_engine import HFStudent

        out = map_batches_once(
            good,
            HFStudent,
            fn_constructor_kwargs=dict(model_path=model_path, sampling=sampling, adapter_path=adapter.path if adapter else None, dtype=student.dtype),
            batch_size=student.batch_size,
            compute=ray.data.ActorPoolStrategy(size=student.replicas),
            num_cpus=student.cpus_per_replica,
            num_gpus=student.gpus_per_replica if use_gpu else 0,
        )  # fmt: skip

    def stamp(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        batch["adapter_id"] = np.array([adapter_id] * n, dtype=object)
        batch["adapter_sha256"] = np.array([adapter_sha] * n, dtype=object)
        return {k: batch[k] for k in OUTPUT_COLUMNS}

    return out.map_batches(stamp, batch_format="numpy"), {"engine": engine, "dead_lettered": dead}


def run_student(
    ds: ray.data.Dataset,
    student: StudentConfig,
    out_dir: str,
    *,
    run_dir: str,
    round_: int,
    adapter: Adapter | None = None,
    use_gpu: bool = False,
    on_rows: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Answers `ds`, writes Parquet to `out_dir`, and returns throughput metrics.

    `on_rows(n)` is called with the rows written so far (progress)."""
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401  (pa.compute)
    import pyarrow.parquet as pq

    started = time.perf_counter()
    out, facts = answer(
        ds, student, run_dir=run_dir, round_=round_, adapter=adapter, use_gpu=use_gpu
    )
    storage.remove(out_dir)
    fs, path = storage.fs_and_path(out_dir)
    fs.makedirs(path, exist_ok=True)
    rows = gen_tokens = first_tokens = 0
    first_output_s = None
    # Streams one block at a time through the driver into Parquet files (bounded memory), which
    # also tells when the first answers arrived: engine start-up plus the first batch.
    for part, batch in enumerate(out.iter_batches(batch_size=None, batch_format="pyarrow")):
        if first_output_s is None:
            first_output_s = time.perf_counter() - started
            first_tokens = int(pa.compute.sum(batch["completion_tokens"]).as_py() or 0)
        with fs.open(f"{path}/part-{part:05d}.parquet", "wb") as f:
            pq.write_table(batch if isinstance(batch, pa.Table) else pa.table(batch), f)
        rows += batch.num_rows
        if on_rows is not None:
            on_rows(rows)
        gen_tokens += int(pa.compute.sum(batch["completion_tokens"]).as_py() or 0)
    seconds = time.perf_counter() - started
    steady = seconds - (first_output_s or 0)
    metrics = {
        "stage": "student",
        "round": round_,
        **facts,
        "rows_in": rows + facts["dead_lettered"],
        "rows_out": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 3) if seconds else None,
        "generated_tokens": gen_tokens,
        "generated_tokens_per_s": round(gen_tokens / seconds, 2) if seconds else None,
        "time_to_first_output_s": round(first_output_s, 2) if first_output_s is not None else None,
        "steady_seconds": round(steady, 2),
        # After the first answers arrive (engine started): what a long stage runs at.
        "steady_generated_tokens_per_s": round((gen_tokens - first_tokens) / steady, 2)
        if steady > 0
        else None,
        "adapter_id": adapter.id if adapter else "base",
        "adapter_sha256": adapter.sha256 if adapter else "",
    }
    storage.write_json_atomic(storage.join(out_dir, "_METRICS.json"), metrics)
    storage.mark_success(out_dir, {"rows": rows})
    return metrics
