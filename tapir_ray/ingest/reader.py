"""Reading pool files with Ray Data, streaming, into canonical rows.

Ray's own readers (read_json, read_csv) parse a file with Arrow and fail the whole file on one bad
line or one undecodable byte, and they do not report row numbers. A pool of millions of scraped rows
always has a few of those, and each must land in the quarantine with its file and line while the
rest goes on. So `PoolDatasource` subclasses Ray's FileBasedDatasource (which keeps the file listing,
filesystems and read-task parallelism) and parses each file itself, emitting canonical blocks.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from tapir_ray.ingest.canonical import BlockBuilder

EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".arrow": "hf",
}  # fmt: skip
# Compressed text files are read through Arrow's codecs, chosen by this last extension.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4", ".br": "brotli"}
BOM = b"\xef\xbb\xbf"
FORMATS = ("json", "jsonl", "parquet", "csv", "hf")


class IngestError(Exception):
    """A pool that cannot be read at all: one line naming the file."""


@dataclass(frozen=True)
class PoolFile:
    path: str  # as the filesystem names it
    label: str  # as the user named it (for messages and origins)
    format: str
    index: int


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), path


def _compression(path: str) -> str | None:
    lower = path.lower()
    return next((c for ext, c in COMPRESSIONS.items() if lower.endswith(ext)), None)


def _sniff_json(fs: pafs.FileSystem, path: str, label: str) -> str:
    """A .json file is a JSON array (json) or one object per line (jsonl)."""
    with fs.open_input_stream(path, compression=_compression(path)) as f:
        head = f.read(4096).removeprefix(BOM).lstrip()
    if head[:1] == b"[":
        return "json"
    if head[:1] == b"{" or not head:
        return "jsonl"
    raise IngestError(f"{label}: not JSON (it starts with {head[:20]!r}, expected '[' or '{{')")


def _hf_files(fs: pafs.FileSystem, root: str, label: str) -> list[str]:
    """The Arrow files of a dataset saved with `datasets.save_to_disk` (the train split of a DatasetDict)."""

    def split_files(folder: str) -> list[str]:
        state = folder + "/state.json"
        try:
            with fs.open_input_stream(state) as f:
                names = [d["filename"] for d in json.loads(f.read())["_data_files"]]
        except (FileNotFoundError, OSError, KeyError, ValueError) as exc:
            raise IngestError(
                f"{label}: not a saved HF dataset ({folder}/state.json: {exc})"
            ) from None
        return [f"{folder}/{n}" for n in names]

    dict_file = root + "/dataset_dict.json"
    if fs.get_file_info(dict_file).type == pafs.FileType.File:
        with fs.open_input_stream(dict_file) as f:
            splits = json.loads(f.read()).get("splits", [])
        chosen = ["train"] if "train" in splits else splits
        return [p for s in chosen for p in split_files(f"{root}/{s}")]
    return split_files(root)


def resolve_pool_files(
    paths: list[str], fmt: str = "auto", skipped: list[str] | None = None
) -> list[PoolFile]:
    """Expand the configured paths (files, folders, saved HF datasets) into an ordered file list.
    Files in a folder that no reader takes are appended to `skipped` (the summary lists them)."""
    out: list[tuple[str, str, str]] = []
    for label in paths:
        fs, path = _filesystem(label)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise IngestError(f"{label}: no such file or folder")
        if info.type == pafs.FileType.Directory:
            is_hf = any(
                fs.get_file_info(f"{path}/{m}").type == pafs.FileType.File
                for m in ("dataset_dict.json", "state.json")
            )
            if fmt == "hf" or (fmt == "auto" and is_hf):
                out += [
                    (p, f"{label}/{p.rsplit('/', 1)[-1]}", "hf") for p in _hf_files(fs, path, label)
                ]
                continue
            found = sorted(
                (
                    i.path
                    for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                    if i.type == pafs.FileType.File
                ),
            )
            if fmt == "auto":
                unread = [p for p in found if not _ext_format(p)]
                if skipped is not None:
                    skipped += [label.rstrip("/") + p[len(path.rstrip("/")) :] for p in unread]
                found = [p for p in found if _ext_format(p)]
            if not found:
                raise IngestError(
                    f"{label}: the folder holds no pool files (.jsonl, .json, .parquet, .csv)"
                )
            out += [(p, label.rstrip("/") + p[len(path.rstrip("/")) :], fmt) for p in found]
        else:
            out.append((path, label, fmt))
    files = []
    for index, (path, label, f) in enumerate(out):
        fs, _ = _filesystem(label if "://" in label else path)
        if f == "auto":
            f = _ext_format(path)
            if f is None:
                raise IngestError(
                    f"{label}: unknown format (use .jsonl, .json, .parquet, .csv or set pool.format)"
                )
        if f not in FORMATS:
            raise IngestError(
                f"{label}: unknown format {f!r} (expected one of {', '.join(FORMATS)})"
            )
        if f in ("json", "jsonl") and _strip_compression(path).lower().endswith(".json"):
            f = _sniff_json(fs, path, label)
        try:
            with fs.open_input_stream(path, compression=_compression(path)) as stream:
                stream.read(1)
            if f == "parquet":  # an empty or truncated file: one line naming it, not a traceback
                with fs.open_input_file(path) as handle:
                    pq.ParquetFile(handle).metadata  # noqa: B018
        except (OSError, pa.ArrowException) as exc:
            what = "not a readable Parquet file" if f == "parquet" else "cannot read the file"
            raise IngestError(f"{label}: {what} ({str(exc).splitlines()[0][:160]})") from None
        files.append(PoolFile(path=path, label=label, format=f, index=index))
    return files


def _strip_compression(path: str) -> str:
    lower = path.lower()
    for ext in COMPRESSIONS:
        if lower.endswith(ext):
            return path[: -len(ext)]
    return path


def _ext_format(path: str) -> str | None:
    lower = _strip_compression(path).lower()
    fmt = next((fmt for ext, fmt in EXTENSIONS.items() if lower.endswith(ext)), None)
    if fmt in ("parquet", "hf") and lower != path.lower():
        return None  # compressed inside their own format, never as a whole file
    return fmt


class PoolDatasource(FileBasedDatasource):
    """Streams pool files of any supported format as canonical-row blocks."""

    def __init__(
        self,
        files: list[PoolFile],
        *,
        schema: str,
        columns: dict,
        max_chars: int,
        block_rows: int = 4096,
    ):
        super().__init__([f.path for f in files])
        self._files = {f.path: f for f in files}
        self._canon = dict(schema=schema, columns=columns, max_chars=max_chars)
        self._block_rows = block_rows

    def _open_input_source(self, filesystem, path, **open_args):
        if self._files[path].format == "parquet":
            return filesystem.open_input_file(path)  # Parquet needs random access
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        pool_file = self._files[path]
        builder = BlockBuilder(**self._canon, file_index=pool_file.index, label=pool_file.label)
        reader = {
            "jsonl": self._jsonl,
            "json": self._json_array,
            "csv": self._csv,
            "parquet": self._parquet,
            "hf": self._arrow_stream,
        }[pool_file.format]
        for _ in reader(f, builder, pool_file):
            if len(builder) >= self._block_rows:
                yield builder.flush()
        if len(builder):
            yield builder.flush()

    @staticmethod
    def _text(f: pa.NativeFile) -> io.TextIOWrapper:
        # surrogateescape keeps undecodable bytes visible to the per-field check instead of
        # failing the whole file.
        return io.TextIOWrapper(
            io.BufferedReader(f, buffer_size=1 << 20),
            encoding="utf-8-sig",  # a leading byte-order mark is dropped, not read as text
            errors="surrogateescape",
            newline="",
        )

    def _jsonl(self, f, builder: BlockBuilder, pf: PoolFile) -> Iterator[None]:
        for n, line in enumerate(self._text(f), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                builder.add_bad(
                    n, f"unparsable JSON line ({exc.msg} at column {exc.colno})", line.rstrip("\n")
                )
            else:
                builder.add(n, record)
            yield

    def _json_array(self, f, builder: BlockBuilder, pf: PoolFile) -> Iterator[None]:
        """A JSON array streamed element by element (ijson): never the whole file in memory."""
        import ijson

        stream = io.BufferedReader(f, buffer_size=1 << 20)
        if stream.peek(3)[:3] == BOM:
            stream.read(3)
        n = 0
        try:
            for n, record in enumerate(ijson.items(stream, "item", use_float=True), start=1):
                builder.add(n, record)
                yield
        except ijson.JSONError as exc:
            raise IngestError(
                f"{pf.label}: invalid JSON after element {n} ({str(exc).splitlines()[0][:120]}); "
                "a JSON file must hold one array of objects"
            ) from None

    def _csv(self, f, builder: BlockBuilder, pf: PoolFile) -> Iterator[None]:
        reader = csv.reader(self._text(f))
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise IngestError(f"{pf.label}: unreadable CSV header ({exc})") from None
        n = 0  # records, counted from 1 after the header (a quoted field may span lines)
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                n += 1
                builder.add_bad(n, f"unparsable CSV row ({exc})", "")
                yield
                continue
            if not fields:
                continue
            n += 1
            if len(fields) != len(header):
                builder.add_bad(
                    n,
                    f"CSV row has {len(fields)} fields, the header has {len(header)}",
                    ",".join(fields),
                )
            else:
                builder.add(n, dict(zip(header, fields, strict=True)))
            yield

    def _parquet(self, f, builder: BlockBuilder, pf: PoolFile) -> Iterator[None]:
        n = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=self._block_rows):
            for record in batch.to_pylist():
                n += 1
                builder.add(n, record)
                yield

    def _arrow_stream(self, f, builder: BlockBuilder, pf: PoolFile) -> Iterator[None]:
        n = 0
        # A stream's record batches are as large as its writer made them (one batch can hold the
        # whole file): rows become Python a block at a time, as Parquet's are.
        for batch in pyarrow.ipc.open_stream(f):
            for start in range(0, batch.num_rows, self._block_rows):
                for record in batch.slice(start, self._block_rows).to_pylist():
                    n += 1
                    builder.add(n, record)
                    yield
