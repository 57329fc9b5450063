"""TAPIR's expansion acceptance at the sizes a large pool asks for.

    python benchmarks/expansion_scale.py --expansions 20000 100000 --pool 100000 [--cpus 2]

A 1M-row pool with the default round sizes asks for 120,000–520,000 expansions a round. For each
size N this writes a run directory as the teacher and classifier stages leave it: a pool of
`--pool` rows with their embeddings, and N expansion answers with their re-check labels, mixed as
a run sees them (exact copies of pool rows and of each other, re-classified rows, dead-lettered
labels, new instructions). Then it runs `accept_expansions` as the recipe does (one Ray task that
drives Ray Data stages) and records its seconds, the peak RSS (sampled every 50 ms) of this
driver, of that task and of the largest Ray worker (usually an encoder's), and what was accepted
and rejected.

The encoder is the tiny random-weight one with the bundled MiniLM's tokenizer
(`tapir_ray.assets.tiny_encoder`, 32 dimensions against MiniLM's 384); pool embeddings are its
vectors of the pool texts. Its vectors of any two texts are close (cosine 0.99–0.9999), so the
default `--threshold` 0.99999 counts nearly every new instruction as distinct: nearly all are
kept, the heaviest case for the in-order keep rule, which compares each row with all kept before it.

To compare with another version of tapir-ray, run this script with that version's checkout on
PYTHONPATH (`--label` names the run in the results).
Results: benchmarks/results/expansion_scale.json (or --out), a plot next to it (.png) and a table
on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import ray
from common import command_line, device_name, print_table, write_results
from round_glue import PeakRSS as WorkerRSS

from tapir_ray import frames
from tapir_ray.assets import tiny_encoder
from tapir_ray.runtime import configure_data, quiet_ray_console, worker_env

RESULTS = Path(__file__).parent / "results" / "expansion_scale.json"


class PeakRSS(WorkerRSS):
    """Also the peak memory of the task that runs `accept_expansions`: what acceptance itself
    holds, apart from the encoder workers that the largest-worker figure usually names. `task`
    is its RSS, which counts the pages of Ray's shared object store that it has read (blocks
    read zero-copy stay mapped); `task_uss` is its private memory alone (USS), what it holds."""

    task = task_uss = 0

    def sample(self) -> None:
        super().sample()
        for p in psutil.process_iter(["cmdline"]):
            try:
                if (p.info["cmdline"] or [""])[0].startswith("ray::accept_expansions"):
                    full = p.memory_full_info()
                    self.task, self.task_uss = (
                        max(self.task, full.rss),
                        max(self.task_uss, full.uss),
                    )
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


WORDS = ["river", "lantern", "quantum", "recipe", "orbit", "ledger", "violin", "glacier", "syntax", "harvest", "mosaic", "tariff", "pixel", "sonnet", "enzyme", "compass", "bakery", "voltage", "archive", "meadow"]  # fmt: skip


def _text(k: int, salt: str) -> str:
    """A distinct instruction for each k: words picked by k's digits in base 20."""
    words, x = [], k
    for _ in range(6):
        words.append(WORDS[x % 20])
        x //= 20
    return f"{salt} a short piece about {' '.join(words)}."


def _pool(batch: dict) -> pa.Table:
    from tapir_ray.ingest.canonical import row_id

    texts = [_text(int(k), "Write") for k in batch["id"]]
    return pa.table({"id": [row_id(t) for t in texts], "instruction": texts, "input": [""] * len(texts),
                     "text": texts})  # fmt: skip


def _expansions(batch: dict, pool_rows: int) -> pa.Table:
    """Expansion j: 4 % copy a pool row, 4 % copy an earlier expansion, 4 % are re-classified,
    2 % have no label; the rest are new instructions."""
    ids, texts, labels = [], [], []
    for j in (int(k) for k in batch["id"]):
        kind = j % 50
        ids.append(f"x1.0.Writing.{j:09d}")
        if kind < 2:
            texts.append(_text(j % pool_rows, "Write"))
        elif kind < 4:  # the new instruction 4 rows before (kind 48 or 49)
            texts.append(_text(j - 4 if j >= 4 else j, "Compose"))
        else:
            texts.append(_text(j, "Compose"))
        labels.append(None if kind in (4,) else "Math" if kind in (5, 6) else "Writing")
    return pa.table({"id": ids, "text": texts, "label": pa.array(labels, pa.string())})


