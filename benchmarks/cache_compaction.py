"""The response cache's compaction at pool scale: the private memory it takes in the driver.

    python benchmarks/cache_compaction.py [--replies 2000000] [--segment 30000]

Before each oracle stage the driver merges the cache's small segments into segments of 65,536
replies (`ResponseCache.compact`). A 1M-row round leaves about 2 million replies (the judge rates
both answers of each candidate). This writes that many replies shaped like a judge's (about 160
characters of JSON each) as segments of `--segment` replies, as an actor's merges leave them, then
compacts them in a fresh process and samples its private memory (anonymous pages) every 50 ms.
Results: benchmarks/results/cache_compaction.json (or --out) and a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from common import command_line, device_name, print_table, write_results

RESULTS = Path(__file__).parent / "results" / "cache_compaction.json"

# Run in a fresh process: the figure is what compaction adds to a process that had not run it.
CHILD = """
import json, os, sys, threading, time
import pyarrow, pyarrow.parquet
from common import anonymous_bytes
from tapir_ray.oracle.cache import ResponseCache
peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous_bytes(os.getpid()) or 0)
        time.sleep(0.05)
cache = ResponseCache(sys.argv[1])
cache._read(cache._segment_files()[0])  # the modules a read loads, loaded before the figure
before = anonymous_bytes(os.getpid())
threading.Thread(target=sample, daemon=True).start()
started = time.perf_counter()
replaced = cache.compact()
seconds = time.perf_counter() - started
done.set()
print(json.dumps({"replaced_files": replaced, "seconds": round(seconds, 2), "before_mb": before / 2**20,
                  "peak_mb": max(peak[0], anonymous_bytes(os.getpid())) / 2**20,
                  "after_mb": anonymous_bytes(os.getpid()) / 2**20}))
"""


def write_segments(root: Path, replies: int, per_segment: int) -> int:
    folder = root / "segments"
    folder.mkdir(parents=True)
    files = 0
    for start in range(0, replies, per_segment):
        ids = range(start, min(replies, start + per_segment))
        keys = [hashlib.sha256(f"request {i}".encode()).hexdigest() for i in ids]
        entries = [json.dumps({"text": f"Rating: [[{i % 10 + 1}]]", "usage": {"prompt_tokens": 200 + i % 50, "completion_tokens": 4},
                               "logprobs": None, "response_id": f"chatcmpl-{i:012x}", "usd": 0.0, "refusal": False})
                   for i in ids]  # fmt: skip
        table = pa.table(
            {"key": keys, "usd": pa.array([0.0] * len(keys), pa.float64()), "entry": entries}
        )
        files += 1
        pq.write_table(table, folder / f"writer-{files:08d}-L3-n{len(keys)}.parquet")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replies", type=int, default=2_000_000)
    parser.add_argument("--segment", type=int, default=30_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "oracle-cache"
        files = write_segments(root, args.replies, args.segment)
        here = Path(__file__).parent
        done = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True,
                              cwd=here, env={**__import__("os").environ, "PYTHONPATH": f"{here}:{here.parent}"})  # fmt: skip
        if done.returncode:
            sys.exit(done.stderr)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        after = sorted((root / "segments").glob("*.parquet"))
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in after)
    report = {
        "benchmark": "cache_compaction",
        "command": command_line("cache_compaction.py", args),
        "device": device_name(),
        "measured_at": time.strftime("%Y-%m-%d"),
        "replies": args.replies,
        "segments_in": files,
        "segments_out": len(after),
        "replies_out": rows,
        "seconds": measured["seconds"],
        "private_memory_mb": {k: round(measured[f"{k}_mb"]) for k in ("before", "peak", "after")},
        "private_memory_added_mb": {
            "peak": round(measured["peak_mb"] - measured["before_mb"]),
            "kept": round(measured["after_mb"] - measured["before_mb"]),
        },
    }
    assert rows == args.replies, f"compaction kept {rows} of {args.replies} replies"
    write_results(args.out, report)
    print_table(["replies", "segments in", "segments out", "seconds", "private MB before", "peak", "after"],
                [[args.replies, files, len(after), measured["seconds"],
                  *report["private_memory_mb"].values()]])  # fmt: skip


if __name__ == "__main__":
    main()
