"""Sentence embeddings (sentence-transformers; the bundled MiniLM by default) and the rules built on them.

- `embed()`: a Ray Data stage adding a normalised `embedding` column to every row (on the
  cluster's GPUs when it has any, one encoder actor per GPU; on CPU tasks otherwise).
- Centroid retrieval (CITING's rule, also TAPIR's cheap classifier at scale): the score of class c
  for a query q is the mean inner product with c's members, which equals <e(q), μ_c> with μ_c the
  mean member embedding; the argmax wins.
- `max_similarity()`: for query embeddings, the highest cosine similarity to any row of a (large)
  embedded dataset, computed block by block on the cluster (near-duplicate checks).
- `greedy_distinct()`: which of a list of embeddings to keep so that no two kept ones (nor a kept
  one and a given earlier set) are near-duplicates, in list order, by blockwise matrix products.
- `as_matrix()`: an Arrow list<float32> column as an (n, d) float32 array without Python floats.
Memory is bounded per block everywhere: matrix products over blocks, never a loop over pairs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from tapir_ray.assets import resolve_model

_ENCODERS: dict[tuple[str, str], Any] = {}
EMBED_BLOCK_ROWS = 2048  # rows per embedding task
# A GPU actor's share of its GPU and its batch: MiniLM-sized encoders need well under a GiB, and a
# share leaves the GPU schedulable for whatever else the cluster runs meanwhile.
EMBED_GPU_SHARE = 0.25
EMBED_GPU_BATCH = 1024
EMBED_GPU_ACTORS_MAX = 64

log = logging.getLogger(__name__)


def load_encoder(model: str, device: str = "cpu"):
    """The sentence encoder, loaded once per process: the embedding stage's workers and the tasks
    that encode a few texts later in the round (expansion checks, CITING's retrieval) are often
    the same Ray worker, and a load costs seconds. One model at a time is kept."""
    from sentence_transformers import SentenceTransformer

    key = (model, device)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = SentenceTransformer(resolve_model(model), device=device)
    return _ENCODERS[key]


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
    """Ray Data UDF: `text_column` → `embedding` (unit-norm float32 list; plain Parquet lists),
    `drop_text`: without the text column. `device="cuda"`: the GPU Ray gave this actor (CPU, with a
    warning in the worker's log, on a node whose GPU resource has no CUDA device behind it)."""

    def __init__(self, model: str, text_column: str, device: str = "cpu", drop_text: bool = False):
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                log.warning("embedding actor: Ray gave it GPU %s, but CUDA sees no device; "
                            "encoding on CPU", ray.get_gpu_ids())  # fmt: skip
                device = "cpu"
        self.encoder = load_encoder(model, device)
        self.column, self.drop_text = text_column, drop_text
        self.batch_size = EMBED_GPU_BATCH if device == "cuda" else 64

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [str(t) for t in batch[self.column].to_pylist()]
        vectors = encode(self.encoder, texts, batch_size=self.batch_size)
        column = pa.array(list(vectors), type=pa.list_(pa.float32()))
        if self.drop_text:
            batch = batch.drop_columns([self.column])
        return batch.append_column("embedding", column)


def gpu_actors(gpus: float) -> int:
    """Encoder actors `embed()` starts on a cluster with `gpus` GPUs (0: it encodes on CPU tasks)."""
    return 0 if gpus < 1 else min(int(gpus), EMBED_GPU_ACTORS_MAX)


def embed(
    ds: ray.data.Dataset,
    model: str,
    text_column: str = "text",
    *,
    gpus: float = 0,
    drop_text: bool = False,
) -> ray.data.Dataset:
    """`ds` with an `embedding` column (`drop_text`: and without `text_column`). `gpus`: the
    cluster's GPUs (0: encode on CPU tasks). With one or more, the encoder runs on an actor pool of
    one actor per GPU (each on EMBED_GPU_SHARE of it, up to EMBED_GPU_ACTORS_MAX actors), batches
    of EMBED_GPU_BATCH texts.

    Dropping the text here rather than with `select_columns` afterwards matters before a writer
    of its own resources (frames.write_as_it_goes): the projection is then an operator of its own,
    and Ray Data reserved CPU for it that the encoder's tasks then lacked (100,000 embeddings took
    53 s instead of 17 s on 2 cores)."""
    from tapir_ray.runtime import cached_udf, map_batches_once

    # Blocks of at most EMBED_BLOCK_ROWS, split as they stream by: a pool's Parquet file is one
    # block of up to 100,000 rows, and its embeddings were one task on one core.
    ds = ds.repartition(target_num_rows_per_block=EMBED_BLOCK_ROWS)
    if actors := gpu_actors(gpus):
        return map_batches_once(
            ds, Embed, fn_constructor_args=(model, text_column, "cuda", drop_text), batch_size=EMBED_GPU_BATCH,
            batch_format="pyarrow", num_gpus=EMBED_GPU_SHARE, num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
        )  # fmt: skip
    return ds.map_batches(
        cached_udf, fn_args=(Embed, (model, text_column, "cpu", drop_text)), batch_size=256,
        batch_format="pyarrow",
        num_cpus=0.5,
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


BLOCK = 4096  # rows per side of one similarity block: 4096² float32 = 64 MiB


def as_matrix(column: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    """An embedding column (Arrow list<float> or fixed_size_list, or NumPy's object array of
    vectors) as a 2-D float32 array, reading the flat values buffer instead of Python floats."""
    if isinstance(column, np.ndarray):
        if column.dtype != object:
            return column.astype(np.float32, copy=False)
        return np.stack(column).astype(np.float32) if len(column) else np.zeros((0, 0), np.float32)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if column.null_count:
        raise ValueError(f"{column.null_count} rows have no embedding")
    if isinstance(column.type, pa.ExtensionType):  # Ray's tensor column: a list per row underneath
        column = column.storage
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(column), -1)


def _max_over(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """max_j <q_i, r_j> for every query, over blocks of both sides (bounded memory)."""
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    for i in range(0, len(queries), BLOCK):
        q = queries[i : i + BLOCK]
        for j in range(0, len(rows), BLOCK):
            np.maximum(best[i : i + BLOCK], (q @ rows[j : j + BLOCK].T).max(axis=1),
                       out=best[i : i + BLOCK])  # fmt: skip
    return best


def max_similarity(queries: np.ndarray, ds: ray.data.Dataset) -> np.ndarray:
    """max over rows of `ds` (column `embedding`) of <query, row>, for each query (−1 when `ds`
    is empty). Each block of `ds` is compared on the cluster; only one vector per block comes back."""
    if len(queries) == 0:
        return np.zeros(0, dtype=np.float32)
    q = ray.put(np.ascontiguousarray(queries, dtype=np.float32))

    def block_max(batch: pa.Table) -> pa.Table:
        rows = as_matrix(batch["embedding"])
        best = _max_over(ray.get(q), rows) if len(rows) else np.full(len(queries), -1.0, np.float32)
        return pa.table({"best": pa.array([best], type=pa.list_(pa.float32()))})

    best = np.full(len(queries), -1.0, dtype=np.float32)
    parts = ds.select_columns(["embedding"]).map_batches(
        block_max, batch_size=BLOCK, batch_format="pyarrow"
    )
    for part in parts.iter_batches(batch_format="pyarrow", batch_size=None):
        for vec in as_matrix(part["best"]):
            np.maximum(best, vec, out=best)
    return best


def greedy_distinct(
    vecs: np.ndarray, prior: np.ndarray | list[np.ndarray] | None, threshold: float
) -> np.ndarray:
    """Keep-mask over `vecs` (unit rows), in order: row i is kept when its similarity to every
    row of `prior` (one array, or a list of them) and to every kept row before it is below
    `threshold`. Blockwise: a block is
    compared with everything kept before it by one matrix product, then with itself; only the
    within-block order is a loop, one vectorised row at a time."""
    n = len(vecs)
    keep = np.zeros(n, dtype=bool)
    prior = [] if prior is None else [prior] if isinstance(prior, np.ndarray) else prior
    kept_blocks = [p for p in prior if len(p)]
    for start in range(0, n, BLOCK):
        block = vecs[start : start + BLOCK]
        before = np.full(len(block), -np.inf, dtype=np.float32)
        for k in kept_blocks:
            np.maximum(before, _max_over(block, k), out=before)
        inner = block @ block.T
        mask = np.zeros(len(block), dtype=bool)
        for i in range(len(block)):
            if before[i] < threshold and not (inner[i, :i][mask[:i]] >= threshold).any():
                mask[i] = True
        keep[start : start + len(block)] = mask
        if mask.any():
            kept_blocks.append(block[mask])
    return keep
