"""The ingest stage: pool files → canonical, de-duplicated, decontaminated rows, with a quarantine.

    read (PoolDatasource, streaming, parallel per file)
      ├─ rows with a reason → <quarantine>/ (JSONL: origin, reason, raw)
      └─ good rows → hash-partition by id → keep the first of each id (lowest file/row order)
                   → drop rows matching an evaluation prompt → <out>/pool/ (Parquet)

Nothing is collected on the driver: counts come from Ray's block metadata, and the only data the
driver holds is the (small) set of normalised evaluation prompts. The summary reconciles
`read = kept + duplicates + decontaminated + quarantined`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.aggregate import Count, Min

from tapir_ray import frames, storage
from tapir_ray.assets import resolve_data
from tapir_ray.config import PoolConfig
from tapir_ray.ingest.canonical import SCHEMA, normalize_text
from tapir_ray.ingest.reader import IngestError, PoolDatasource, resolve_pool_files

log = logging.getLogger(__name__)

ROWS_PER_DEDUP_PARTITION = 100_000
POOL_COLUMNS = ["id", "instruction", "input", "output", "source", "origin", "order"]
KEYS = pa.schema([("id", pa.string()), ("order", pa.int64())])


@dataclass
class IngestSummary:
    read: int = 0
    kept: int = 0
    duplicates: int = 0
    decontaminated: int = 0
    quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    files: int = 0
    skipped_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    out: str = ""
    quarantine: str = ""

    @property
    def reconciles(self) -> bool:
        return self.read == self.kept + self.duplicates + self.decontaminated + self.quarantined

    def table(self) -> str:
        rate = self.read / self.seconds if self.seconds else 0.0
        rows = [
            ("read", self.read), ("kept", self.kept), ("duplicates", self.duplicates),
            ("decontaminated", self.decontaminated), ("quarantined", self.quarantined),
        ]  # fmt: skip
        lines = [f"{'rows':<16}{'count':>12}", "-" * 28]
        lines += [f"{name:<16}{n:>12,}" for name, n in rows]
        for reason, n in sorted(self.quarantine_reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason[:60]:<60}{n:>10,}")
        check = "yes" if self.reconciles else "NO"
        lines.append("-" * 28)
        lines.append(f"read = kept + duplicates + decontaminated + quarantined: {check}")
        lines.append(f"{self.files} file(s), {self.seconds:.1f} s, {rate:,.0f} rows/s")
        if self.skipped_files:
            shown = ", ".join(self.skipped_files[:5]) + (
                " …" if len(self.skipped_files) > 5 else ""
            )
            lines.append(f"skipped {len(self.skipped_files)} file(s) no reader takes: {shown}")
        lines.append(f"pool: {self.out}")
        lines.append(f"quarantine: {self.quarantine}")
        return "\n".join(lines)


# --- evaluation prompts (decontamination) --------------------------------------------------------


def load_eval_prompts(refs: list[str]) -> set[str]:
    """Normalised texts of every evaluation prompt in the given files (MT-Bench turns, instructions)."""
    prompts: set[str] = set()
    for ref in refs:
        path = resolve_data(ref)
        try:
            text = storage.read_text(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise IngestError(f"{ref}: cannot read the evaluation prompts ({exc})") from None
        stripped = text.lstrip()
        try:
            records = (
                json.loads(text)
                if stripped.startswith("[")
                else [json.loads(x) for x in text.splitlines() if x.strip()]
            )
        except json.JSONDecodeError as exc:
            raise IngestError(f"{ref}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
        for rec in records:
            texts = [t for t in rec.get("turns", []) if isinstance(t, str)]
            for key in ("instruction", "prompt", "question"):
                if isinstance(rec.get(key), str):
                    texts.append(rec[key])
                    if isinstance(rec.get("input"), str) and rec["input"].strip():
                        texts.append(rec[key] + "\n" + rec["input"])
            prompts.update(normalize_text(t) for t in texts if t.strip())
    return prompts


def _without_eval_prompts(prompts: frozenset[str]):
    """A batch UDF dropping rows whose instruction (alone or with its input) is an evaluation prompt."""

    def keep(batch: pa.Table) -> pa.Table:
        hits = [
            normalize_text(i) in prompts or (bool(x) and normalize_text(i + "\n" + x) in prompts)
            for i, x in zip(
                batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True
            )
        ]
        return batch.filter(pc.invert(pa.array(hits, pa.bool_())))

    return keep


def _rows_with_reason(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch["reason"])).select(["origin", "reason", "raw"])


def _rows_without_reason(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"])).select(POOL_COLUMNS)


def _repeated(keys: pa.Table) -> pa.Table:
    """(id, first, count) for each id of `keys` (id, order) seen more than once; `first`: its
    lowest order."""
    counted = keys.group_by("id").aggregate([("order", "count"), ("order", "min")])
    counted = counted.filter(pc.greater(counted["order_count"], 1))
    return pa.table(
        {"id": counted["id"], "first": counted["order_min"], "count": counted["order_count"]}
    )


@ray.remote(num_cpus=0)
def _repeated_in(blocks: list) -> pa.Table:
    tables = [t for t in ray.get(blocks) if t.num_rows]
    return _repeated(pa.concat_tables(tables)) if tables else _repeated(KEYS.empty_table())


def _repeated_of_counts(batch: pa.Table) -> pa.Table:
    batch = batch.filter(pc.greater(batch["count()"], 1))
    return pa.table({"id": batch["id"], "first": batch["min(order)"], "count": batch["count()"]})


def _repeated_ids(good: ray.data.Dataset, n_good: int) -> pa.Table:
    """(id, first order, count) of every id that more than one of `good`'s rows carry: only these ids
    leave Arrow blocks, usually a small share of the pool. A pool larger than
    ROWS_PER_DEDUP_PARTITION counts its ids with Ray Data's hash aggregate over the (id, order)
    columns; a smaller one in one task, without starting aggregator actors (seconds)."""
    keys = good.select_columns(KEYS.names)
    if n_good <= ROWS_PER_DEDUP_PARTITION:
        return ray.get(_repeated_in.remote(keys.to_arrow_refs()))
    partitions = math.ceil(n_good / ROWS_PER_DEDUP_PARTITION)
    counted = keys.groupby("id", num_partitions=partitions).aggregate(Count(), Min("order"))
    parts = list(frames.fold(counted, _repeated_of_counts))
    return pa.concat_tables([_repeated(KEYS.empty_table()), *parts], promote_options="permissive")


def _first_copies(batch: pa.Table, repeated: Any) -> pa.Table:
    """A block without the later copies of a repeated id (the earliest row of each is kept)."""
    repeated = ray.get(repeated) if isinstance(repeated, ray.ObjectRef) else repeated
    at = pc.index_in(batch["id"], value_set=repeated["id"])
    first = pc.take(repeated["first"], at)
    return batch.filter(pc.or_kleene(pc.is_null(at), pc.equal(batch["order"], first)))


def _count_reason_kinds(parsed: ray.data.Dataset) -> dict[str, int]:
    """Quarantine counts per kind of reason; each batch sends back one small row per kind."""
    totals: dict[str, int] = {}
    for row in parsed.map_batches(_reason_kinds, batch_format="pyarrow").iter_rows():
        totals[row["kind"]] = totals.get(row["kind"], 0) + row["n"]
    return totals


def _unwrap(exc: BaseException) -> IngestError | None:
    seen = exc
    while seen is not None:
        if isinstance(seen, IngestError):
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    # Ray may re-raise a user exception as a derived class whose message holds the original.
    text = str(exc)
    marker = "IngestError: "
    if marker in text:
        return IngestError(text.split(marker, 1)[1].splitlines()[0])
    return None


def ingest(
    pool: PoolConfig,
    out_dir: str,
    *,
    quarantine_dir: str | None = None,
    block_rows: int = 4096,
) -> IngestSummary:
    """Read the pool into `<out_dir>/pool/` (Parquet) and write `<out_dir>/summary.json`."""
    started = time.perf_counter()
    quarantine_dir = quarantine_dir or storage.join(out_dir, "quarantine")
    pool_dir = storage.join(out_dir, "pool")
    # The pool parsed once, as Parquet beside it: each pass below reads it back. Held in the object
    # store (`materialize()`, with a second copy after deduplication), a 1,000,000-row pool took
    # 0.9 GB of it, and every worker that later read a block from those pages kept them mapped
    # for the rest of the run (its RSS grew with the pool).
    parsed_dir = storage.join(out_dir, "_parsed")
    skipped: list[str] = []
    files = resolve_pool_files([resolve_data(p) for p in pool.paths], pool.format, skipped)
    prompts = load_eval_prompts(pool.decontaminate_against)
    for stale in (pool_dir, quarantine_dir, parsed_dir, storage.join(out_dir, "_SUCCESS")):
        storage.remove(stale)  # Ray appends to existing folders: a re-run must not double rows

    datasource = PoolDatasource(
        files,
        schema=pool.schema_,
        columns=pool.columns.model_dump(),
        max_chars=pool.max_chars,
        block_rows=block_rows,
    )
    try:
        ds = ray.data.read_datasource(datasource)
        if pool.limit is not None:
            ds = ds.limit(pool.limit)
        read = frames.write(ds, parsed_dir, SCHEMA)
        parsed = frames.read(parsed_dir, SCHEMA.names, dict(zip(SCHEMA.names, SCHEMA.types, strict=True)))  # fmt: skip

        reasons = _count_reason_kinds(parsed)
        quarantined = sum(reasons.values())
        if quarantined:
            parsed.map_batches(_rows_with_reason, batch_format="pyarrow").write_json(quarantine_dir)

        n_good = read - quarantined
        good = parsed.map_batches(_rows_without_reason, batch_format="pyarrow")
        # Exact duplicates: only the ids that repeat go round, and each block keeps its rows but
        # their later copies. A shuffle of the rows themselves by id held the whole pool in the
        # object store at once (458 MB of a 1,000,000-row pool), as its partitions finish together.
        repeated = _repeated_ids(good, n_good)
        n_unique = n_good - (pc.sum(repeated["count"]).as_py() or 0) + repeated.num_rows
        unique = good.map_batches(_first_copies, fn_args=(ray.put(repeated),), batch_format="pyarrow")  # fmt: skip
        keep = _without_eval_prompts(frozenset(prompts))
        unique.map_batches(keep, batch_format="pyarrow").write_parquet(pool_dir)
        kept = storage.parquet_rows(pool_dir)
        storage.remove(parsed_dir)
    except Exception as exc:  # surface a clean one-line error for unreadable files
        clean = _unwrap(exc)
        if clean is not None:
            raise clean from None
        raise

    summary = IngestSummary(
        read=read,
        kept=kept,
        duplicates=n_good - n_unique,
        decontaminated=n_unique - kept,
        quarantined=quarantined,
        quarantine_reasons=reasons,
        files=len(files),
        skipped_files=skipped,
        seconds=time.perf_counter() - started,
        out=pool_dir,
        quarantine=quarantine_dir,
    )
    storage.write_json_atomic(
        storage.join(out_dir, "summary.json"), asdict(summary) | {"reconciles": summary.reconciles}
    )
    storage.mark_success(out_dir, {"kept": kept})
    return summary


def _reason_kinds(batch: pa.Table) -> pa.Table:
    """A reason without its row-specific details (numbers, parser messages), counted per batch."""
    counts: dict[str, int] = {}
    for reason in batch["reason"].drop_null().to_pylist():
        kind = re.sub(r"\d+", "N", reason).split(" (", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    return pa.table({"kind": list(counts), "n": list(counts.values())})


def read_pool(out_dir: str) -> ray.data.Dataset:
    """The ingested pool as a Ray Dataset (the next stages' input)."""
    return ray.data.read_parquet(storage.join(out_dir, "pool"))


def ingest_summary(out_dir: str) -> dict[str, Any]:
    return storage.read_json(storage.join(out_dir, "summary.json"))
