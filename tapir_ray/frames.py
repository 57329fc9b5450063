"""Stage tables as Ray Data datasets: read a stage's Parquet folder, join two tables by id, write one, and
fold a table into a small summary block by block.

The run layer's glue between stages is built from these, so that no step holds a table that grows
with the pool in one process: rows stay in blocks on the cluster's nodes, joins are Ray Data's
hash-partitioned joins (or, for a table of at most LOCAL_JOIN_ROWS, one task or a broadcast of
it), and what comes back to the driver is per-block summaries (counts, sums, histograms)
added up as they arrive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from tapir_ray import storage

# Rows per hash partition of a join. An aggregator finalises its partitions one at a time, so the
# partition's size bounds a worker's memory: at 1M candidates on 2 CPUs, 50,000 rows per partition
# kept the largest worker at 1.3× its 100K figure where 200,000 rows gave 2.6×
# (benchmarks/round_glue.py).
ROWS_PER_PARTITION = 50_000
# At or below this many rows a join runs as one task (polars on both sides' Arrow blocks): Ray
# Data's hash join starts its aggregator actors for every join, 5–8 s on a 2-CPU node however
# small the tables, which a round with a dozen joins would pay each time. The bound holds memory
# to a fixed size, whatever the pool (the same idea as Spark's broadcast-join threshold).
LOCAL_JOIN_ROWS = 50_000
# Write tasks at once in a streaming stage (write_as_it_goes): encoding a block takes far less
# than making it (an engine or an oracle upstream), so a couple keep up.
WRITERS = 2
_HOW = {"inner": "inner", "left_outer": "left", "left_semi": "semi", "left_anti": "anti"}


def _files(folder: str) -> list[str]:
    """The folder's Parquet files that hold rows (a block whose every row was dead-lettered
    leaves a file without columns); read from their footers only."""
    import pyarrow.parquet as pq

    fs, path = storage.fs_and_path(folder)
    if not fs.exists(path):
        return []
    out = []
    for f in sorted(fs.find(path)):
        if f.endswith(".parquet") and "/_" not in f[len(path) :]:
            with fs.open(f, "rb") as fh:
                if pq.ParquetFile(fh).metadata.num_rows:
                    out.append(f)
    return out


def column_names(folder: str) -> list[str]:
    """The columns of a stage's table (from a footer), or [] when it holds no rows."""
    import pyarrow.parquet as pq

    files = _files(folder)
    if not files:
        return []
    fs, _ = storage.fs_and_path(folder)
    with fs.open(files[0], "rb") as fh:
        return list(pq.ParquetFile(fh).schema_arrow.names)


def read(
    folder: str | Iterable[str], columns: list[str], types: dict[str, pa.DataType] | None = None,
    num_cpus: float | None = None,
) -> ray.data.Dataset:  # fmt: skip
    """One stage's table (or the union of several folders) as a Dataset of `columns`. A folder
    that is missing or holds no rows reads as an empty table of those columns (strings unless
    `types` says otherwise). `num_cpus`: per read task (a pipeline sharing a small node with
    engine and oracle actors reads with a fraction of a CPU)."""
    folders = [folder] if isinstance(folder, str) else list(folder)
    files = [f for d in folders for f in _files(d)]
    if not files:
        types = types or {}
        return ray.data.from_arrow(
            pa.table({c: pa.array([], types.get(c, pa.string())) for c in columns})
        )
    fs, _ = storage.fs_and_path(folders[0])
    return ray.data.read_parquet(files, columns=columns, filesystem=fs, num_cpus=num_cpus)


def rows(folder: str) -> int:
    return storage.parquet_rows(folder)


def join(left: ray.data.Dataset, right: ray.data.Dataset, how: str, *, size: int,
         on: str = "id", right_on: str | None = None, right_rows: int | None = None) -> ray.data.Dataset:  # fmt: skip
    """`left` joined with `right` on the id column (inner, left_outer, left_semi, left_anti);
    `size`: about how many rows the larger side has. Above LOCAL_JOIN_ROWS it is Ray Data's
    hash-partitioned join; below, one task joins the two sides' blocks. When `right_rows` are at
    most LOCAL_JOIN_ROWS, right goes to every block of left instead (a broadcast join; a semi or
    anti join sends only right's ids), which streams: Ray Data's hash join finishes every
    partition before the next operator gets a row, so its whole output sits in the object store
    at once."""
    right_on = right_on or on
    if size <= LOCAL_JOIN_ROWS:
        return ray.data.from_arrow_refs([_local_join.remote(
            left.to_arrow_refs(), right.to_arrow_refs(), how, on, right_on)])  # fmt: skip
    if right_rows is not None and right_rows <= LOCAL_JOIN_ROWS:
        if how in ("left_semi", "left_anti"):
            right = right.select_columns([right_on])
        small = ray.put(_small_table(right))
        return left.map_batches(_join_small, fn_args=(small, how, on, right_on), batch_format="pyarrow")  # fmt: skip
    parts = max(2, min(256, math.ceil(size / ROWS_PER_PARTITION)))
    return left.join(right, how, num_partitions=parts, on=(on,), right_on=(right_on,))


