"""The response cache at pool scale: the private memory its compaction takes in the driver, and
what an oracle actor's cache takes while it writes its share of a round's replies.

    python benchmarks/cache_compaction.py [--replies 2000000] [--segment 30000]
                                          [--writer-replies 262144] [--group 64]

Before each oracle stage the driver merges the cache's small segments into segments of 65,536
replies (`ResponseCache.compact`). A 1M-row round leaves about 2 million replies (the judge rates
both answers of each candidate). This writes that many replies shaped like a judge's (about 160
characters of JSON each) as segments of `--segment` replies, as an actor's merges leave them, then
compacts them in a fresh process and samples its private memory (anonymous pages) every 50 ms.

An oracle actor stores the replies it receives in groups (one segment per group) and merges 16 of
its segments of a level into one of the next, up to level 3 (4,096 groups). With 8 actors, a
1M-row round's 2 million replies are 250,000 an actor. The writer phase stores `--writer-replies`
replies in groups of `--group` (262,144 in groups of 64: 4,096 groups, so its last merge takes
them all) in a fresh process, sampling its private memory the same way.
Results: benchmarks/results/cache_compaction.json (or --out) and a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from common import command_line, device_name, print_table, write_results

RESULTS = Path(__file__).parent / "results" / "cache_compaction.json"

# Each phase runs in a fresh process: the figure is what it adds to a process that had not run it.
# Its private memory is sampled every 50 ms from `start()` on; `figures()` stops and reports.
SAMPLED = """
import json, os, sys, threading, time
from common import anonymous_bytes
from tapir_ray.oracle.cache import ResponseCache
peak, done, began = [0], threading.Event(), {}
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous_bytes(os.getpid()) or 0)
        time.sleep(0.05)
def start():
    began.update(before=anonymous_bytes(os.getpid()), at=time.perf_counter())
    threading.Thread(target=sample, daemon=True).start()
def figures():
    seconds = time.perf_counter() - began["at"]
    done.set()
    return {"seconds": round(seconds, 2), "before_mb": began["before"] / 2**20,
            "peak_mb": max(peak[0], anonymous_bytes(os.getpid())) / 2**20,
            "after_mb": anonymous_bytes(os.getpid()) / 2**20}
"""

# The driver's compaction before an oracle stage.
CHILD = (
    SAMPLED
    + """
import pyarrow, pyarrow.parquet
cache = ResponseCache(sys.argv[1])
cache._read(cache._segment_files()[0])  # the modules a read loads, loaded before the figure
start()
replaced = cache.compact()
print(json.dumps({"replaced_files": replaced, **figures()}))
"""
)

# An actor's cache, storing replies as they come (put_many: one segment a group, then its merges).
WRITER = (
    SAMPLED
    + """
from cache_compaction import entry, key
replies, group = int(sys.argv[2]), int(sys.argv[3])
cache = ResponseCache(sys.argv[1])
cache.get(key(-1))  # its index, built before it writes, as an oracle stage's is
start()
for begin in range(0, replies, group):
    cache.put_many([(key(i), json.loads(entry(i))) for i in range(begin, min(replies, begin + group))])
out = figures()
# Then (not measured: a lookup decodes the segment it reads) every stored reply is found again.
out["found_of_1000"] = sum(cache.get(key(i)) is not None for i in range(0, replies, max(1, replies // 1000)))
print(json.dumps(out))
"""
)


def key(i: int) -> str:
    return hashlib.sha256(f"request {i}".encode()).hexdigest()


def entry(i: int) -> str:
    return json.dumps({"text": f"Rating: [[{i % 10 + 1}]]", "usage": {"prompt_tokens": 200 + i % 50, "completion_tokens": 4},
                       "logprobs": None, "response_id": f"chatcmpl-{i:012x}", "usd": 0.0, "refusal": False})  # fmt: skip


def child(code: str, *args: object) -> dict:
    here = Path(__file__).parent
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=here, env={**os.environ, "PYTHONPATH": f"{here}:{here.parent}"})  # fmt: skip
    if done.returncode:
        sys.exit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(measured: dict) -> tuple[dict, dict]:
    absolute = {k: round(measured[f"{k}_mb"]) for k in ("before", "peak", "after")}
    added = {"peak": round(measured["peak_mb"] - measured["before_mb"]),
             "kept": round(measured["after_mb"] - measured["before_mb"])}  # fmt: skip
    return absolute, added


def write_segments(root: Path, replies: int, per_segment: int) -> int:
    folder = root / "segments"
    folder.mkdir(parents=True)
    files = 0
    for start in range(0, replies, per_segment):
        ids = range(start, min(replies, start + per_segment))
        keys, entries = [key(i) for i in ids], [entry(i) for i in ids]
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
    parser.add_argument("--writer-replies", type=int, default=262_144)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "oracle-cache"
        files = write_segments(root, args.replies, args.segment)
        measured = child(CHILD, root)
        after = sorted((root / "segments").glob("*.parquet"))
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in after)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "oracle-cache"
        written = child(WRITER, root, args.writer_replies, args.group)
        segments = sorted((root / "segments").iterdir())
        levels = sorted({p.name.split("-L")[1][0] for p in segments})
        stored = sum(
            pq.ParquetFile(p).metadata.num_rows for p in segments if p.suffix == ".parquet"
        )
        stored += sum(len(p.read_text().splitlines()) for p in segments if p.suffix == ".jsonl")
    absolute, added = memory(measured)
    w_absolute, w_added = memory(written)
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
        "private_memory_mb": absolute,
        "private_memory_added_mb": added,
        "writer": {
            "replies": args.writer_replies,
            "group": args.group,
            "segments_left": len(segments),
            "levels_left": levels,
            "replies_stored": stored,
            "found_of_1000": written["found_of_1000"],
            "seconds": written["seconds"],
            "private_memory_mb": w_absolute,
            "private_memory_added_mb": w_added,
        },
    }
    assert rows == args.replies, f"compaction kept {rows} of {args.replies} replies"
    assert stored == args.writer_replies, f"the writer stored {stored} of {args.writer_replies}"
    write_results(args.out, report)
    print_table(["phase", "replies", "segments in → out", "seconds", "private MB before", "peak", "after"],
                [["compaction", args.replies, f"{files} → {len(after)}", measured["seconds"], *absolute.values()],
                 ["an actor writing", args.writer_replies, f"{args.writer_replies // args.group} groups → {len(segments)}",
                  written["seconds"], *w_absolute.values()]])  # fmt: skip


if __name__ == "__main__":
    main()
