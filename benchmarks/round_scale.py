"""A whole TAPIR round at pool scale: `tapir-ray run` end to end, the real engines, one machine.

    python benchmarks/round_scale.py --rows 10000 100000 [--round-share 0.01] [--cpus 2]

For each pool size N: a synthetic pool of N distinct instructions with reference answers, skewed
over task types; the student is a tiny random-weight Llama with the bundled tokenizer
(`tapir_ray.assets.tiny_llama`, head size 64 for vLLM's CPU kernels) on the real vLLM engine
(transformers where vllm is not installed); the sentence encoder is a tiny random-weight one with
the bundled MiniLM's tokenizer (`tapir_ray.assets.tiny_encoder`; `--encoder minilm`: the real
one); the oracle is the scripted OpenAI-compatible server (`tapir-ray oracle serve --backend
scripted`, a few ms per reply) as classifier, expander, refiner and judge; it stands in for a
remote provider, so it runs at the oracle actors' low CPU priority (`oracle.nice`) and takes
the CPU the engine leaves, as the actors do. One TAPIR
round runs as a user runs it (`tapir-ray run`, attached to one Ray cluster): ingest, labels (the
embedding classifier, trained on an oracle-labelled sample), items, the streaming scoring phase
(student answers → judge verdicts), scores, plan, expansion, refinement, training set, a LoRA fit
under DeepSpeed ZeRO-2 and the held-out NLL.

Measured per size:
- each stage's seconds (from state.json) and the scoring phase's rows/s;
- peak resident memory of the driver (the `tapir-ray run` process), of the largest Ray worker,
  of vLLM's engine core (a child process of the engine-stage actor, sized by the engine: weights
  and KV cache) and of all of them together (RSS, so shared pages count in each), and the node's
  memory in use, sampled every 0.5 s; and every 5 s the object store in use (`peak_object_store_mb`),
  the private memory of the largest Ray worker
  and of the driver (`peak_anon_worker_mb`, `peak_anon_driver_mb`: anonymous pages; RSS also
  counts the pages of Ray's object store that a process has mapped, which grow with the store's
  use over a long run, not with the process's own data);
- the scoring phase's overlap: the share of the phase's judge requests that the server had
  received when the engine wrote its last block of answers. 0 means the stages ran one after the
  other; near 1, the judge kept pace with the engine. And the share of the node's cores that
  worked during the phase (`cpu_busy_share`; 1.0: every core, all the time).
- with `--alone [ROWS ...]`: the student engine alone and the judge alone on the same work, after
  the run (on every size, or on the sizes named); `overlap_ratio` = the phase's wall / the larger
  of the two (1.0: perfect overlap), from the largest size timed so (`overlap_ratio_pool`);
  and the CPU seconds the node spent on each half alone (`student_alone_cpu_s`,
  `judge_alone_cpu_s`): on a node whose cores both halves fill, no overlap can bring the phase
  below their sum over the cores (`cpu_bound_s`; `overlap_ratio_cpu` = the phase's wall / the
  larger of that and the halves' walls);
- the driver's, the largest worker's and the engine core's RSS and the driver's private memory
  once a minute (`memory_timeline`), so growth over a long run shows, not only its peak.
The ratios (`rss_ratio_driver`, `rss_ratio_worker`, `anon_ratio_driver`, `anon_ratio_worker`,
`wall_ratio`) set the largest size against the next smaller one (`ratios_of`).
With `--keep DIR --reuse`, a size whose run DIR already holds (its `measured.json`) is not run again.
With `--time-limit SECONDS` each run is stopped (as Ctrl-C stops it) after that long, and the file
keeps what it measured until then (`completed: false`: the stages it finished, its memory peaks and
timeline, the object store's peak); no ratios are taken from it.
Results: benchmarks/results/round_scale.json (or --out), a plot of rows/s per stage next to it
(.png) and tables on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import ray
import yaml
from common import (
    anonymous_bytes,
    device_name,
    object_store_used_mb,
    print_table,
    spilled_mb,
    write_results,
)
from ingest_throughput import PeakRSS

from tapir_ray import storage
from tapir_ray.assets import TINY_LLAMA_VLLM, tiny_encoder, tiny_llama
from tapir_ray.config import OracleConfig
from tapir_ray.oracle.local import LocalOracle
from tapir_ray.runtime import ensure_ray

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "round_scale.json"
# Task types the scripted classifier recognises by their words, skewed as real pools are.
TEMPLATES = [
    (0.30, "Explain why topic {i} about {t} matters, and give two examples."),
    (0.20, "Write a function in python that returns the {i}-th item of a list about {t}."),
    (0.15, "Calculate the sum of {a} and {b}, then explain the steps (case {i})."),
    (0.15, "Write a story about {t} in which the number {i} plays a part."),
    (0.10, "Rewrite this sentence about {t} more formally: item {i} is fine."),
    (0.05, "Fix the code: def f{i}(x): return x +* 1  # a bug about {t}"),
    (0.05, "Correct the sentence about {t}: there is {i} error in it's grammar."),
]
TOPICS = ["rivers", "markets", "proteins", "compilers", "poetry", "orbits", "bridges", "tariffs"]


def write_pool(path: Path, rows: int) -> None:
    weights = [w for w, _ in TEMPLATES]
    bounds = [sum(weights[: k + 1]) for k in range(len(weights))]
    with path.open("w") as f:
        for i in range(rows):
            u = ((i * 2654435761) % 2**32) / 2**32  # a fixed spread over the types
            k = next(j for j, b in enumerate(bounds) if u < b)
            t = TOPICS[(i // 7) % len(TOPICS)]
            instruction = TEMPLATES[k][1].format(i=i, t=t, a=i % 997, b=(i * 7) % 991)
            words = 8 + (i % 5) * 6  # reference answers of varied richness: the judge's scores vary
            output = " ".join(f"point{j}-{t}" for j in range(words)) + f" (answer {i})."
            f.write(json.dumps({"instruction": instruction, "input": "", "output": output}) + "\n")


def run_config(
    run_dir: Path, pool: Path, base_url: str, model: str, encoder: str, rows: int, args
) -> dict:
    size = max(16, round(args.round_share * rows))
    return {
        "run": {"dir": str(run_dir), "seed": 0},
        "pool": {"paths": [str(pool)]},
        "student": {"model": model, "engine": "auto", "max_model_len": 256, "batch_size": 256,
                    "sampling": {"temperature": 0.0, "max_tokens": args.max_tokens}, "gpus_per_replica": 0},
        "oracle": {"teacher": {"base_url": base_url, "model": "local", "api_key_env": None, "rpm": 10**7,
                               "tpm": 10**10, "max_concurrency": 64, "continue_final_message": True},
                   "actors": 1, "teacher_max_tokens": 64},
        "curriculum": {"algorithm": "tapir", "tapir": {
            "rounds": 1, "alpha": [0.5], "round_sizes": [size], "warmup": False, "heldout_fraction": 0.01,
            "nll_max_rows": 16, "expansion_attempts": 1, "reuse_reference_outputs": True,
            "classifier": {"method": "embedding", "label_sample": 1000, "embedding_model": encoder}, "judge": {"mode": "single"}}},
        "train": {"deepspeed_stage": 2, "num_workers": 2, "micro_batch_size": 8, "global_batch_size": 16,
                  "epochs": 1, "max_length": 128, "lora": {"r": 8, "alpha": 16}},
        "resources": {"num_cpus": args.cpus},
    }  # fmt: skip


def role_of(cmd: list[str]) -> str:
    """A process's part in the run: a Ray worker's title without its method
    (`ray::MapWorker(MapBatches(OracleStage))`), vLLM's engine core, the oracle server, the run's
    driver, or the program's name (raylet, gcs_server, dashboard.py, ...)."""
    if not cmd:
        return "?"
    if cmd[0].startswith(("ray::", "VLLM::")):
        return re.sub(r"\)\.\w+$", ")", cmd[0].split()[0])
    text = " ".join(cmd)
    if "oracle serve" in text:
        return "oracle server"
    if "tapir_ray.cli run" in text:
        return "tapir-ray run (driver)"
    return next((Path(a).name for a in cmd[1:] if a.endswith(".py")), Path(cmd[0]).name)