def _concat(tables: list[pa.Table], on: str) -> pa.Table:
    full = [t for t in tables if t.num_columns] or [pa.table({on: pa.array([], pa.string())})]
    return pa.concat_tables(full, promote_options="default")


def _polars_join(left: pa.Table, right: pa.Table, how: str, on: str, right_on: str) -> pa.Table:
    """`left` joined with `right` in this process, in left's order, each column of its input's
    type."""
    import polars as pl

    out = pl.from_arrow(left).join(
        pl.from_arrow(right), left_on=on, right_on=right_on, how=_HOW[how], coalesce=True,
        maintain_order="left",
    ).to_arrow()  # fmt: skip
    # polars hands back its own string types: give each column its input type again
    types = {f.name: f.type for f in right.schema} | {f.name: f.type for f in left.schema}
    return out.cast(pa.schema([(name, types[name]) for name in out.column_names]))


@ray.remote(num_cpus=0)
def _local_join(left: list, right: list, how: str, on: str, right_on: str) -> pa.Table:
    return _polars_join(_concat(ray.get(left), on), _concat(ray.get(right), right_on), how, on, right_on)  # fmt: skip


def _small_table(ds: ray.data.Dataset) -> pa.Table:
    """A small dataset (at most LOCAL_JOIN_ROWS rows) as one table, in this process; an empty one
    keeps its columns (an outer join still adds them)."""
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_columns]
    if tables:
        return pa.concat_tables(tables, promote_options="default")
    return ds.schema().base_schema.empty_table()


def _join_small(batch: pa.Table, small: Any, how: str, on: str, right_on: str) -> pa.Table:
    small = ray.get(small) if isinstance(small, ray.ObjectRef) else small
    return _polars_join(batch, small, how, on, right_on)


def sort(ds: ray.data.Dataset, column: str, *, size: int) -> ray.data.Dataset:
    """`ds` in `column` order; `size`: about how many rows it has. Above LOCAL_JOIN_ROWS it is
    Ray Data's sort; below, one task sorts the blocks (Ray Data's sort samples and shuffles over
    partitions: about 5 s on a 2-CPU node for ten rows)."""
    if size > LOCAL_JOIN_ROWS:
        return ds.sort(column)
    return ray.data.from_arrow_refs([_local_sort.remote(ds.to_arrow_refs(), column)])


@ray.remote(num_cpus=0)
def _local_sort(refs: list, column: str) -> pa.Table:
    tables = ray.get(refs)
    full = [t for t in tables if t.num_rows]
    if not full:
        return tables[0] if tables else pa.table({column: pa.array([], pa.string())})
    return pa.concat_tables(full, promote_options="default").sort_by(column)


def mark(
    left: ray.data.Dataset, ids: ray.data.Dataset, column: str, *, rows: int, ids_rows: int
) -> ray.data.Dataset:
    """`left` with a boolean `column`: whether its id is among `ids` (ids may repeat). `rows`,
    `ids_rows`: about how many rows each side has. Both small: one task (`join`). One small
    against one large (an attempt's expansions against the pool): a broadcast join, the small
    side's ids sent to every block of the other, which needs no hash partitions (their
    aggregators take 5–8 s to start on a 2-CPU node, however few the rows). Both large: Ray
    Data's hash joins."""
    small, large = sorted((rows, ids_rows))
    if large <= LOCAL_JOIN_ROWS or small > LOCAL_JOIN_ROWS:

        def flag(value: bool):
            return lambda b: b.append_column(column, pa.array([value] * b.num_rows, pa.bool_()))

        yes = join(left, ids, "left_semi", size=large).map_batches(flag(True), batch_format="pyarrow")  # fmt: skip
        no = join(left, ids, "left_anti", size=large).map_batches(flag(False), batch_format="pyarrow")  # fmt: skip
        return yes.union(no)
    if ids_rows <= LOCAL_JOIN_ROWS:
        wanted = _ids_of(ids, "id")
    else:  # `left` is the small side: each block of `ids` sends back the ids of left it holds
        left = left.materialize()  # read once: its ids go out, its rows come back marked
        asked = ray.put(_ids_of(left, "id"))
        wanted = pa.concat_arrays([pa.array([], pa.string()), *fold(ids, _holding, asked=asked)])
    return left.map_batches(_flag_in, fn_args=(ray.put(wanted), column), batch_format="pyarrow")


