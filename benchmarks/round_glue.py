"""The glue of a TAPIR round at pool scale: every step between the model stages, on Ray Data.

    python benchmarks/round_glue.py --rows 100000 1000000 [--cpus 2]

For each size it writes a run directory as the model stages would leave it (items with teacher
answers and categories, a held-out share, student answers for every candidate, a single-mode
judge verdict for each answer, refinement answers for the plan), generated block by block on the
cluster, then times the round's glue as the run calls it: student requests, judge requests,
scores (with the judge diagnostics), the plan (exact quotas over hard/easy pools), refinement
requests and the training set. It samples the driver's resident memory (and the largest Ray
worker's) every 50 ms and records rows, seconds and rows/s per step. The model stages themselves
(student, judge, teacher, training) are not run. Results go to
benchmarks/results/round_glue.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import ray
from common import device_name, print_table, write_results
from ingest_throughput import PeakRSS as DriverRSS

from tapir_ray import frames, storage
from tapir_ray.curriculum import scoring
from tapir_ray.curriculum.scoring import write_scores
from tapir_ray.curriculum.tapir_stages import (
    ITEMS,
    JUDGE_CONTEXT,
    PLAN,
    write_plan,
    write_refine_inputs,
    write_student_inputs,
    write_train_set,
)
from tapir_ray.oracle.stage import REQUESTS
from tapir_ray.runtime import configure_data, quiet_ray_console, worker_env

RESULTS = Path(__file__).parent / "results" / "round_glue.json"
CATEGORIES = ["Math", "Coding", "Writing", "Reasoning", "Brainstorming", "Others"]
RATIOS = {"Math": 0.25, "Coding": 0.25, "Writing": 0.15, "Reasoning": 0.15, "Brainstorming": 0.1,
          "Others": 0.1}  # fmt: skip


class PeakRSS(DriverRSS):
    """The driver's peak RSS (`peak`) and the largest Ray worker's (`worker`), sampled together."""

    worker = 0

    def sample(self) -> None:
        super().sample()
        for p in psutil.process_iter(["cmdline"]):
            try:
                if (p.info["cmdline"] or [""])[0].startswith("ray::"):
                    self.worker = max(self.worker, p.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


def _coin(ids: np.ndarray, salt: str) -> np.ndarray:
    return np.array([hashlib.sha256(f"{salt}:{i}".encode()).digest()[0] / 256 for i in ids])


def _items(batch: dict) -> pa.Table:
    k = batch["id"]
    ids = np.array([f"r{i:08d}" for i in k])
    u = _coin(ids, "cat")
    cats = [CATEGORIES[min(len(CATEGORIES) - 1, int(x * len(CATEGORIES)))] for x in u]
    return pa.table({
        "id": pa.array(ids), "instruction": pa.array([f"Instruction {i}: explain item {i} step by step." for i in k]),
        "input": pa.array([""] * len(k)), "teacher": pa.array([f"A careful reference answer to {i}." * 4 for i in k]),
        "category": pa.array(cats, pa.string()), "heldout": pa.array(_coin(ids, "held") < 0.02),
    }, schema=ITEMS)  # fmt: skip


def _student(batch: pa.Table) -> pa.Table:
    return pa.table({"id": batch["id"], "response": pa.array([f"A short student answer to {i}." for i in batch["id"].to_pylist()])})  # fmt: skip


def judge_requests(run: str) -> int:
    """The judge requests of the streaming scoring phase: in a run they are built from each block
    of answers as it leaves the engine, with the judge's context carried by the student's requests
    (no join); here the answers are the synthetic ones `_student` writes."""
    answered = frames.read(f"{run}/round-1/student_in", ["id", *JUDGE_CONTEXT]).map_batches(
        lambda b: b.append_column("student", _student(b)["response"]), batch_format="pyarrow")  # fmt: skip
    requests = answered.map_batches(
        scoring.judge_requests, fn_args=("single", True), batch_format="pyarrow"
    )
    return frames.write(requests, f"{run}/round-1/judge_in", REQUESTS)


def _judged(batch: pa.Table) -> pa.Table:
    ids = batch["id"].to_pylist()
    t, s = 6 + 4 * _coin(np.array(ids), "t"), 1 + 9 * _coin(np.array(ids), "s")
    return pa.table({
        "id": pa.array([f"{i}|T" for i in ids] + [f"{i}|S" for i in ids]),
        "parsed": pa.array([json.dumps(round(float(x), 2)) for x in (*t, *s)]),
    })  # fmt: skip


def _refined(batch: pa.Table) -> pa.Table:
    return pa.table({"id": batch["id"], "response": pa.array([f"A refined answer to {i}." for i in batch["id"].to_pylist()])})  # fmt: skip


def build_run(run: str, rows: int) -> int:
    """items/, round-1/student and round-1/judge as the model stages would leave them."""
    blocks = max(4, rows // 50_000)
    items = ray.data.range(rows, override_num_blocks=blocks).map_batches(
        _items, batch_format="numpy"
    )
    frames.write(items, f"{run}/items", ITEMS)
    candidates = frames.read(f"{run}/items", ["id", "heldout"], {"heldout": pa.bool_()}).map_batches(
        lambda b: b.filter(pc.invert(b["heldout"])), batch_format="pyarrow")  # fmt: skip
    frames.write(candidates.map_batches(_student, batch_format="pyarrow"), f"{run}/round-1/student",
                 pa.schema([("id", pa.string()), ("response", pa.string())]))  # fmt: skip
    frames.write(frames.read(f"{run}/round-1/student", ["id"]).map_batches(_judged, batch_format="pyarrow"),
                 f"{run}/round-1/judge", pa.schema([("id", pa.string()), ("parsed", pa.string())]))  # fmt: skip
    return frames.rows(f"{run}/round-1/student")


def glue(run: str, candidates: int, size: int) -> list[dict]:
    steps = []

    def step(name: str, fn, rows_of: str) -> None:
        with PeakRSS() as rss:
            t = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t
        n = frames.rows(f"{run}/round-1/{rows_of}")
        steps.append({"step": name, "rows": n, "seconds": round(seconds, 2),
                      "rows_per_s": round(n / seconds) if seconds else None,
                      "peak_rss_driver_mb": round(rss.peak / 2**20), "peak_rss_worker_mb": round(rss.worker / 2**20),
                      "info": {k: out[k] for k in ("scored", "hard", "selected", "rows") if isinstance(out, dict) and k in out}})  # fmt: skip
        print(json.dumps(steps[-1]), file=sys.stderr, flush=True)

    scores = f"{run}/round-1/scores"
    step("student requests", lambda: write_student_inputs(run, 1), "student_in")
    step("judge requests", lambda: judge_requests(run), "judge_in")
    step("scores", lambda: write_scores(run, 1, "single", 1.0), "scores")
    step("plan", lambda: write_plan(run, 1, scores, size, 0.5, RATIOS, 0), "plan")
    # plan_final = the plan (no expansion: every category has enough candidates here)
    frames.write(
        frames.read(f"{run}/round-1/plan", ["id", "category", "source"]),
        f"{run}/round-1/plan_final",
        PLAN,
    )
    step("refine requests", lambda: write_refine_inputs(run, 1, {}), "refine_in")
    frames.write(frames.read(f"{run}/round-1/refine_in", ["id"]).map_batches(_refined, batch_format="pyarrow"),
                 f"{run}/round-1/refine", pa.schema([("id", pa.string()), ("response", pa.string())]))  # fmt: skip
    step(
        "training set",
        lambda: write_train_set(run, 1, f"{run}/round-1/refine", "response", {}),
        "train_set",
    )
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--round-share", type=float, default=0.3, help="N_1 as a share of the candidates"
    )
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    ray.init(
        num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
        runtime_env={"env_vars": worker_env()},  # the workers a run gets
    )  # fmt: skip
    configure_data()
    quiet_ray_console()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        build_run(f"{tmp}/warm", 2000)  # Ray Data's first executions import and cache code
        glue(f"{tmp}/warm", 0, 500)
        for rows in args.rows:
            run = f"{tmp}/run-{rows}"
            t = time.perf_counter()
            candidates = build_run(run, rows)
            print(f"{rows:,} rows written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            steps = glue(run, candidates, round(args.round_share * candidates))
            runs.append({"pool": rows, "candidates": candidates, "steps": steps,
                         "wall_s": round(sum(s["seconds"] for s in steps), 1),
                         "peak_rss_driver_mb": max(s["peak_rss_driver_mb"] for s in steps),
                         "peak_rss_worker_mb": max(s["peak_rss_worker_mb"] for s in steps)})  # fmt: skip
            storage.remove(run)
    command = (
        f"python benchmarks/round_glue.py --rows {' '.join(map(str, args.rows))} "
        f"--round-share {args.round_share} --cpus {args.cpus}"
    )
    report = {"benchmark": "round_glue", "command": command,
              "device": device_name(), "ray": ray.__version__, "runs": runs}  # fmt: skip
    if len(runs) > 1:
        first, last = runs[0], runs[-1]
        report["rss_ratio_driver"] = round(
            last["peak_rss_driver_mb"] / first["peak_rss_driver_mb"], 2
        )
        report["rss_ratio_worker"] = round(
            last["peak_rss_worker_mb"] / first["peak_rss_worker_mb"], 2
        )
        report["wall_ratio"] = round(last["wall_s"] / first["wall_s"], 2)
    write_results(args.out, report)
    print_table(["pool", "step", "rows", "seconds", "rows/s", "driver MB", "worker MB"],
                [[r["pool"], s["step"], s["rows"], s["seconds"], s["rows_per_s"], s["peak_rss_driver_mb"],
                  s["peak_rss_worker_mb"]] for r in runs for s in r["steps"]])  # fmt: skip


if __name__ == "__main__":
    main()