# memory_timeline's columns: seconds since start, driver MB, largest Ray worker MB, its title,
# engine core MB, node MB in use, the driver's private MB.
TIMELINE = ["s", "driver_mb", "worker_mb", "worker", "engine_core_mb", "node_mb", "driver_anon_mb"]


class Sampler(PeakRSS):
    """Sampled in a thread every `interval`: peak RSS of the driver and of this cluster's Ray
    workers (the processes under this benchmark's raylet), the node's memory in use, the oracle
    server's request count over time, and every `cpu_every` seconds the CPU each process under
    this benchmark used, by its part in the run (`role_of`), and the largest Ray worker's private
    memory (`anonymous_bytes`)."""

    def __init__(self, pid: int, server: LocalOracle, interval: float = 0.5, every: float = 60.0,
                 cpu_every: float = 5.0):  # fmt: skip
        super().__init__(interval)
        self.pid, self.server = pid, server
        self.driver = self.worker = self.workers = self.node = self.engine_core = 0
        self.requests: list[tuple[float, int]] = []  # (wall time, requests the server received)
        self.cpu: list[tuple[float, float]] = []  # (wall time, CPU seconds the node has worked)
        self.missed = 0  # samples whose request count the server did not give in time
        self.worker_name = ""  # the process title of the largest Ray worker at its peak
        # Every `every` seconds, a row of TIMELINE, so that growth over a long run shows, not only
        # the peak.
        self.timeline: list[list] = []
        self.every, self._started, self._last = every, time.time(), -every
        # (wall time, role, CPU seconds the process used since its last record): which parts of
        # the run a phase's CPU went to.
        self.by_process: list[tuple[float, str, float]] = []
        self._process_cpu: dict[int, float] = {}
        self.worker_anon, self.worker_anon_name = 0, ""
        self.store = 0.0  # the object store in use, MiB (every cpu_every seconds)
        self.driver_anon = 0  # the driver's private memory, with the workers' (every cpu_every s)
        self.cpu_every, self._cpu_last = cpu_every, float("-inf")

    def __enter__(self) -> Sampler:
        self.sample(cpu=True)  # every process's CPU before the work to measure starts
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.sample(cpu=True)  # and once the work is done

    def _record(self, p: psutil.Process, cmd: list[str]) -> None:
        t = p.cpu_times()
        used = t.user + t.system
        delta, self._process_cpu[p.pid] = used - self._process_cpu.get(p.pid, 0.0), used
        if delta > 0:
            self.by_process.append((time.time(), role_of(cmd), delta))
        if cmd and cmd[0].startswith("ray::"):
            anon = anonymous_bytes(p.pid) or 0
            if anon > self.worker_anon:
                self.worker_anon, self.worker_anon_name = anon, role_of(cmd)

    def sample(self, cpu: bool = False) -> None:
        total, driver, largest, title, core = 0, 0, 0, "", 0
        with contextlib.suppress(psutil.NoSuchProcess):
            driver = psutil.Process(self.pid).memory_info().rss
            self.driver = max(self.driver, driver)
        record = cpu or time.time() - self._cpu_last >= self.cpu_every
        if record:
            self._cpu_last = time.time()
            self.driver_anon = max(self.driver_anon, anonymous_bytes(self.pid) or 0)
            self.store = max(self.store, object_store_used_mb() or 0.0)
        for p in self.proc.children(recursive=True):
            try:
                cmd = p.cmdline()
                name = (cmd or [""])[0]
                if record:
                    self._record(p, cmd)
                # Ray's workers, and apart from them vLLM's engine core: a child of the
                # engine-stage actor whose size is the engine's (weights, KV cache), not the pool's.
                if not name.startswith(("ray::", "VLLM::")):
                    continue
                rss = p.memory_info().rss
                total += rss
                if name.startswith("VLLM::"):
                    core = max(core, rss)
                elif rss > largest:
                    largest, title = rss, name
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if largest > self.worker:
            self.worker, self.worker_name = largest, title
        self.engine_core = max(self.engine_core, core)
        self.workers = max(self.workers, total)
        vm = psutil.virtual_memory()
        self.node = max(self.node, vm.total - vm.available)
        self.cpu.append((time.time(), busy_cpu_s()))
        now = time.time() - self._started
        if now - self._last >= self.every:
            self._last = now
            self.timeline.append([round(now), round(driver / 2**20), round(largest / 2**20), title,
                                  round(core / 2**20), round((vm.total - vm.available) / 2**20),
                                  round((anonymous_bytes(self.pid) or 0) / 2**20)])  # fmt: skip
        try:  # a server too busy to answer within the call's timeout: no count in this sample
            self.requests.append((time.time(), int(self.server.stats()["requests"])))
        except OSError:
            self.missed += 1

    def requests_at(self, t: float) -> int:
        """Requests the server had received at wall time t (the last sample at or before it)."""
        before = [n for ts, n in self.requests if ts <= t]
        return before[-1] if before else 0

    def cpu_share(self, start: float, end: float) -> float | None:
        """The share of the node's cores that worked between two wall times (1.0: all of them)."""
        inside = [(ts, c) for ts, c in self.cpu if start <= ts <= end]
        if len(inside) < 2:
            return None
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return round((c1 - c0) / ((t1 - t0) * psutil.cpu_count()), 3)

    def cpu_by_process(self, start: float, end: float, top: int = 12) -> dict[str, float]:
        """CPU seconds per part of the run between two wall times (within `cpu_every`), largest
        first."""
        used: dict[str, float] = {}
        for ts, role, delta in self.by_process:
            if start < ts <= end:
                used[role] = used.get(role, 0.0) + delta
        return {r: round(s, 1) for r, s in sorted(used.items(), key=lambda x: -x[1])[:top]}


