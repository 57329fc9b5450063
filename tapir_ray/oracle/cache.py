"""The persistent response cache under `<run>/oracle-cache/`: segment files of many replies each.

Keyed by sha256 of (base_url, model, messages, sampling parameters). One file per reply would be
8-10 million files for a million-row run, so replies are stored in groups:

- **Write.** An oracle actor writes a new reply at once to a segment file
  `segments/<writer>-<seq>-L0-n<count>.jsonl` (key, usd and entry per line), atomically on
  local disk, NFS or an object store through fsspec; replies that arrive while one is being written
  share the next (group commit: the slower the store, the larger the groups). Only then does a
  reply leave the client, so a killed run loses no paid reply. Whenever `MERGE_FANIN` of an
  actor's segments share a level, it merges them into one Parquet segment (columns key, usd,
  entry) of the next level (up to `MERGE_LEVELS`), so an actor leaves under 50 files plus one
  per 4,096 groups it wrote.
- **Read.** A reader indexes every segment's keys once, when first asked: 8-byte key prefixes in a
  sorted numpy array (about 12 bytes per entry: tens of millions of entries in a few hundred MB),
  so a miss costs no I/O. A hit reads its segment; the last few are kept decoded, and a resumed
  stage asks for its rows in about the order they were written.
- **Compact.** `compact()` (the driver, before each oracle stage, while no actor writes) merges
  small segments into large ones: the file count stays near entries / `COMPACT_BELOW` plus a few.
  It also folds in a cache left by an older version (one JSON file per reply).

Every oracle actor on every node reads and writes the same folder. An actor's index is built when
it starts, so a reply written by another actor of the same stage is not seen until the next stage
(an identical request in one stage is already shared in flight by the client).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tapir_ray import storage

CACHED_PARAMS = (
    "temperature",
    "top_p",
    "max_tokens",
    "seed",
    "logprobs",
    "top_logprobs",
    "stop",
    "n",
)
MERGE_FANIN = 16  # a writer's segments of one level merged into one of the next
MERGE_LEVELS = 3  # ... up to this level (16**3 groups); compact() merges the rest
COMPACT_BELOW = 65_536  # segments with fewer entries are merged by compact()
COMPACT_WHEN = 16  # ... once there are more than this many of them
COMPACT_ROW_GROUP = 8_192  # compact() writes a row group once this many entries wait
DECODED_SEGMENTS = 8  # segments a reader keeps decoded
# Keys a process wrote are held as Python strings only in groups of up to WRITTEN_FOLD; then they
# become a sorted chunk of 8-byte prefixes (about 12 bytes a key instead of about 280: an actor
# writing a million replies held a dict of them all), and beyond WRITTEN_CHUNKS chunks the chunks
# are merged into one, less the segments this writer has merged away.
WRITTEN_FOLD = 65_536
WRITTEN_CHUNKS = 4


def cache_key(base_url: str, model: str, messages: list[dict], params: dict[str, Any]) -> str:
    material = {
        "base_url": base_url,
        "model": model,
        "messages": messages,
        "params": {k: params[k] for k in CACHED_PARAMS if params.get(k) is not None},
    }
    constrained = (params.get("extra_body") or {}).get("structured_outputs")
    if constrained:  # a constrained reply differs from a free one
        material["structured_outputs"] = constrained
    return hashlib.sha256(
        json.dumps(material, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()


def _prefix(key: str) -> int:
    return int(key[:16], 16)


def _prefixes(keys) -> np.ndarray:
    """`_prefix` of every key of a segment's key column, read from its Arrow buffers: no Python
    string per entry (an index over tens of millions of replies)."""
    import pyarrow as pa

    arr = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    arr = arr.cast(pa.string())
    if len(arr) == 0:
        return np.zeros(0, np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset : arr.offset + len(arr)]
    data = np.frombuffer(arr.buffers()[2], np.uint8)
    hexes = data[offsets[:, None] + np.arange(16)].astype(np.uint64)  # 16 hex digits each
    nibbles = np.where(hexes >= ord("a"), hexes - ord("a") + 10, hexes - ord("0"))
    return (nibbles << (np.arange(15, -1, -1, dtype=np.uint64) * 4)).sum(axis=1, dtype=np.uint64)


def _count(path: str) -> int:
    """Entries in a segment, from its name (`...-n<count>.parquet`)."""
    try:
        return int(path.rsplit("-n", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return COMPACT_BELOW  # a name we did not write: never merged


class ResponseCache:
    def __init__(self, root: str):
        self.root = root
        self.segments_dir = storage.join(root, "segments")
        self.writer = f"{os.getpid()}{uuid.uuid4().hex[:8]}"
        self._seq = 0
        self._lock = threading.Lock()
        self._paths: list[str] | None = None  # segment paths; None until the index is built
        self._prefixes = np.empty(0, np.uint64)  # sorted key prefixes of the indexed segments
        self._owners = np.empty(0, np.int32)  # ... and the segment each one is in
        # Keys written by this process since its index was built → segment: the latest as a dict,
        # older ones as sorted (prefix, segment) chunks, newest last (see WRITTEN_FOLD).
        self._written: dict[str, int] = {}
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        # Segments this writer merged away since its index was built → the segment they went
        # into: a key indexed under one is looked up in what it became (no key is indexed twice).
        self._moved: dict[int, int] = {}
        self._own_at: dict[str, int] = {}  # this writer's live segments written since → index
        self._decoded: collections.OrderedDict[int, dict[str, str]] = collections.OrderedDict()
        self._own: dict[int, list[str]] = {}  # this writer's segments by merge level
        self._pending: tuple[list[tuple[str, dict]], asyncio.Future] | None = None
        self._writing = False

    # -- reading --

    def _segment_files(self) -> list[str]:
        fs, path = storage.fs_and_path(self.segments_dir)
        if not fs.exists(path):
            return []
        return sorted(fs.glob(f"{path}/*.parquet") + fs.glob(f"{path}/*.jsonl"))

    def _read(self, path: str, columns: list[str] | None = None):
        """A segment as an Arrow table (key, usd, entry), or the named columns of it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, _ = storage.fs_and_path(self.segments_dir)
        if path.endswith(".jsonl"):  # a new group: key TAB usd TAB entry (JSON has no raw tab)
            with fs.open(path, "r", encoding="utf-8") as fh:
                rows = [line.rstrip("\n").split("\t", 2) for line in fh if line.strip()]
            t = pa.table({"key": pa.array([r[0] for r in rows], pa.string()),
                          "usd": pa.array([float(r[1]) for r in rows], pa.float64()),
                          "entry": pa.array([r[2] for r in rows], pa.string())})  # fmt: skip
            return t.select(columns) if columns else t
        with fs.open(path, "rb") as fh:
            return pq.read_table(fh, columns=columns, use_threads=False)

    def _ensure_index(self) -> None:
        if self._paths is not None:
            return
        paths = self._segment_files()
        with ThreadPoolExecutor(16) as pool:  # object stores: one request per segment, in parallel
            keys = list(pool.map(lambda p: _prefixes(self._read(p, ["key"])["key"]), paths))
        prefixes = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        owners = np.repeat(np.arange(len(paths), dtype=np.int32), [len(ks) for ks in keys])
        order = np.argsort(prefixes, kind="stable")
        self._prefixes, self._owners, self._paths = prefixes[order], owners[order], paths

    def _decoded_segment(self, index: int) -> dict[str, str]:
        with self._lock:
            if index in self._decoded:
                self._decoded.move_to_end(index)
                return self._decoded[index]
            path = self._paths[index]
        t = self._read(path, ["key", "entry"])
        rows = dict(zip(t["key"].to_pylist(), t["entry"].to_pylist(), strict=True))
        with self._lock:
            self._decoded[index] = rows
            while len(self._decoded) > DECODED_SEGMENTS:
                self._decoded.popitem(last=False)
        return rows

    def get(self, key: str) -> dict[str, Any] | None:
        for _ in range(2):
            try:
                return self._lookup(key)
            except FileNotFoundError:  # another writer merged a segment away: index again
                with self._lock:
                    self._paths, self._written, self._chunks, self._moved = None, {}, [], {}
                    self._own_at = {}
                    self._decoded.clear()
        return None

    def load_index(self) -> None:
        """Indexes the segments now, rather than at the first `get`."""
        with self._lock:
            self._ensure_index()

    def surely_missing(self, key: str) -> bool:
        """Whether the index in memory already tells that `key` is not cached: a miss needs no
        thread and no I/O (False when the index is not built yet or is being changed)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            return self._paths is not None and not self._indexed(key)
        finally:
            self._lock.release()

    def _indexed(self, key: str) -> list[int]:
        """The segments the index maps `key`'s prefix to, the newest mapping first (more than one
        for a key-prefix collision or a merged segment); called with the lock held."""
        written = self._written.get(key)
        if written is not None:
            return [written]
        p = np.uint64(_prefix(key))
        return [
            owner
            for prefixes, segments in (*reversed(self._chunks), (self._prefixes, self._owners))
            for owner in segments[
                np.searchsorted(prefixes, p, "left") : np.searchsorted(prefixes, p, "right")
            ].tolist()
        ]  # fmt: skip

    def _lookup(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            self._ensure_index()
            # A segment this writer merged away: the one it went into.
            owners = list(dict.fromkeys(self._live(o) for o in self._indexed(key)))
        missing = False
        for index in owners:
            try:
                text = self._decoded_segment(index).get(key)
            except FileNotFoundError:
                missing = True  # merged away by another writer, or by this one
                continue
            except (OSError, ValueError):
                continue  # an unreadable segment: ask again rather than fail the row
            if text is not None:
                return json.loads(text)
        if missing:  # perhaps in a segment that is not indexed yet: `get` indexes again
            raise FileNotFoundError(key)
        return None

    def _live(self, index: int) -> int:
        """The segment that holds what segment `index` held (itself, unless it was merged)."""
        while index in self._moved:
            index = self._moved[index]
        return index

    def _fold_written(self) -> None:
        """The dict of written keys becomes a sorted chunk of prefixes; too many chunks become
        one, pointing at the segments the merged ones went into. Called with the lock held."""
        keys = list(self._written)
        prefixes = np.fromiter((_prefix(k) for k in keys), np.uint64, len(keys))
        owners = np.fromiter(self._written.values(), np.int32, len(keys))
        self._written = {}
        chunks = self._chunks
        if len(chunks) >= WRITTEN_CHUNKS:
            prefixes = np.concatenate([*(c[0] for c in chunks), prefixes])
            live = np.arange(len(self._paths), dtype=np.int32)
            for index in self._moved:
                live[index] = self._live(index)
            owners = live[np.concatenate([*(c[1] for c in chunks), owners])]
            chunks = []
        order = np.argsort(prefixes, kind="stable")  # stable: the later of two mappings stays later
        self._chunks = [*chunks, (prefixes[order], owners[order])]

    def entries(self):
        """Every cached (key, entry), segment by segment."""
        for path in self._segment_files():
            t = self._read(path, ["key", "entry"])
            for k, e in zip(t["key"].to_pylist(), t["entry"].to_pylist(), strict=True):
                yield k, json.loads(e)

    def total_usd(self) -> float:
        """What every cached reply cost: the spend a ledger can be rebuilt from (a reply in two
        segments, as a compaction killed midway leaves it, counts once). A segment merged away
        while it is read (another process's writer) means reading the listing again: a merge
        writes its output before it deletes its inputs."""
        for attempt in range(8):
            try:
                tables = [self._read(p, ["key", "usd"]) for p in self._segment_files()]
                break
            except FileNotFoundError:
                if attempt == 7:
                    raise
        if not tables:
            return 0.0
        keys = np.concatenate([_prefixes(t["key"]) for t in tables])
        usd = np.concatenate([t["usd"].to_numpy() for t in tables])
        return float(usd[np.unique(keys, return_index=True)[1]].sum())

    # -- writing --

    def _segment_name(self, level: int, entries: int) -> str:
        with self._lock:
            self._seq += 1
            return f"{self.writer}-{self._seq:08d}-L{level}-n{entries}"

    def _write_group(self, group: list[tuple[str, dict[str, Any]]]) -> None:
        """A new group as a few JSON lines: a tenth of a Parquet file's cost to write, and one is
        written for every reply a slow endpoint sends."""
        name = self._segment_name(0, len(group)) + ".jsonl"
        fs, folder = storage.fs_and_path(self.segments_dir)
        fs.makedirs(folder, exist_ok=True)
        path, tmp = f"{folder}/{name}", f"{folder}/.{name}.tmp"
        with fs.open(tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{k}\t{float(e.get('usd') or 0.0)!r}\t{json.dumps(e, ensure_ascii=False)}\n"
                         for k, e in group)  # fmt: skip
        _publish(fs, tmp, path)
        with self._lock:
            self._own.setdefault(0, []).append(path)
            if self._paths is not None:  # found by this reader from now on
                self._paths.append(path)
                self._own_at[path] = len(self._paths) - 1
                self._written.update((k, len(self._paths) - 1) for k, _ in group)
                if len(self._written) >= WRITTEN_FOLD:
                    self._fold_written()

    def _merge(self, level: int) -> None:
        """This writer's segments of `level` become one Parquet segment of the next level (whose
        key column an index reads alone), streamed a row group at a time: a merge holds one of
        its inputs, not all of them (read as Python strings all at once, merging 16 segments of
        level 2 into one of level 3 held the replies of 4,096 groups, twice over)."""
        own = self._own[level]
        with _SegmentWriter(self, level + 1, limit=None) as out:
            for path in own:
                out.add(self._read(path))
        with self._lock:
            self._own[level] = []
            self._own.setdefault(level + 1, []).extend(out.paths)
            if self._paths is not None and out.paths:  # found from now on, under the old keys
                self._paths.extend(out.paths)
                merged = len(self._paths) - 1
                self._own_at[out.paths[-1]] = merged
                for path in own:  # by their index, not a scan of every path (one per group)
                    index = self._own_at.pop(path, None)
                    if index is None and path in self._paths:  # written before the index was built
                        index = self._paths.index(path)
                    if index is not None:
                        self._moved[index] = merged
        fs, _ = storage.fs_and_path(self.segments_dir)
        for path in own:  # merged: every entry is in the new segment
            fs.rm(path)

    def _write(self, group: list[tuple[str, dict[str, Any]]]) -> None:
        """One segment for `group`; then, while `MERGE_FANIN` of this writer's segments share a
        level, they become one segment of the next level (up to `MERGE_LEVELS`)."""
        self._write_group(group)
        for level in range(MERGE_LEVELS):
            if len(self._own.get(level, [])) < MERGE_FANIN:
                break
            self._merge(level)

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Stores one reply at once; the oracle stage uses `put_async`."""
        self._write([(key, value)])

    def put_many(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        """Stores replies received together (a Batch API output file) in one segment."""
        if entries:
            self._write(entries)

    async def put_async(self, key: str, value: dict[str, Any]) -> None:
        """Stores a reply; returns once it is in a segment. A reply arriving while a segment is
        being written waits for the next one, with every other reply that arrives meanwhile."""
        loop = asyncio.get_running_loop()
        if self._pending is None:
            self._pending = ([], loop.create_future())
            if not self._writing:
                loop.create_task(self._drain())
        entries, done = self._pending
        entries.append((key, value))
        await asyncio.shield(done)

    async def _drain(self) -> None:
        self._writing = True
        try:
            while self._pending is not None:
                (entries, done), self._pending = self._pending, None
                try:
                    await asyncio.to_thread(self._write, entries)
                except BaseException as exc:  # each waiting reply fails with it (asked again)
                    done.set_exception(exc)
                    done.exception()  # retrieved here, so an unawaited failure does not warn
                else:
                    done.set_result(None)
        finally:
            self._writing = False

    # -- compaction --

    def _legacy_table(self, fs, paths: list[str]):
        """An older version's one-JSON-file-per-reply entries as a segment's table."""
        import pyarrow as pa

        keys, usd, texts = [], [], []
        for path in paths:
            with contextlib.suppress(OSError, ValueError), fs.open(path, "r") as fh:
                text = fh.read()
                usd.append(float(json.loads(text).get("usd") or 0.0))
                keys.append(path.rsplit("/", 1)[1][: -len(".json")])
                texts.append(text)
        return pa.table({"key": pa.array(keys, pa.string()), "usd": pa.array(usd, pa.float64()),
                         "entry": pa.array(texts, pa.string())})  # fmt: skip

    def compact(self) -> int:
        """Merges small segments (and an older version's one-JSON-file-per-reply cache) into
        segments of up to `COMPACT_BELOW` entries; call it while no actor writes. Returns the
        number of files it replaced."""
        fs, root = storage.fs_and_path(self.root)
        if not fs.exists(root):
            return 0
        legacy = sorted(fs.glob(f"{root}/??/*.json"))
        small = [p for p in self._segment_files() if _count(p) < COMPACT_BELOW]
        if not legacy and len(small) <= COMPACT_WHEN:
            return 0
        # Streamed through Arrow, a row group at a time, in memory from the system's allocator:
        # holding the merged entries as Python strings (COMPACT_BELOW of them and a segment more)
        # took a process's private memory 180 MB up merging the 2 million replies of a 1M-row
        # round (it kept 150 MB of it); streamed, 120 MB from Arrow's default allocator
        # (mimalloc), and 75 MB from the system's (45 MB kept).
        with _system_arrow_memory(), _SegmentWriter(self, MERGE_LEVELS + 1, COMPACT_BELOW) as out:
            for start in range(0, len(legacy), COMPACT_ROW_GROUP):
                out.add(self._legacy_table(fs, legacy[start : start + COMPACT_ROW_GROUP]))
            for path in small:
                out.add(self._read(path))
        # Every merged segment is written before any file goes.
        for path in legacy + small:
            fs.rm(path)
        for folder in {p.rsplit("/", 1)[0] for p in legacy}:
            with contextlib.suppress(OSError):
                fs.rmdir(folder)
        return len(legacy) + len(small)


@contextlib.contextmanager
def _system_arrow_memory():
    """Arrow allocates from the C library's allocator inside the block (buffers remember their
    allocator, so those freed later go back to the right one)."""
    import pyarrow as pa

    before = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(before)


def _publish(fs, tmp: str, path: str) -> None:
    """A segment written to `tmp` appears at `path` whole or not at all."""
    if isinstance(fs, storage.LocalFileSystem):
        os.replace(tmp, path)  # atomic on POSIX
    else:
        fs.mv(tmp, path)  # object stores: a put is atomic per object


class _SegmentWriter:
    """Merged segments of `level`: of `limit` entries each (the last one fewer; one segment if
    None), written a row group at a time as the segments merged into them are read. `paths`:
    those published, in order."""

    def __init__(self, cache: ResponseCache, level: int, limit: int | None):
        import pyarrow as pa

        self.cache, self.level = cache, level
        self.limit = limit
        self.paths: list[str] = []
        self.fs, self.folder = storage.fs_and_path(cache.segments_dir)
        self.schema = pa.schema(
            [("key", pa.string()), ("usd", pa.float64()), ("entry", pa.string())]
        )
        self.buffered: list = []  # tables not written yet, fewer than COMPACT_ROW_GROUP entries
        self.file = self.writer = self.tmp = None
        self.entries = 0  # in the segment being written

    def __enter__(self) -> _SegmentWriter:
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            self._write(final=True)
            self._close()
        elif self.writer is not None:  # a failed merge leaves its inputs and no output
            self.writer.close()
            self.file.close()
            with contextlib.suppress(OSError):
                self.fs.rm(self.tmp)

    def add(self, table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        while table.num_rows:  # no segment over `limit` entries
            room = table.num_rows
            if self.limit is not None:
                room = self.limit - self.entries - sum(t.num_rows for t in self.buffered)
            self.buffered.append(table.slice(0, room))
            table = table.slice(room)
            self._write(final=False)

    def _write(self, final: bool) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        waiting = sum(t.num_rows for t in self.buffered)
        full = self.limit is not None and self.entries + waiting >= self.limit
        if not waiting or not (final or full or waiting >= COMPACT_ROW_GROUP):
            return
        if self.writer is None:
            self.fs.makedirs(self.folder, exist_ok=True)
            self.tmp = f"{self.folder}/.merge-{uuid.uuid4().hex}.tmp"
            self.file = self.fs.open(self.tmp, "wb")
            self.writer = pq.ParquetWriter(self.file, self.schema)
        self.writer.write_table(pa.concat_tables(self.buffered).combine_chunks())
        self.entries += waiting
        self.buffered = []
        if full:
            self._close()

    def _close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.file.close()
        name = self.cache._segment_name(self.level, self.entries)
        self.paths.append(f"{self.folder}/{name}.parquet")
        _publish(self.fs, self.tmp, self.paths[-1])
        self.file = self.writer = self.tmp = None
        self.entries = 0
