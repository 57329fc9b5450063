"""The newcomer's path, timed: a fresh clone's `make env` and `make demo`, and where the run went.

    python benchmarks/demo_wall.py [--keep DIR] [--fresh-models]

Clones this repository (its committed HEAD) into a temporary folder, runs `make env` (the
environment `make demo` would create) and then `make demo`, each timed by the wall clock, and
reads the demo's run directory for each stage's seconds. `--fresh-models` also empties the model
cache first, so the one-time conversion of the bundled model is in the figure, as on a new
machine. Nothing else should run on the machine meanwhile. Results:
benchmarks/results/demo.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, device_name, print_table, write_results

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "demo.json"


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); its output: {log}")
    return seconds


def stage_seconds(run_dir: Path) -> dict[str, float]:
    state = json.loads((run_dir / "state.json").read_text())
    return {name: s["seconds"] for name, s in state["stages"].items() if s.get("seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", default=None, help="clone into DIR and keep it")
    parser.add_argument("--fresh-models", action="store_true", help="empty the model cache first")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    clone = Path(args.keep or tempfile.mkdtemp(prefix="tapir-demo-"))
    if clone.exists():
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    if args.fresh_models:
        cache = Path(os.environ.get("TAPIR_RAY_CACHE", Path.home() / ".cache" / "tapir-ray"))
        shutil.rmtree(cache / "models", ignore_errors=True)
    env_s = timed(["make", "env"], clone, clone / "env.log")
    run_s = timed(["make", "demo"], clone, clone / "demo.log")
    stages = stage_seconds(clone / "runs" / "demo")
    tail = (clone / "demo.log").read_text().splitlines()
    table = [line for line in tail if line.startswith("|")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, text=True,
                            capture_output=True).stdout.strip()  # fmt: skip
    report = {
        "benchmark": "demo",
        "command": command_line("demo_wall.py", args),
        "commit": commit,
        "device": device_name(),
        "what": "git clone; make env; make demo (jobs/demo_cpu.yaml), each by the wall clock",
        "env_wall_s": round(env_s, 1),
        "run_wall_s": round(run_s, 1),
        "fresh_model_cache": args.fresh_models,
        "stage_seconds": stages,
        "stage_seconds_total": round(sum(stages.values()), 1),
        "report_table": table,
    }
    write_results(Path(args.out), report)
    print_table(["", "seconds"], [["make env", round(env_s, 1)], ["make demo", round(run_s, 1)]])
    if not args.keep:
        shutil.rmtree(clone, ignore_errors=True)


if __name__ == "__main__":
    main()