def _written(folder: Path) -> list[float]:
    return sorted(
        p.stat().st_mtime for p in folder.rglob("*.parquet") if not p.name.startswith("_")
    )


def overlap(run_dir: Path, stage: dict, sampler: Sampler) -> dict:
    """How much of the judge's work the scoring phase did while the engine was still answering:
    the judge requests the server had received when the last block of answers was written, as a
    share of the phase's judge requests (0: one after the other). Also when the first and last
    files of verdicts were written: a phase whose writer streams writes its first long before
    the end."""
    answers = _written(run_dir / "round-1" / "student")
    verdicts = _written(run_dir / "round-1" / "judge")
    end = stage["finished_at"]
    start = end - stage["seconds"]
    if not answers:
        return {"answer_blocks": 0, "overlap": None}
    at_start, at_last, at_end = (sampler.requests_at(t) for t in (start, answers[-1], end))
    asked = [t for t, k in sampler.requests if start <= t <= end and k > at_start]
    return {
        "answer_blocks": len(answers),
        "first_answers_after_s": round(answers[0] - start, 1),
        "last_answers_after_s": round(answers[-1] - start, 1),
        "first_judge_request_after_s": round(asked[0] - start, 1) if asked else None,
        "verdict_files": len(verdicts),
        "first_verdicts_written_after_s": round(verdicts[0] - start, 1) if verdicts else None,
        "last_verdicts_written_after_s": round(verdicts[-1] - start, 1) if verdicts else None,
        "judge_requests": at_end - at_start,
        "cpu_busy_share": sampler.cpu_share(start, end),
        "cpu_s_by_process": sampler.cpu_by_process(start, end),
        "overlap": round((at_last - at_start) / max(1, at_end - at_start), 3),
    }


