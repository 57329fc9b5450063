"""Student inference: the current student answers every candidate instruction, every round.

    rows (id, messages JSON) → PreparePrompts (chat template → ids; over-long: truncate or dead-letter)
                             → blocks of one engine batch (`engine_blocks`: answers leave batch by batch)
                             → vLLM (ray.data.llm, dynamic LoRA) or transformers (batched generate)
                             → rows + response, prompt/completion tokens, finish reason, engine,
                               adapter id and sha256, latency

`student.engine: auto` takes vLLM when it is importable. Public surface: `answer()` (lazy
Dataset), `persist()` (an operator that writes each block of answers as it passes, for a stage
that streams on into the judge and resumes row by row), `answers_metrics()` (a folder's
throughput figures) and `run_student()` (writes `<dir>/` Parquet + metrics and returns them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from tapir_ray import storage
from tapir_ray.assets import resolve_model
from tapir_ray.config import StudentConfig
from tapir_ray.rundir import RunDir
from tapir_ray.runtime import cached_udf, map_batches_once
from tapir_ray.student.adapter import Adapter, adapter_sha256
from tapir_ray.student.prepare import PreparePrompts

__all__ = ["Adapter", "adapter_sha256", "answer", "answers_metrics", "persist", "pick_engine",
           "preload_engine", "run_student"]  # fmt: skip

# CPUs of each light per-block task (prompt rendering, output columns, persisting): a fraction,
# so that a streaming phase's glue still runs on a 2-CPU node next to an engine actor holding a
# CPU and the oracle's actors (whole-CPU tasks could not be placed there, and the phase would
# wait forever).
LIGHT_CPUS = 0.25

# At most about this many blocks go into the engine, however large the pool (see engine_blocks).
ENGINE_BLOCKS = 1_000

OUTPUT_COLUMNS = ["id", "response", "prompt_tokens", "completion_tokens", "finish_reason", "engine",
                  "adapter_id", "adapter_sha256", "latency_s", "truncated"]  # fmt: skip


def pick_engine(engine: str) -> str:
    if engine != "auto":
        return engine
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


def preload_engine(student: StudentConfig) -> None:
    """Start importing the student engine's modules in the background (vllm_engine.preload),
    for a driver whose first stages come before its first engine stage."""
    if pick_engine(student.engine) == "vllm":
        from tapir_ray.student.vllm_engine import preload

        preload()


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


def engine_block_rows(batch_size: int, rows: int | None) -> int:
    """Rows per block into the engine: one engine batch, or a few where `rows` would make more
    than ENGINE_BLOCKS blocks (Ray Data keeps a little of every task's record in the driver)."""
    return batch_size * max(1, math.ceil((rows or 0) / (batch_size * ENGINE_BLOCKS)))


def engine_blocks(ds: ray.data.Dataset, rows_per_block: int) -> ray.data.Dataset:
    """`ds` cut into blocks of at most `rows_per_block` rows as it streams (Ray Data's streaming
    repartition), so that the answers leave the engine a block at a time. A task's answers leave
    it together, when its last row is done, and the engine works on several tasks at once: fed
    blocks of five batches (the read's blocks), it interleaved eight of them and let out ~10,000
    answers every 35 s, and the judge behind it waited between the waves (a 30,000-row scoring
    phase: the node's cores 70 % busy for half of it). Its tasks ask for LIGHT_CPUS:
    `Dataset.repartition` takes no remote args, and a whole-CPU task waits forever on a 2-CPU
    node whose engine holds one."""
    out = ds.repartition(target_num_rows_per_block=rows_per_block)
    op = out._logical_plan.dag
    if type(op).__name__ == "StreamingRepartition":
        op.ray_remote_args["num_cpus"] = LIGHT_CPUS
    return out


def _without_messages(batch: Any) -> Any:
    """The rendered prompt ids go on; the chat messages they came from stay behind."""
    return batch.drop_columns(["messages"])


def answer(
    ds: ray.data.Dataset,
    student: StudentConfig,
    *,
    run_dir: str,
    round_: int,
    adapter: Adapter | None = None,
    use_gpu: bool = False,
    carry: tuple[str, ...] = (),
    rows: int | None = None,
) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """The student's answers to `ds` (id, messages) as a lazy Dataset, and facts about the run.
    The `carry` columns of `ds` come through unchanged next to the answers. `rows`: about how
    many rows `ds` has (the engine's blocks grow past one batch for large pools)."""
    model_path = resolve_model(student.model)
    sampling = student.sampling.model_dump()
    limit = student.max_model_len - sampling["max_tokens"]
    prepared = ds.map_batches(
        cached_udf,
        fn_args=(PreparePrompts, (model_path, limit, student.over_length, student.chat_template)),
        # Whole blocks: Ray Data fuses a read with a map only when the map takes its blocks as
        # they come, and a fused read is held back with the preparation when the engine has
        # enough queued (runtime.configure_data). A separate read ran ahead while the engine
        # started: all 393 MiB of a 1,000,000-row phase's input sat in the object store.
        batch_size=None,
        num_cpus=LIGHT_CPUS,
    )
    if student.over_length == "truncate":
        # Every prompt fits once shortened: no row can go to the dead-letter, so the rows stream
        # straight into the engine, whose start-up overlaps their preparation.
        good, dead = prepared, 0
    else:
        good, dead = _split_problems(prepared.materialize(), RunDir(run_dir).dead_letter, round_)
    engine = pick_engine(student.engine)
    adapter_id = adapter.id if adapter else "base"
    adapter_sha = adapter.sha256 if adapter else ""
    block_rows = engine_block_rows(student.batch_size, rows)

    if engine == "vllm":
        from tapir_ray.student.vllm_engine import build_vllm_processor

        processor = build_vllm_processor(
            model_path, sampling=sampling, max_model_len=student.max_model_len, batch_size=student.batch_size,
            replicas=student.replicas, tensor_parallel_size=student.tensor_parallel_size, use_gpu=use_gpu,
            cpus_per_replica=student.cpus_per_replica, max_lora_rank=student.max_lora_rank,
            adapter_path=adapter.path if adapter else None, dtype=student.dtype,
            accelerator_type=student.accelerator_type, carry=carry, light_cpus=LIGHT_CPUS,
        )  # fmt: skip
        # The processor's own row preparation first, then the blocks the engine takes.
        prep, processor.preprocess = processor.preprocess, None
        rows_in = good.map_batches(_without_messages, batch_format="pyarrow", num_cpus=LIGHT_CPUS)
        rows_in = rows_in.map(prep, **processor.preprocess_map_kwargs)
        out = processor(engine_blocks(rows_in, block_rows))
    else:
        from tapir_ray.student.hf_engine import HFStudent

        out = map_batches_once(
            engine_blocks(good, block_rows),
            HFStudent,
            fn_constructor_kwargs=dict(model_path=model_path, sampling=sampling, adapter_path=adapter.path if adapter else None, dtype=student.dtype,
                                       cpu_threads=student.cpu_threads),
            batch_size=student.batch_size,
            compute=ray.data.ActorPoolStrategy(size=student.replicas),
            num_cpus=student.cpus_per_replica,
            num_gpus=student.gpus_per_replica if use_gpu else 0,
        )  # fmt: skip

    def stamp(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        batch["adapter_id"] = np.array([adapter_id] * n, dtype=object)
        batch["adapter_sha256"] = np.array([adapter_sha] * n, dtype=object)
        return {k: batch[k] for k in (*OUTPUT_COLUMNS, *carry)}

    return out.map_batches(stamp, batch_format="numpy", num_cpus=LIGHT_CPUS), {
        "engine": engine,
        "dead_lettered": dead,
    }


def _persist_block(batch: Any, folder: str, tag: str) -> Any:
    """Writes a block's answers (OUTPUT_COLUMNS) as one Parquet file of `folder` named after the
    attempt (`tag`) and the time, atomically (written under a `_`-name that every reader skips,
    then renamed; on object stores a put is atomic), and passes the block on."""
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = batch if isinstance(batch, pa.Table) else pa.table(batch)
    if table.num_rows:
        fs, path = storage.fs_and_path(folder)
        name = f"part-{tag}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table.select(OUTPUT_COLUMNS), sink)
        with fs.open(f"{path}/_{name}", "wb") as f:
            f.write(sink.getvalue().to_pybytes())
        fs.mv(f"{path}/_{name}", f"{path}/{name}")
    return table


def persist(answers: ray.data.Dataset, folder: str, tag: str) -> ray.data.Dataset:
    """`answers` with every block written to `folder` as it passes (one file per block, named
    after the attempt `tag`): a stage killed half way keeps the answers it had, and a rerun
    generates only the rest."""
    storage.makedirs(folder)
    return answers.map_batches(_persist_block, fn_args=(folder, tag), batch_size=None,
                               batch_format="pyarrow", num_cpus=LIGHT_CPUS)  # fmt: skip


def answers_metrics(folder: str, tag: str, started: float, **facts: Any) -> dict[str, Any]:
    """Throughput of the answers `persist` wrote to `folder` in attempt `tag`, which began at
    `started` (time.time()), up to its last block; rows of earlier attempts are `rows_resumed`.
    Read from the files' names and footers, not through the driver."""
    import pyarrow.parquet as pq

    fs, path = storage.fs_and_path(folder)
    ours = [f for f in sorted(fs.find(path)) if f"/part-{tag}-" in f and f.endswith(".parquet")]
    rows = tokens = 0
    for f in ours:
        with fs.open(f, "rb") as fh:
            t = pq.read_table(fh, columns=["completion_tokens"])
        rows, tokens = rows + t.num_rows, tokens + int(t["completion_tokens"].to_numpy().sum())
    stamps = [int(f.rsplit("-", 2)[1]) / 1e9 for f in ours]  # when each block was written
    # The student's own time: until its last block, though the stage streams on into the judge.
    seconds = max(stamps) - started if stamps else 0.0
    first = min(stamps, default=None)
    return {"stage": "student", **facts, "rows_generated": rows,
            "rows_resumed": storage.parquet_rows(folder) - rows, "seconds": round(seconds, 2),
            "generated_tokens": tokens, "generated_tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
            "time_to_first_output_s": round(first - started, 2) if first else None}  # fmt: skip


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
