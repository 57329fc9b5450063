"""Oracle throughput against enforced rate limits: our stage vs two baselines, one server, one run.

    python benchmarks/oracle_throughput.py [--requests 20000] [--rpm 3000] [--tpm 600000]
        [--latency-ms 200-800] [--actors 4] [--batch-size 64] [--sequential-requests 200]

A scripted OpenAI-compatible server (latency 200–800 ms, RPM and TPM enforced over a 60 s window,
429 + Retry-After) answers, in turn:
  ours        tapir-ray's oracle stage (Ray Data actor pool, one shared RPM+TPM limiter actor)
  heavy_tail  the same stage against a second server whose answers take 1–30 s, as long
              completions do, at the paper-scale config's 8 actors and 5,000 RPM
              (--heavy-tail-*): only a window that never waits for a batch's slowest reply
              keeps the limit busy (Little's law: ~1,300 requests in flight)
  sequential  a plain loop over the openai client, one request at a time (a bounded sample: at
              ~0.5 s a request, 20,000 would take hours; its rate is what is compared)
  ray_http    ray.data.llm's HttpRequestProcessorConfig with qps = limit / actors (its per-actor
              pacing; it has no token budget)
Each request is sized so that RPM and TPM bind together (~200 tokens: prompt + max_tokens). The
server's window is let to clear between phases. Utilisation = what the server admitted per minute
over the phase's wall time, as a share of the limit; 429s are the server's count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import ray

from tapir_ray.config import EndpointConfig
from tapir_ray.oracle.ledger import Ledger
from tapir_ray.oracle.limiter import limiter_for
from tapir_ray.oracle.local import LocalOracle
from tapir_ray.oracle.server import request_tokens
from tapir_ray.oracle.stage import oracle_map, read_dead_letters
from tapir_ray.runtime import RAY_SYSTEM_CONFIG, configure_data

RESULTS = Path(__file__).parent / "results" / "oracle_throughput.json"
TOPICS = [
    "history",
    "science",
    "cooking",
    "travel",
    "music",
    "sport",
    "finance",
    "health",
    "language",
    "art",
    "law",
    "ecology",
]


def make_messages(i: int, prompt_chars: int) -> list[dict]:
    head = f"Question {i} about {TOPICS[i % len(TOPICS)]}: explain the idea clearly. "
    return [{"role": "user", "content": (head * (prompt_chars // len(head) + 1))[:prompt_chars]}]


def request_batch(batch: dict, *, first: int, prompt_chars: int) -> dict:
    numbers = [first + int(i) for i in batch["id"]]
    return {
        "id": np.array([f"r{i}" for i in numbers], dtype=object),
        "messages": np.array(
            [json.dumps(make_messages(i, prompt_chars)) for i in numbers], dtype=object
        ),
    }


def phase_result(name: str, stats: dict, wall_s: float, sent: int, dead: int, args) -> dict:
    minutes = wall_s / 60
    return {
        "phase": name,
        "requests": sent,
        "answered": stats["ok"],
        "dead_letters": dead,
        "http_requests": stats["requests"],
        "rate_429": round(stats["rate_limited"] / max(1, stats["requests"]), 4),
        "429s": stats["rate_limited"],
        "wall_s": round(wall_s, 1),
        "achieved_rpm": round(stats["ok"] / minutes, 1),
        "achieved_tpm": round(stats["tokens_admitted"] / minutes),
        "utilization_rpm": round(stats["ok"] / minutes / args.rpm, 4),
        "utilization_tpm": round(stats["tokens_admitted"] / minutes / args.tpm, 4),
        "repeats": stats["repeats"],
        # Steady state: from the first to the last request the server admitted (no start-up).
        "steady_utilization_rpm": round(_steady(stats, stats["ok"]) / args.rpm, 4),
        "steady_utilization_tpm": round(_steady(stats, stats["tokens_admitted"]) / args.tpm, 4),
        # Where the time went: admissions per 10 s from the first (a dip is a pause or a stall).
        "admitted_per_10s": _per_10s(stats.get("admitted_per_s") or {}),
    }


def _per_10s(per_s: dict) -> list[int]:
    out: list[int] = []
    for second, n in per_s.items():
        k = int(second) // 10
        out += [0] * (k + 1 - len(out))
        out[k] += n
    return out


def _steady(stats: dict, amount: float) -> float:
    span = (stats["last_admitted"] or 0) - (stats["first_admitted"] or 0)
    return amount / (span / 60) if span > 0 else 0.0


def run_ours(
    server, args, params, tmp, *, name="ours", requests=None, actors=None, first=0
) -> dict:
    endpoint = EndpointConfig(
        base_url=server.base_url, model="local", api_key_env=None, rpm=args.rpm, tpm=args.tpm,
        max_concurrency=256, timeout_s=60,
    )  # fmt: skip
    requests, actors = requests or args.requests, actors or args.actors
    # Ray Data builds the requests, as a run builds a stage's requests, in blocks as from_items
    # makes them. The driver's first execution starts Ray Data's own actors (stats, autoscaling
    # coordinator, actor locations: ~2.7 CPU-s on this machine), which a run's oracle stages find
    # running since ingest; the clock below starts with the stage.
    ds = (
        ray.data.range(requests, override_num_blocks=min(requests, 200))
        .map_batches(request_batch, fn_kwargs={"first": first, "prompt_chars": args.prompt_chars})
        .materialize()
    )
    ledger = Ledger.remote(None, None)
    started, started_at = time.monotonic(), time.time()
    out = oracle_map(
        ds, role="answer", endpoint=endpoint, base_url=server.base_url, run_dir=tmp, round_=1, params=params,
        ledger=ledger, actors=actors, cpus_per_actor=0.25, batch_size=args.batch_size,
    ).count()  # fmt: skip
    wall = time.monotonic() - started
    dead = len(read_dead_letters(tmp))
    stats = server.stats()
    limiter = limiter_for(f"{server.base_url}|{endpoint.model}", endpoint.rpm, endpoint.tpm)
    return phase_result(name, stats, wall, requests, dead, args) | {
        # reservations granted and refused (asked again later), 429s heard, the rate's scale
        "limiter": ray.get(limiter.get_stats.remote()),
        "first_admission_after_s": round(stats["first_admitted"] - started_at, 1),
        "last_admission_before_end_s": round(started_at + wall - stats["last_admitted"], 1),
        "rows_out": out, "actors": actors, "latency_ms": server.args[server.args.index("--latency-ms") + 1],
    }  # fmt: skip


def run_heavy_tail(server_args, args, params) -> dict:
    """Its own server (answers take 1–30 s), so the uniform server's window is not shared."""
    import tempfile

    # Same request size, the paper-scale config's limit (both budgets bind together again).
    args = argparse.Namespace(**{**vars(args), "rpm": args.heavy_tail_rpm,
                                 "tpm": int(args.tpm * args.heavy_tail_rpm / args.rpm)})  # fmt: skip
    heavy = list(server_args)
    for flag, value in (
        ("--latency-ms", args.heavy_tail_latency_ms),
        ("--rpm", args.rpm),
        ("--tpm", args.tpm),
    ):
        heavy[heavy.index(flag) + 1] = str(value)
    with LocalOracle(*heavy) as server, tempfile.TemporaryDirectory() as tmp:
        out = run_ours(server, args, params, tmp, name="heavy_tail", requests=args.heavy_tail_requests,
                       actors=args.heavy_tail_actors, first=3 * 10**7)  # fmt: skip
    return out | {"rpm": args.rpm, "tpm": args.tpm}


