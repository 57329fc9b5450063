"""Batch mode at scale: N requests through the Batch API of `tapir-ray oracle serve` (scripted
backend, each batch's processing time simulated), the driver SIGKILLed while its batches are in
flight and resumed to the end.

Reports what the ledger charged against what the same requests cost online (their usage at the
endpoint's online prices, read from the response cache), the number of requests the server
executed more than once across the kill (goal 0), and batches submitted against batches recorded.

    python benchmarks/oracle_batch.py --requests 100000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import command_line, device_name, print_table, write_results  # noqa: E402
from tapir_ray.oracle.cache import ResponseCache  # noqa: E402

PRICES = {"price_input_per_m": 2.5, "price_output_per_m": 10.0}  # an online list price, USD per 1M

DRIVER = """
import json, sys, time, ray
from tapir_ray.config import EndpointConfig
from tapir_ray.oracle.ledger import Ledger
from tapir_ray.oracle.stage import oracle_map
url, run_dir, n, per_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prices = json.loads(sys.argv[5])
ray.init(address="auto", log_to_driver=False)
ep = EndpointConfig(base_url=url, model="local", api_key_env=None, **prices,
                    batch={"max_requests": per_file, "poll_s": 1.0, "poll_max_s": 2.0})
rows = ray.data.range(n).map(lambda r: {"id": f"b{r['id']}", "messages": json.dumps(
    [{"role": "user", "content": f"Summarise batch benchmark item {r['id']} in one sentence."}])})
ledger = Ledger.remote(run_dir + "/ledger.json", None, cache_root=run_dir + "/oracle-cache")
t0 = time.perf_counter()
out = oracle_map(rows, role="teacher", endpoint=ep, base_url=url, run_dir=run_dir, round_=0,
                 params={"max_tokens": 48}, ledger=ledger, actors=2, stage="teacher",
                 mode="batch").count()
ray.get(ledger.flush.remote())
print(json.dumps({"rows_out": out, "seconds": time.perf_counter() - t0}), flush=True)
"""


def stats(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=30) as r:
        return json.loads(r.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--per-file", type=int, default=25_000, help="requests per batch file")
    p.add_argument("--batch-seconds", type=float, default=30.0, help="simulated processing time")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/oracle_batch.json"))
    args = p.parse_args()

    import ray

    from tapir_ray.oracle.local import LocalOracle

    run_dir = tempfile.mkdtemp(prefix="tapir-batch-bench-")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    server_args = ("--backend", "scripted", "--batch-seconds", str(args.batch_seconds))
    with LocalOracle(*server_args) as server:
        cmd = [sys.executable, "-c", DRIVER, server.base_url, run_dir, str(args.requests),
               str(args.per_file), json.dumps(PRICES)]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        records = Path(run_dir) / "oracle-batches"
        while not [f for f in records.glob("*.json") if json.loads(f.read_text()).get("batch_id")]:
            if proc.poll() is not None:
                raise SystemExit("the driver ended before a batch was recorded")
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)  # batches are in flight at the provider
        proc.wait()
        killed_at = time.perf_counter() - t0
        before_resume = stats(server.port)
        print(
            f"killed after {killed_at:.0f} s with {before_resume['batches']} batch(es) submitted; resuming"
        )
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        result = json.loads(done.stdout.strip().splitlines()[-1])
        wall = time.perf_counter() - t0
        final = stats(server.port)
    ray.shutdown()

    ledger = json.loads((Path(run_dir) / "ledger.json").read_text())
    online = 0.0
    for _, entry in ResponseCache(run_dir + "/oracle-cache").entries():
        usage = entry["usage"]
        online += (usage["prompt_tokens"] * PRICES["price_input_per_m"]
                   + usage["completion_tokens"] * PRICES["price_output_per_m"]) / 1e6  # fmt: skip
    recorded = [f for f in records.glob("*.json") if not f.name.endswith(".done.json")]
    report = {
        "benchmark": "oracle_batch",
        "command": command_line("oracle_batch.py", args),
        "device": device_name(),
        "requests": args.requests,
        "rows_out": result["rows_out"],
        "batch_lines_executed": final["batch_lines"],
        "repeats": final["repeats"],
        "batches_submitted": final["batches"],
        "batches_recorded": len(recorded),
        "batches_before_kill": before_resume["batches"],
        "ledger_usd": ledger["spent_usd"],
        "online_usd_same_requests": round(online, 6),
        "cost_ratio_batch_vs_online": round(ledger["spent_usd"] / online, 4) if online else None,
        "killed_after_s": round(killed_at, 1),
        "wall_s": round(wall, 1),
        "resumed_run_s": round(result["seconds"], 1),
        "simulated_batch_seconds": args.batch_seconds,
    }
    print_table(["requests", "rows out", "executed", "repeats", "batches", "ledger USD", "online USD", "ratio"],
                [[args.requests, result["rows_out"], final["batch_lines"], final["repeats"], final["batches"],
                  report["ledger_usd"], report["online_usd_same_requests"], report["cost_ratio_batch_vs_online"]]])  # fmt: skip
    write_results(Path(args.out), report)


if __name__ == "__main__":
    main()
