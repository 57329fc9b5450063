"""CPU per oracle request: one OracleClient against the scripted server, limits that do not bind.

    python benchmarks/oracle_client_cpu.py [--requests 3000] [--concurrency 64] [--arrival-rps R]

At pool scale the judge's cost on a small cluster is CPU, not the endpoint's limits: every verdict
passes through the client's event loop, the endpoint's limiter actor and (here) the scripted
server. The client runs in this process (its event loop, as in an oracle actor) and sends
G-Eval-shaped judge requests (a prefilled score, 8 tokens, 20 top log-probabilities) with
`max_concurrency` in flight to `tapir-ray oracle serve --backend scripted --latency-ms 5-20`.
Measured: requests/s, and CPU milliseconds per request of this process (the client), of the
limiter actor and of the server (user + system time, from /proc). All requests are there at once,
or with `--arrival-rps R` they arrive R a second, as a round's judge requests do while the student
engine writes its answers (a trickle: the client has fewer requests to reserve together).
Results: benchmarks/results/oracle_client_cpu.json (or --out) and a line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import psutil
import ray
from common import command_line, device_name, print_table, write_results

from tapir_ray.config import EndpointConfig
from tapir_ray.oracle.cache import ResponseCache
from tapir_ray.oracle.client import Answer, OracleClient
from tapir_ray.oracle.limiter import limiter_for
from tapir_ray.oracle.local import LocalOracle

RESULTS = Path(__file__).parent / "results" / "oracle_client_cpu.json"
PARAMS = {"temperature": 0.0, "max_tokens": 8, "logprobs": True, "top_logprobs": 20}


def judge_messages(i: int) -> list[dict]:
    answer = "The answer explains the idea clearly and gives an example. " * 15
    return [
        {"role": "user", "content": f"Rate answer {i} from 1 to 10.\n{answer}"},
        {"role": "assistant", "content": "Score: "},
    ]


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--arrival-rps", type=float, default=None, help="requests arriving a second"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    with LocalOracle("--backend", "scripted", "--latency-ms", "5-20") as server:
        ep = EndpointConfig(base_url=server.base_url, model="local", api_key_env=None,
                            rpm=10**7, tpm=10**10, max_concurrency=args.concurrency)  # fmt: skip
        limiter = limiter_for(f"{server.base_url}|cpu", ep.rpm, ep.tpm)
        limiter_pid = ray.get(limiter.__ray_call__.remote(lambda self: __import__("os").getpid()))
        procs = {
            "client": psutil.Process(),
            "limiter": psutil.Process(limiter_pid),
            "server": psutil.Process(server.proc.pid),
        }

        async def run() -> list:
            client = OracleClient(
                ep, server.base_url, limiter=limiter, cache=ResponseCache(tempfile.mkdtemp())
            )

            async def one(i: int):
                if args.arrival_rps:
                    await asyncio.sleep(i / args.arrival_rps)
                return await client.call(str(i), "judge", judge_messages(i), PARAMS)

            try:
                return await asyncio.gather(*(one(i) for i in range(args.requests)))
            finally:
                await client.aclose()

        before = {k: cpu_seconds(p) for k, p in procs.items()}
        started = time.perf_counter()
        results = asyncio.run(run())
        wall = time.perf_counter() - started
        used = {k: cpu_seconds(p) - before[k] for k, p in procs.items()}
    answered = sum(isinstance(r, Answer) for r in results)
    report = {
        "benchmark": "oracle_client_cpu",
        "command": command_line("oracle_client_cpu.py", args),
        "device": device_name(),
        "requests": args.requests,
        "arrival_rps": args.arrival_rps,
        "answered": answered,
        "wall_s": round(wall, 2),
        "requests_per_s": round(args.requests / wall, 1),
        **{f"cpu_ms_per_request_{k}": round(1e3 * v / args.requests, 2) for k, v in used.items()},
    }
    write_results(args.out, report)
    print_table(
        ["requests", "answered", "req/s", "client ms", "limiter ms", "server ms"],
        [[args.requests, answered, report["requests_per_s"], report["cpu_ms_per_request_client"],
          report["cpu_ms_per_request_limiter"], report["cpu_ms_per_request_server"]]],
    )  # fmt: skip


if __name__ == "__main__":
    main()
