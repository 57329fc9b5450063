"""Ingest: pool files (JSON, JSONL, Parquet, CSV, saved HF datasets) → canonical rows.

Public surface: `ingest(pool_config, out_dir)` → IngestSummary, `read_pool(out_dir)` → Dataset.
"""

from tapir_ray.ingest.canonical import normalize_text, row_id
from tapir_ray.ingest.pipeline import (
    IngestSummary,
    ingest,
    ingest_summary,
    load_eval_prompts,
    read_pool,
)
from tapir_ray.ingest.reader import IngestError

__all__ = [
    "IngestError", "IngestSummary", "ingest", "ingest_summary", "load_eval_prompts",
    "normalize_text", "read_pool", "row_id",
]  # fmt: skip