ROWS_KEYS = ("rows_in", "rows", "items", "scored", "size")  # what each stage's state calls its rows


def stage_figures(state: dict) -> dict:
    """Each stage's rows, seconds and rows/s, from the run's state.json."""
    out = {}
    for name, v in state["stages"].items():
        rows = next((v[k] for k in ROWS_KEYS if isinstance(v.get(k), int)), None)
        seconds = round(v.get("seconds") or 0.0, 1)
        rate = round(rows / seconds, 1) if rows and seconds else None
        out[name] = {"rows": rows, "seconds": seconds, "rows_per_s": rate}
    return out


def one_size(
    rows: int, work: Path, server: LocalOracle, model: str, encoder: str, env: dict, args
) -> dict:
    run_dir = work / f"run-{rows}"
    measured = run_dir / "measured.json"
    if args.reuse and measured.exists():  # a finished run of an earlier invocation (--keep)
        print(f"reusing the run of {rows:,} rows measured in {run_dir}", file=sys.stderr)
        return json.loads(measured.read_text())
    pool = work / f"pool-{rows}.jsonl"
    write_pool(pool, rows)
    config = run_config(run_dir, pool, server.base_url, model, encoder, rows, args)
    cfg = work / f"run-{rows}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    spilled_before = spilled_mb()
    started = time.perf_counter()
    driver = subprocess.Popen([sys.executable, "-m", "tapir_ray.cli", "run", str(cfg)], cwd=REPO,
                              env=env)  # fmt: skip
    with Sampler(driver.pid, server) as sampled:
        try:
            code = driver.wait(timeout=args.time_limit)
        except subprocess.TimeoutExpired:  # --time-limit: stop the run as a user's Ctrl-C would
            driver.send_signal(signal.SIGINT)
            interrupted = time.perf_counter()
            try:
                # how long the driver took to exit after Ctrl-C (None: killed after 120 s)
                exit_code = driver.wait(timeout=120)
                stop = {"exit_after_sigint_s": round(time.perf_counter() - interrupted, 1),
                        "exit_code": exit_code}  # fmt: skip
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait()
                stop = {"exit_after_sigint_s": None, "exit_code": "killed after 120 s"}
            code = None
    wall = time.perf_counter() - started
    if code is None:
        return {**stopped(rows, run_dir, wall, sampled, spilled_before), **stop}
    if code != 0:
        sys.exit(f"the run of {rows:,} rows failed ({code}): {run_dir}")
    state = json.loads((run_dir / "state.json").read_text())
    stages = stage_figures(state)
    phase = state["stages"].get("round-1/student_judge", {})
    candidates = state["stages"].get("round-1/student_in", {}).get("rows")
    result = {
        "pool": rows,
        "candidates": candidates,
        "completed": True,
        "round_size": state["rounds"]["1"].get("size"),
        "wall_s": round(wall, 1),
        "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
        "stages": stages,
        "scoring_phase": {
            "seconds": stages["round-1/student_judge"]["seconds"],
            "candidates_per_s": round(candidates / phase["seconds"], 1)
            if candidates and phase.get("seconds")
            else None,
            **overlap(run_dir, phase, sampled),
            "request_count_samples_missed": sampled.missed,
        },
        **memory_figures(sampled, spilled_before),
        "config": {k: config[k] for k in ("student", "oracle", "train")},
    }
    measured.write_text(json.dumps(result, indent=2) + "\n")
    return result


