"""Run-directory I/O for local paths and fsspec URLs (s3://, gs://, ...) alike.

Small JSON files (state, summaries, metrics) are written atomically: to a temporary name, then
renamed, so a reader never sees half a file and a killed writer leaves the previous version.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def absolute(url: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's working directory)."""
    return url if "://" in url else os.path.abspath(url)


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = fs_and_path(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str) -> None:
    fs, path = fs_and_path(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_text_atomic(url: str, text: str) -> None:
    fs, path = fs_and_path(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    if isinstance(fs, LocalFileSystem):
        os.replace(tmp, path)  # atomic on POSIX
    else:
        fs.mv(tmp, path)  # object stores: a put is atomic per object; mv = copy + delete


def read_text(url: str) -> str:
    fs, path = fs_and_path(url)
    with fs.open(path, "r", encoding="utf-8") as f:
        return f.read()


def write_json_atomic(url: str, data: Any) -> None:
    write_text_atomic(url, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def mark_success(stage_dir: str, info: dict[str, Any] | None = None) -> None:
    write_json_atomic(join(stage_dir, "_SUCCESS"), info or {})


def is_done(stage_dir: str) -> bool:
    return exists(join(stage_dir, "_SUCCESS"))


# --- Parquet folders (stage outputs) -------------------------------------------------------------


def _data_files(fs: Any, path: str) -> list[str]:
    """The files under a Parquet folder that a reader takes for data: as pyarrow's datasets, a
    name (or a folder's name) that starts with `_` or `.` (success marker, metrics, temporaries)
    is not data."""
    if fs.isfile(path):
        return [path]
    return [f for f in fs.find(path) if not any(part[:1] in ("_", ".") for part in f[len(path) :].split("/") if part)]  # fmt: skip


def _footer_rows(fs: Any, f: str) -> int:
    import pyarrow.parquet as pq

    with fs.open(f, "rb") as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def parquet_rows(folder: str) -> int:
    """Rows in a folder of Parquet files, from the footers (no data is read), one file at a time:
    a pyarrow dataset's `count_rows` keeps every file's footer in the process, and the memory
    stays with it (277 MB in a driver that counted a 1,000,000-row round's verdicts, 1,200 files
    of 78 row groups)."""
    fs, path = fs_and_path(folder)
    if not fs.exists(path):
        return 0
    return sum(_footer_rows(fs, f) for f in _data_files(fs, path))


class RowsWritten:
    """Rows in a folder that a running stage adds Parquet files to (a file never changes once it
    has its name): each file's footer is read once, however often the count is asked for (a
    progress line over a scoring phase's thousand answer files)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._rows: dict[str, int] = {}

    def __call__(self) -> int:
        fs, path = fs_and_path(self.folder)
        if not fs.exists(path):
            return 0
        for f in _data_files(fs, path):
            if f.endswith(".parquet") and f not in self._rows:
                self._rows[f] = _footer_rows(fs, f)
        return sum(self._rows.values())


def read_table(folder: str, columns: list[str] | None = None):
    """A folder of Parquet files as one Arrow table (for the small columns a plan needs).

    Files without rows are skipped: a stage whose every row was dead-lettered in a block leaves a
    file without columns. A folder with no rows at all gives an empty table of `columns`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = fs_and_path(folder)
    files = sorted(
        f for f in fs.find(path) if f.endswith(".parquet") and "/_" not in f[len(path) :]
    )
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            t = pq.read_table(fh)
        if t.num_rows:
            tables.append(t.select(columns) if columns else t)
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns or []})
    return pa.concat_tables(tables, promote_options="default")


def write_table(table, folder: str) -> None:
    """Replace `folder` with one Parquet file holding `table`."""
    import pyarrow.parquet as pq

    remove(folder)
    fs, path = fs_and_path(folder)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/part-00000.parquet", "wb") as f:
        pq.write_table(table, f)


def read_json_rows(url: str, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A JSON array (or object) or JSONL file as rows; each of `required` must be a non-empty
    string. Raises ValueError with one line naming the file, the row and the field."""
    text = read_text(url)
    try:
        rows = json.loads(text)
        rows = rows if isinstance(rows, list) else [rows]
    except json.JSONDecodeError:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{url}:{n}: not JSON ({exc.msg})") from None
    for n, r in enumerate(rows, 1):
        for field in required:
            if not isinstance(r, dict) or not isinstance(r.get(field), str) or not r[field].strip():
                raise ValueError(f"{url}: row {n}: field {field!r} is missing or empty")
    return rows
