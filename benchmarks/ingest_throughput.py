"""Ingest throughput and driver memory on generated JSONL pools.

    python benchmarks/ingest_throughput.py --rows 100000 1000000 [--cpus 2]

For each size it writes a pool (real Alpaca rows, made unique, plus 1 % exact duplicates and 0.1 %
bad lines), runs `tapir_ray.ingest.ingest` on a local Ray cluster, samples the driver's resident
memory every 50 ms and the cluster's object store in use every 0.5 s, and records rows/s, the
driver's peak RSS growth over its baseline and the store's peak (`object_store_peak_mb`). Results
go to benchmarks/results/ingest_throughput.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray

from tapir_ray.assets import resolve_data
from tapir_ray.config import PoolConfig
from tapir_ray.ingest import ingest
from tapir_ray.runtime import configure_data

RESULTS = Path(__file__).parent / "results" / "ingest_throughput.json"


def write_pool(path: Path, rows: int, seed: int = 0) -> dict[str, int]:
    """A JSONL pool of `rows` lines: unique rows, 1 % duplicates, 0.1 % unparsable lines."""
    rng = random.Random(seed)
    base = json.loads(Path(resolve_data("bundled:alpaca-5k")).read_text())
    expected = {"duplicates": 0, "quarantined": 0}
    written: list[str] = []
    with path.open("w", encoding="utf-8") as f:
        for n in range(rows):
            roll = rng.random()
            if roll < 0.001:
                f.write("{this line is not json\n")
                expected["quarantined"] += 1
                continue
            if roll < 0.011 and written:
                f.write(rng.choice(written))
                expected["duplicates"] += 1
                continue
            rec = dict(base[n % len(base)])
            rec["instruction"] = f"{rec['instruction']} (variant {n})"
            line = json.dumps(rec) + "\n"
            if len(written) < 1000:
                written.append(line)
            f.write(line)
    return expected


class PeakRSS:
    """Samples this process's RSS in a thread; `peak - baseline` is what the work added. With
    `store_every` (s), also the cluster's object store in use (`store_peak_mb`)."""

    def __init__(self, interval: float = 0.05, store_every: float | None = None):
        self.proc = psutil.Process()
        self.interval = interval
        self.baseline = self.peak = self.proc.memory_info().rss
        self.store_every, self._store_last, self.store_peak_mb = store_every, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        self.peak = max(self.peak, self.proc.memory_info().rss)
        if self.store_every is not None and time.time() - self._store_last >= self.store_every:
            try:  # run as a script, benchmarks/ is on the path; imported by a test, it is a package
                from common import object_store_used_mb
            except ImportError:
                from benchmarks.common import object_store_used_mb

            self._store_last = time.time()
            self.store_peak_mb = max(self.store_peak_mb, object_store_used_mb() or 0.0)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    configure_data()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up: Ray Data's first execution imports and caches code on the driver; exclude it.
        warm = Path(tmp) / "warm.jsonl"
        write_pool(warm, 1000)
        ingest(PoolConfig(paths=[str(warm)], decontaminate_against=[]), f"{tmp}/warm-out")
        for rows in args.rows:
            pool = Path(tmp) / f"pool-{rows}.jsonl"
            expected = write_pool(pool, rows)
            size_mb = pool.stat().st_size / 2**20
            with PeakRSS(store_every=0.5) as rss:
                summary = ingest(PoolConfig(paths=[str(pool)]), f"{tmp}/out-{rows}")
            assert summary.reconciles, summary
            assert summary.quarantined == expected["quarantined"], (summary, expected)
            row = {
                "rows": rows,
                "file_mb": round(size_mb, 1),
                "kept": summary.kept,
                "duplicates": summary.duplicates,
                "quarantined": summary.quarantined,
                "seconds": round(summary.seconds, 1),
                "rows_per_s": round(rows / summary.seconds),
                "driver_rss_baseline_mb": round(rss.baseline / 2**20),
                "driver_rss_peak_mb": round(rss.peak / 2**20),
                "driver_rss_growth_mb": round(rss.growth_mb),
                # Ray's object store in use, sampled every 0.5 s: what the ingest held there
                "object_store_peak_mb": round(rss.store_peak_mb),
            }
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
            pool.unlink()
    report = {
        "benchmark": "ingest_throughput",
        "command": "python benchmarks/ingest_throughput.py --rows " + " ".join(map(str, args.rows)),
        "cpus": args.cpus,
        "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "ray": ray.__version__,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\n{'rows':>10} {'file MB':>8} {'seconds':>8} {'rows/s':>9} {'driver peak RSS':>16} {'growth':>8}"
    )
    for r in results:
        print(
            f"{r['rows']:>10,} {r['file_mb']:>8} {r['seconds']:>8} {r['rows_per_s']:>9,} "
            f"{r['driver_rss_peak_mb']:>13} MB {r['driver_rss_growth_mb']:>5} MB"
        )


if __name__ == "__main__":
    main()
