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

from tapir_ray import storage
from tapir_ray.assets import resolve_data
from tapir_ray.config import PoolConfig
from tapir_ray.ingest.canonical import normalize_text
from tapir_ray.ingest.reader import IngestError, PoolDatasource, resolve_pool_files

log = logging.getLogger(__name__)

ROWS_PER_DEDUP_PARTITION = 100_000
POOL_COLUMNS = ["id", "instruction", "input", "output", "source", "origin", "order"]


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


def _mark_contaminated(prompts: frozenset[str]):
    """A batch UDF marking rows whose instruction (alone or with its input) is an evaluation prompt."""

    def mark(batch: pa.Table) -> pa.Table:
        hits = [
            normalize_text(i) in prompts or (bool(x) and normalize_text(i + "\n" + x) in prompts)
            for i, x in zip(
                batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True
            )
        ]
        return batch.append_column("contaminated", pa.array(hits, pa.bool_()))

    return mark


def _rows_with_reason(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch["reason"])).select(["origin", "reason", "raw"])


def _rows_without_reason(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"])).select(POOL_COLUMNS)


def _uncontaminated(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.invert(batch["contaminated"])).drop_columns(["contaminated"])


def _first_per_id(batch: pa.Table) -> pa.Table:
    """Rows sharing an id sit in one partition after the hash shuffle: keep the earliest."""
    if batch.num_rows == 0:
        return batch
    batch = batch.sort_by([("id", "ascending"), ("order", "ascending")])
    ids = batch["id"]
    keep = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    mask = pa.concat_arrays([pa.array([True]), keep.combine_chunks()])
    return batch.filter(mask)


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
    skipped: list[str] = []
    files = resolve_pool_files([resolve_data(p) for p in pool.paths], pool.format, skipped)
    prompts = load_eval_prompts(pool.decontaminate_against)
    for stale in (pool_dir, quarantine_dir, storage.join(out_dir, "_SUCCESS")):
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
        parsed = (
            ds.materialize()
        )  # blocks live in the object store (spilling to disk), not the driver
        read = parsed.count()

        reasons = _count_reason_kinds(parsed)
        quarantined = sum(reasons.values())
        if quarantined:
            parsed.map_batches(_rows_with_reason, batch_format="pyarrow").write_json(quarantine_dir)

        n_good = read - quarantined
        good = parsed.map_batches(_rows_without_reason, batch_format="pyarrow")
        partitions = math.ceil(n_good / ROWS_PER_DEDUP_PARTITION)
        # Rows sharing an id must meet in one partition. A hash shuffle does that at any scale but
        # starts its aggregator actors (seconds); a pool that fits one partition skips it.
        good = good.repartition(partitions, keys=["id"]) if partitions > 1 else good.repartition(1)
        unique = (
            good.map_batches(_first_per_id, batch_size=None, batch_format="pyarrow")
            .map_batches(_mark_contaminated(frozenset(prompts)), batch_format="pyarrow")
            .materialize()
        )
        n_unique = unique.count()
        unique.map_batches(_uncontaminated, batch_format="pyarrow").write_parquet(pool_dir)
        kept = storage.parquet_rows(pool_dir)
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