def build_run(run: str, pool_rows: int, expansions: int, encoder: str) -> None:
    from tapir_ray.embed import embed

    blocks = max(2, pool_rows // 20_000)
    pool = ray.data.range(pool_rows, override_num_blocks=blocks).map_batches(_pool, batch_format="numpy")  # fmt: skip
    frames.write(pool.select_columns(["id", "instruction", "input"]), f"{run}/ingest/pool",
                 pa.schema([("id", pa.string()), ("instruction", pa.string()), ("input", pa.string())]))  # fmt: skip
    embedded = embed(
        frames.read(f"{run}/ingest/pool", ["id", "instruction"]), encoder, "instruction"
    )
    embedded.select_columns(["id", "embedding"]).write_parquet(f"{run}/embeddings")
    folder = f"{run}/round-1/expand-0"
    rows = ray.data.range(expansions, override_num_blocks=max(2, expansions // 20_000)).map_batches(
        _expansions, fn_args=(pool_rows,), batch_format="numpy")  # fmt: skip
    frames.write(rows, f"{folder}/raw", pa.schema([("id", pa.string()), ("text", pa.string()), ("label", pa.string())]))  # fmt: skip
    raw = frames.read(f"{folder}/raw", ["id", "text", "label"])
    frames.write(raw.map_batches(lambda b: pa.table({
        "id": b["id"], "messages": pa.array(["[]"] * b.num_rows), "category": pa.array(["Writing"] * b.num_rows),
        "parent_id": pa.array(["p"] * b.num_rows)}), batch_format="pyarrow"), f"{folder}/requests",
        pa.schema([("id", pa.string()), ("messages", pa.string()), ("category", pa.string()), ("parent_id", pa.string())]))  # fmt: skip
    frames.write(raw.map_batches(lambda b: pa.table({"id": b["id"], "parsed": pa.array([json.dumps(t) for t in b["text"].to_pylist()])}),
                 batch_format="pyarrow"), f"{folder}/answers", pa.schema([("id", pa.string()), ("parsed", pa.string())]))  # fmt: skip
    labelled = raw.map_batches(
        lambda b: b.filter(pa.compute.is_valid(b["label"])), batch_format="pyarrow"
    )
    frames.write(labelled.map_batches(lambda b: pa.table({"id": b["id"], "parsed": pa.array([json.dumps(x) for x in b["label"].to_pylist()])}),
                 batch_format="pyarrow"), f"{folder}/labels", pa.schema([("id", pa.string()), ("parsed", pa.string())]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--expansions", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--pool", type=int, default=100_000)
    parser.add_argument("--threshold", type=float, default=0.99999)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from tapir_ray.curriculum.expansion import accept_expansions

    # The workers a run gets (worker_env): the acceptance task reads stage outputs by Ray Data.
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env()})  # fmt: skip
    configure_data()
    quiet_ray_console()
    encoder = tiny_encoder()
    runs = []
    for n in args.expansions:
        with tempfile.TemporaryDirectory(prefix="expansion-scale-") as tmp:
            run = str(Path(tmp) / "run")
            t = time.perf_counter()
            build_run(run, args.pool, n, encoder)
            print(f"{n:,} expansions against {args.pool:,} pool rows: built in {time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
            with PeakRSS() as rss:
                t = time.perf_counter()
                got = ray.get(ray.remote(num_cpus=0)(accept_expansions).remote(run, 1, 0, args.threshold, encoder, []))  # fmt: skip
                seconds = time.perf_counter() - t
            runs.append({"expansions": n, "pool": args.pool, "seconds": round(seconds, 1),
                         "expansions_per_s": round(n / seconds, 1),
                         "peak_rss_driver_mb": round(rss.peak / 2**20), "peak_rss_worker_mb": round(rss.worker / 2**20),
                         "peak_rss_task_mb": round(rss.task / 2**20), "peak_uss_task_mb": round(rss.task_uss / 2**20),
                         "accepted": got["accepted"], "rejected": got["rejected"]})  # fmt: skip
            print(json.dumps(runs[-1]), flush=True)
    print_table(["expansions", "pool", "seconds", "per s", "driver MB", "task RSS MB", "task private MB", "largest worker MB", "accepted"],
                [[r["expansions"], r["pool"], r["seconds"], r["expansions_per_s"], r["peak_rss_driver_mb"],
                  r["peak_rss_task_mb"], r["peak_uss_task_mb"], r["peak_rss_worker_mb"], r["accepted"]] for r in runs])  # fmt: skip
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report.update({"benchmark": "expansion_scale", "device": device_name(), "ray": ray.__version__})
    command = command_line("expansion_scale.py", args)
    # Each label keeps one run per size: a new run of a size replaces the earlier one.
    entry = report.setdefault("runs", {}).setdefault(args.label, [])
    done = {r["expansions"] for r in runs}
    entry[:] = sorted([r for r in entry if r["expansions"] not in done] + [{**r, "command": command} for r in runs],
                      key=lambda r: r["expansions"])  # fmt: skip
    write_results(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    ray.shutdown()


def plot(report: dict, path: Path) -> None:
    """Seconds and the largest worker's peak RSS against the number of expansions, per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, runs in report["runs"].items():
        x = [r["expansions"] for r in runs]
        left.plot(x, [r["seconds"] for r in runs], marker="o", label=label)
        right.plot(x, [r["peak_uss_task_mb"] for r in runs], marker="o", label=label)
    left.set(xlabel="expansions", ylabel="seconds", title="accept_expansions: wall")
    right.set(xlabel="expansions", ylabel="MB", title="the acceptance task: peak private memory")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