def memory_figures(sampled: Sampler, spilled_before: float) -> dict:
    return {
        "peak_rss_driver_mb": round(sampled.driver / 2**20),
        "peak_anon_driver_mb": round(sampled.driver_anon / 2**20),
        "peak_rss_worker_mb": round(sampled.worker / 2**20),
        "peak_rss_worker_process": sampled.worker_name,
        "peak_anon_worker_mb": round(sampled.worker_anon / 2**20),
        "peak_anon_worker_process": sampled.worker_anon_name,
        "peak_rss_engine_core_mb": round(sampled.engine_core / 2**20),
        "peak_rss_workers_total_mb": round(sampled.workers / 2**20),
        "peak_node_memory_in_use_mb": round(sampled.node / 2**20),
        "object_store_spilled_mb": spilled_mb() - spilled_before,
        "peak_object_store_mb": round(sampled.store),
        "memory_timeline": {"columns": TIMELINE, "rows": sampled.timeline},
    }


def stopped(rows: int, run_dir: Path, wall: float, sampled: Sampler, spilled_before: float) -> dict:
    """A run stopped at --time-limit: the stages it finished and its memory up to then."""
    state_file = run_dir / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"stages": {}}
    finished = {k: v for k, v in state["stages"].items() if v.get("status") == "done"}
    return {"pool": rows, "completed": False, "stopped_after_s": round(wall, 1),
            "stage_seconds": {k: v["seconds"] for k, v in stage_figures({"stages": finished}).items()},
            "answers_written": storage.parquet_rows(str(run_dir / "round-1" / "student")),
            "judge_requests": sampled.requests[-1][1] if sampled.requests else None,
            **memory_figures(sampled, spilled_before)}  # fmt: skip