def _ids_of(ds: ray.data.Dataset, column: str) -> pa.Array:
    """The id column of a small dataset, in this process."""
    blocks = ray.get(ds.select_columns([column]).to_arrow_refs())
    return pa.concat_arrays([pa.array([], pa.string()),
                             *(b[column].combine_chunks().cast(pa.string()) for b in blocks)])  # fmt: skip


def _holding(batch: pa.Table, asked: Any) -> pa.Array:
    ids = batch["id"].combine_chunks().cast(pa.string())
    return pc.unique(ids.filter(pc.is_in(ids, value_set=ray.get(asked))))


def _hits(batch: pa.Table, wanted: Any, on: str) -> pa.ChunkedArray:
    wanted = ray.get(wanted) if isinstance(wanted, ray.ObjectRef) else wanted
    return pc.is_in(batch[on].cast(pa.string()), value_set=wanted)


def _flag_in(batch: pa.Table, wanted: Any, column: str) -> pa.Table:
    return batch.append_column(column, _hits(batch, wanted, "id"))


def write(ds: ray.data.Dataset, folder: str, schema: pa.Schema) -> int:
    """Replace `folder` with `ds` written by Ray Data's Parquet writer (one file per block); an
    empty result still leaves a file with the schema, so the next stage reads zero rows, not a
    missing folder. Returns the rows written."""
    storage.remove(folder)
    ds.write_parquet(folder)
    n = storage.parquet_rows(folder)
    if n == 0:
        storage.write_table(schema.empty_table(), folder)
    return n


def write_as_it_goes(ds: ray.data.Dataset, folder: str, writers: int = WRITERS) -> None:
    """Write `ds` to `folder` (one file per block) while the operators before the write still run.

    Ray Data reserves each operator's minimum CPUs from the first operator down, and a writer
    waits while others hold what it needs ("downstream ops ... can wait for upstream ops to
    finish", resource_manager.py). Behind actor pools that hold a node's CPUs (the student engine,
    the oracle actors, the encoder) a writer that asks for CPU gets no reservation: the stage's
    whole output waits in the object store until every other operator is done (a 1M-row scoring
    phase had 1.2 GiB of verdicts queued and no file written after 45 minutes). Encoding a block
    is light, so the writers ask for no CPU, and at most `writers` run at once."""
    ds.write_parquet(folder, concurrency=writers, ray_remote_args={"num_cpus": 0})


def fold(ds: ray.data.Dataset, fn: Callable[[pa.Table], Any], **fn_kwargs: Any) -> Iterator[Any]:
    """`fn(block, **fn_kwargs)` for each block of `ds`, run where the block is; yields each
    (small) answer as it comes back, for the caller to add up."""
    import pickle

    def one(batch: pa.Table) -> pa.Table:
        return pa.table({"out": pa.array([pickle.dumps(fn(batch, **fn_kwargs))], pa.binary())})

    for part in ds.map_batches(one, batch_format="pyarrow", batch_size=None).iter_batches(
        batch_format="pyarrow", batch_size=None
    ):
        for blob in part["out"].to_pylist():
            yield pickle.loads(blob)


def _matching(batch: pa.Table, ids: frozenset, columns: list[str]) -> list[dict[str, Any]]:
    import pyarrow.compute as pc

    hit = batch.filter(pc.is_in(batch["id"], pa.array(sorted(ids), pa.string())))
    return hit.select(columns).to_pylist()


def lookup(folder: str, ids: Iterable[str], columns: list[str]) -> dict[str, dict[str, Any]]:
    """id → row (of `columns`) for the given ids only: each block sends back its matches, so a
    lookup of a curriculum's thousand ids costs a pass, never the table in one process."""
    wanted = frozenset(ids)
    if not wanted:
        return {}
    cols = list(dict.fromkeys(["id", *columns]))
    out: dict[str, dict[str, Any]] = {}
    for part in fold(read(folder, cols), _matching, ids=wanted, columns=cols):
        out.update((r["id"], r) for r in part)
    return out


def _lowest_of(
    batch: pa.Table, key: Callable[[dict], Any], n: int, where: Callable[[dict], bool] | None
) -> list:
    import heapq

    rows = (r for r in batch.to_pylist() if where is None or where(r))
    return heapq.nsmallest(n, ((key(r), r) for r in rows), key=lambda kr: kr[0])


def lowest(ds: ray.data.Dataset, key: Callable[[dict], Any], n: int,
           where: Callable[[dict], bool] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The `n` rows of `ds` (those `where` keeps) with the lowest `key`, in key order: each block
    sends back at most n (a seeded sample by hash rank without collecting the table)."""
    import heapq

    best: list = []
    for part in fold(ds, _lowest_of, key=key, n=n, where=where):
        best = heapq.nsmallest(n, best + part, key=lambda kr: kr[0])
    return [r for _, r in best]