def run_sequential(server, args, params) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=6, timeout=30)
    started = time.monotonic()
    for i in range(args.sequential_requests):
        client.chat.completions.create(
            model="local", messages=make_messages(10**7 + i, args.prompt_chars), **params
        )
    wall = time.monotonic() - started
    return phase_result("sequential", server.stats(), wall, args.sequential_requests, 0, args)


def run_ray_http(server, args, params) -> dict:
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    qps = max(1, int(args.rpm / 60 / args.actors))  # its qps is an integer per actor
    config = HttpRequestProcessorConfig(
        url=server.base_url + "/chat/completions", headers={"Authorization": "Bearer EMPTY"},
        qps=qps, concurrency=args.actors, batch_size=args.batch_size, max_retries=6,
    )  # fmt: skip
    processor = build_processor(
        config,
        preprocess=lambda row: {
            "payload": {
                "model": "local",
                "messages": make_messages(2 * 10**7 + row["id"], args.prompt_chars),
                **params,
            }
        },
        postprocess=lambda row: {"ok": "choices" in (row.get("http_response") or {})},
    )
    started = time.monotonic()
    ds = processor(ray.data.range(args.requests))
    ok = sum(1 for r in ds.iter_rows() if r["ok"])
    wall = time.monotonic() - started
    return phase_result(
        "ray_http", server.stats(), wall, args.requests, args.requests - ok, args
    ) | {"qps_per_actor": qps}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rpm", type=int, default=3000)
    parser.add_argument("--tpm", type=int, default=600_000)
    parser.add_argument("--latency-ms", default="200-800")
    parser.add_argument("--actors", type=int, default=4)
    # The recipe's cap on an oracle stage's Ray Data batch (rounds.py): what a run uses.
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sequential-requests", type=int, default=200)
    parser.add_argument("--phases", default="ours,heavy_tail,sequential,ray_http")
    parser.add_argument("--heavy-tail-latency-ms", default="1000-30000")
    parser.add_argument("--heavy-tail-requests", type=int, default=12_000)
    parser.add_argument("--heavy-tail-actors", type=int, default=8)
    parser.add_argument("--heavy-tail-rpm", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    # Size requests so both budgets bind together: prompt estimate + max_tokens ≈ tpm / rpm.
    per_request = args.tpm / args.rpm
    args.prompt_chars = int(per_request * 0.45 * 4)
    max_tokens = int(
        per_request - request_tokens({"messages": make_messages(0, args.prompt_chars)})[0]
    )
    params = {"max_tokens": max_tokens, "temperature": 0.0}

    # Logical CPUs: every phase's actors spend their time waiting on HTTP, and ray.data.llm's HTTP
    # actors each take a whole CPU (4 of them would never all start on a 2-core machine).
    # The system config of a run's local cluster (runtime.ensure_ray): up to 8 workers start at
    # once, and eight oracle actors starting do not draw Ray's warning about worker start-ups.
    ray.init(num_cpus=max(8, os.cpu_count()), include_dashboard=False, log_to_driver=False,
             _system_config=RAY_SYSTEM_CONFIG)  # fmt: skip
    configure_data()
    results = {}
    import tempfile

    server_args = (
        "--backend",
        "scripted",
        "--latency-ms",
        args.latency_ms,
        "--rpm",
        str(args.rpm),
        "--tpm",
        str(args.tpm),
    )
    with LocalOracle(*server_args) as server, tempfile.TemporaryDirectory() as tmp:
        for name in args.phases.split(","):
            server.reset_stats()
            print(f"[{name}] running ...", file=sys.stderr, flush=True)
            result = {
                "ours": lambda: run_ours(server, args, params, tmp),
                "heavy_tail": lambda: run_heavy_tail(server_args, args, params),
                "sequential": lambda: run_sequential(server, args, params),
                "ray_http": lambda: run_ray_http(server, args, params),
            }[name]()
            results[name] = result
            print(json.dumps(result), file=sys.stderr, flush=True)
            time.sleep(61)  # let the server's 60 s window clear before the next phase

    ours = results.get("ours", {})
    # Phases not run this time keep their last figures, marked with the command that made them.
    if args.out.exists():
        earlier = json.loads(args.out.read_text())
        for name, phase in earlier.get("phases", {}).items():
            if name not in results:
                results[name] = {
                    **phase,
                    "from_earlier_run": phase.get("from_earlier_run", earlier.get("command")),
                }
    report = {
        "benchmark": "oracle_throughput",
        "command": "python benchmarks/oracle_throughput.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores",
        "limits": {
            "rpm": args.rpm,
            "tpm": args.tpm,
            "latency_ms": args.latency_ms,
            "actors": args.actors,
            "tokens_per_request": round(per_request),
        },
        **{
            k: ours.get(k)
            for k in ("utilization_rpm", "utilization_tpm", "rate_429", "requests", "wall_s")
        },
        "heavy_tail": results.get("heavy_tail"),
        "phases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    head = f"{'phase':<12}{'requests':>9}{'wall s':>9}{'RPM':>9}{'util RPM':>10}{'util TPM':>10}{'steady RPM':>11}"
    print(f"\n{head}{'429s':>7}{'429 %':>7}{'dead':>6}")
    for r in results.values():
        print(
            f"{r['phase']:<12}{r['requests']:>9,}{r['wall_s']:>9}{r['achieved_rpm']:>9,.0f}{r['utilization_rpm']:>10.3f}"
            f"{r['utilization_tpm']:>10.3f}{r['steady_utilization_rpm']:>11.3f}{r['429s']:>7}"
            f"{100 * r['rate_429']:>6.2f}%{r['dead_letters']:>6}"
        )


if __name__ == "__main__":
    main()