def busy_cpu_s() -> float:
    """CPU seconds the node's cores have worked since boot, all together (not idle, waiting for
    I/O or taken by the hypervisor; Linux counts guest time inside user time)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def alone(rows: int, work: Path, server: LocalOracle) -> dict:
    """The scoring phase's two halves, each alone on the same cluster after the run: the student
    engine on the phase's candidates (start-up included) and the judge on the phase's own
    requests, with a fresh cache so every one is sent; each writes its output to Parquet as the
    phase does. Their larger time is what a perfectly overlapped phase would take. Also the CPU
    seconds each used, all the node's cores together and by process."""
    from tapir_ray import frames
    from tapir_ray.config import parse_config
    from tapir_ray.oracle import prompts as P
    from tapir_ray.oracle.ledger import Ledger
    from tapir_ray.oracle.stage import oracle_map
    from tapir_ray.student import answer

    run_dir, out = work / f"run-{rows}", work / f"alone-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = parse_config(yaml.safe_load((work / f"run-{rows}.yaml").read_text()))
    candidates = ray.data.read_parquet(str(run_dir / "round-1" / "student_in"))
    with Sampler(os.getpid(), server) as sampled:
        started, cpu, wall = time.perf_counter(), busy_cpu_s(), time.time()
        answers, _ = answer(candidates.select_columns(["id", "messages"]), cfg.student,
                            run_dir=str(out), round_=1, rows=storage.parquet_rows(str(run_dir / "round-1" / "student_in")))  # fmt: skip
        frames.write_as_it_goes(answers, str(out / "student"))
        student_s, student_cpu = time.perf_counter() - started, busy_cpu_s() - cpu
    student_by_process = sampled.cpu_by_process(wall, float("inf"))
    requests = ray.data.read_parquet(str(run_dir / "round-1" / "judge")).select_columns(
        ["id", "messages"]
    )
    total = requests.count()
    judge = cfg.curriculum.tapir.judge
    prefill = cfg.oracle.endpoint("judge").continue_final_message
    with Sampler(os.getpid(), server) as sampled:
        started, cpu, wall = time.perf_counter(), busy_cpu_s(), time.time()
        verdicts = oracle_map(
            requests, role="judge", endpoint=cfg.oracle.endpoint("judge"), base_url=server.base_url,
            run_dir=str(out), round_=1, params=P.verdict_params(judge, prefill), ledger=Ledger.remote(None, None),
            actors=cfg.oracle.actors, cpus_per_actor=cfg.oracle.cpus_per_actor, nice=cfg.oracle.nice,
            batch_size=max(8, min(64, math.ceil(total / (4 * cfg.oracle.actors)))),
        )  # fmt: skip
        frames.write_as_it_goes(verdicts, str(out / "judge"))
        judge_s, judge_cpu = time.perf_counter() - started, busy_cpu_s() - cpu
    judge_by_process = sampled.cpu_by_process(wall, float("inf"))
    return {"student_alone_s": round(student_s, 1), "judge_alone_s": round(judge_s, 1),
            "judge_alone_verdicts": storage.parquet_rows(str(out / "judge")),
            "student_alone_cpu_s": round(student_cpu, 1), "judge_alone_cpu_s": round(judge_cpu, 1),
            "cpus": psutil.cpu_count(), "student_alone_cpu_s_by_process": student_by_process,
            "judge_alone_cpu_s_by_process": judge_by_process}  # fmt: skip


