"""Sentence embeddings (sentence-transformers; the bundled MiniLM by default) and the rules built on them.

- `embed()`: a Ray Data stage adding a normalised `embedding` column to every row.
- Centroid retrieval (CITING's rule, also TAPIR's cheap classifier at scale): the score of class c
  for a query q is the mean inner product with c's members, which equals <e(q), μ_c> with μ_c the
  mean member embedding; the argmax wins.
- `max_similarity()`: for a few query embeddings, the highest cosine similarity to any row of a
  (large) embedded dataset, computed block by block on the cluster (near-duplicate checks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray

from tapir_ray.assets import resolve_model


def load_encoder(model: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model(model), device="cpu")


def encode(encoder, texts: list[str], batch_size: int = 64) -> np.ndarray:
    if not texts:
        return np.zeros((0, encoder.get_sentence_embedding_dimension()), dtype=np.float32)
    return np.asarray(
        encoder.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
        ),
        dtype=np.float32,
    )


class Embed:
    """Ray Data UDF: `text_column` → `embedding` (unit-norm float32 list; plain Parquet lists)."""

    def __init__(self, model: str, text_column: str):
        self.encoder = load_encoder(model)
        self.column = text_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = encode(self.encoder, [str(t) for t in batch[self.column].to_pylist()])
        column = pa.array(list(vectors), type=pa.list_(pa.float32()))
        return batch.append_column("embedding", column)


def embed(ds: ray.data.Dataset, model: str, text_column: str = "text") -> ray.data.Dataset:
    return ds.map_batches(
        Embed, fn_constructor_args=(model, text_column), batch_size=256, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
    )  # fmt: skip


def centroids(embeddings: np.ndarray, labels: list[str]) -> dict[str, np.ndarray]:
    """μ_c: the mean embedding of each class's members (not re-normalised: <e(q), μ_c> is then the
    mean inner product of q with the members)."""
    out: dict[str, np.ndarray] = {}
    for label in sorted(set(labels)):
        mask = np.array([x == label for x in labels])
        out[label] = embeddings[mask].mean(axis=0)
    return out


def nearest_centroid(embeddings: np.ndarray, cents: dict[str, np.ndarray]) -> list[str]:
    names = list(cents)
    if len(embeddings) == 0:
        return []
    scores = embeddings @ np.stack([cents[n] for n in names]).T
    return [names[k] for k in scores.argmax(axis=1)]


def max_similarity(queries: np.ndarray, ds: ray.data.Dataset) -> np.ndarray:
    """max over rows of `ds` (column `embedding`) of <query, row>, for each query."""
    if len(queries) == 0:
        return np.zeros(0, dtype=np.float32)
    q = ray.put(queries)

    def block_max(batch: dict[str, Any]) -> dict[str, Any]:
        rows = np.stack(list(batch["embedding"])).astype(np.float32)
        sims = ray.get(q) @ rows.T
        return {"best": [sims.max(axis=1)]}

    best = np.full(len(queries), -1.0, dtype=np.float32)
    for part in ds.map_batches(block_max, batch_size=4096, batch_format="numpy").iter_rows():
        best = np.maximum(best, np.asarray(part["best"], dtype=np.float32))
    return best