def plot(runs: list[dict], path: Path) -> None:
    """Rows/s of each stage at each pool size (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        n for n in runs[0]["stages"] if any(r["stages"].get(n, {}).get("rows_per_s") for r in runs)
    ]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(runs)
    for k, r in enumerate(runs):
        rates = [r["stages"].get(n, {}).get("rows_per_s") or 0 for n in names]
        ax.bar(
            [i + k * width for i in range(len(names))], rates, width, label=f"{r['pool']:,} rows"
        )
    ax.set_xticks(
        [i + width * (len(runs) - 1) / 2 for i in range(len(names))], names, rotation=35, ha="right"
    )
    ax.set_yscale("log")
    ax.set_ylabel("rows/s")
    ax.set_title("One TAPIR round per pool size: rows/s per stage (2 CPU cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(runs: list[dict], command: str) -> dict:
    """The results file: every size's figures, and the largest size's against the next smaller
    one (1,000,000 rows against 100,000 when both ran)."""
    out = {"benchmark": "round_scale", "command": command, "device": device_name(),
           "ray": ray.__version__, "runs": runs}  # fmt: skip
    completed = [r for r in runs if r["completed"]]  # not those stopped at --time-limit
    if len(completed) > 1:
        first, last = sorted(completed, key=lambda r: r["pool"])[-2:]
        out["ratios_of"] = [first["pool"], last["pool"]]
        out["pool_ratio"] = round(last["pool"] / first["pool"], 1)
        out["rss_ratio_driver"] = round(
            last["peak_rss_driver_mb"] / max(1, first["peak_rss_driver_mb"]), 2
        )
        out["rss_ratio_worker"] = round(
            last["peak_rss_worker_mb"] / max(1, first["peak_rss_worker_mb"]), 2
        )
        if first.get("peak_anon_driver_mb") and last.get("peak_anon_driver_mb"):
            out["anon_ratio_driver"] = round(
                last["peak_anon_driver_mb"] / first["peak_anon_driver_mb"], 2
            )
        if first.get("peak_anon_worker_mb") and last.get("peak_anon_worker_mb"):
            out["anon_ratio_worker"] = round(
                last["peak_anon_worker_mb"] / first["peak_anon_worker_mb"], 2
            )
        out["wall_ratio"] = round(last["wall_s"] / first["wall_s"], 2)
    # The largest size whose halves were timed alone (--alone can be limited to smaller sizes).
    timed = [r for r in completed if r["scoring_phase"].get("overlap_ratio") is not None]
    out["overlap_ratio"] = timed[-1]["scoring_phase"]["overlap_ratio"] if timed else None
    out["overlap_ratio_pool"] = timed[-1]["pool"] if timed else None
    out["overlap_ratio_cpu"] = (
        timed[-1]["scoring_phase"].get("overlap_ratio_cpu") if timed else None
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument(
        "--round-share", type=float, default=0.01, help="N_1 as a share of the pool"
    )
    parser.add_argument("--max-tokens", type=int, default=8, help="student answer length")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument(
        "--encoder", choices=["tiny", "minilm"], default="tiny",
        help="sentence encoder: a tiny random-weight one (tapir_ray.assets.tiny_encoder) or the bundled MiniLM",
    )  # fmt: skip
    parser.add_argument("--keep", default=None, help="keep the runs under DIR")
    parser.add_argument(
        "--reuse", action="store_true",
        help="with --keep: a size whose run an earlier invocation finished and measured is not run again",
    )  # fmt: skip
    parser.add_argument(
        "--alone", type=int, nargs="*", default=None, metavar="ROWS",
        help="also time the student engine alone and the judge alone on each run's scoring phase "
             "(only on the sizes named, if any are)",
    )  # fmt: skip
    parser.add_argument(
        "--time-limit", type=float, default=None, metavar="SECONDS",
        help="stop each run after this long and record what it measured until then (the stages "
             "it finished, its memory): a look at the start of a long run",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="round-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_llama(config=TINY_LLAMA_VLLM)
    encoder = tiny_encoder() if args.encoder == "tiny" else "bundled:all-minilm-l6-v2"
    ensure_ray()  # one cluster: each run attaches to it, as a Ray Job's driver would
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = (
        f"python benchmarks/round_scale.py --rows {' '.join(map(str, args.rows))} "
        f"--round-share {args.round_share} --max-tokens {args.max_tokens} --cpus {args.cpus} "
        f"--encoder {args.encoder}"
        + ("" if args.alone is None else " --alone" + "".join(f" {n}" for n in args.alone))
        + ("" if args.time_limit is None else f" --time-limit {args.time_limit:g}")
    )
    runs = []
    nice = OracleConfig().nice  # a remote provider's stand-in: the actors' priority
    with LocalOracle("--backend", "scripted", "--latency-ms", "5-20", nice=nice) as server:
        for rows in args.rows:
            run = one_size(rows, work, server, model, encoder, env, args)
            timed = args.alone is not None and (not args.alone or rows in args.alone)
            timed = timed and run["completed"]
            if timed and "student_alone_s" not in run.get("scoring_phase", {}):
                run["scoring_phase"].update(alone(rows, work, server))
                (work / f"run-{rows}" / "measured.json").write_text(
                    json.dumps(run, indent=2) + "\n"
                )
            phase = run.get("scoring_phase", {})
            if phase.get("student_alone_s"):
                # The phase against its halves alone: 1.0 is perfect overlap, 2.0 one after the other.
                phase["overlap_ratio"] = round(
                    phase["seconds"] / max(phase["student_alone_s"], phase["judge_alone_s"]), 2
                )
                if phase.get("student_alone_cpu_s") is not None:
                    # Both halves' CPU work on the node's cores: the phase can take no less.
                    phase["cpu_bound_s"] = round(
                        (phase["student_alone_cpu_s"] + phase["judge_alone_cpu_s"]) / phase["cpus"],
                        1,
                    )
                    floor = max(
                        phase["cpu_bound_s"], phase["student_alone_s"], phase["judge_alone_s"]
                    )
                    phase["overlap_ratio_cpu"] = round(phase["seconds"] / floor, 2)
            runs.append(run)
            print(json.dumps(run), file=sys.stderr, flush=True)
            write_results(
                args.out, report(runs, command)
            )  # after every size: a long run keeps what it measured
    runs = [r for r in runs if r["completed"]]  # a run stopped at --time-limit: in the file only
    if not runs:
        return
    plot(runs, args.out.with_suffix(".png"))
    print_table(
        ["pool", "wall s", "scoring s", "cand./s", "overlap", "driver MB", "worker MB", "worker anon MB",
         "engine core MB", "workers MB"],
        [[r["pool"], r["wall_s"], r["scoring_phase"]["seconds"], r["scoring_phase"]["candidates_per_s"],
          r["scoring_phase"]["overlap"], r["peak_rss_driver_mb"], r["peak_rss_worker_mb"],
          r.get("peak_anon_worker_mb", ""), r.get("peak_rss_engine_core_mb", ""),
          r["peak_rss_workers_total_mb"]] for r in runs],
    )  # fmt: skip
    stage_names = list(dict.fromkeys(k for r in runs for k in r["stage_seconds"]))
    print_table(["stage", *(f"{r['pool']:,}" for r in runs)],
                [[s, *(r["stage_seconds"].get(s, "") for r in runs)] for s in stage_names])  # fmt: skip


if __name__ == "__main__":
    main()
