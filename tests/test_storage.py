"""Row counts of a stage's Parquet folder, read from the files' footers."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from tapir_ray import storage


def _write(path, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [str(i) for i in range(n)]}), path, row_group_size=2)


def test_a_folder_counts_its_data_files_only(tmp_path):
    folder = tmp_path / "judge"
    _write(folder / "a.parquet", 5)
    _write(folder / "part" / "b.parquet", 3)  # a subfolder's files are data too
    _write(folder / "_tmp" / "c.parquet", 7)  # a writer's temporaries are not
    _write(folder / ".d.parquet", 11)
    storage.mark_success(str(folder), {"rows": 8})
    storage.write_json_atomic(str(folder / "_METRICS.json"), {"rows": 8})

    assert storage.parquet_rows(str(folder)) == 8
    assert storage.parquet_rows(str(folder / "a.parquet")) == 5
    assert storage.parquet_rows(str(tmp_path / "missing")) == 0


def test_rows_written_follows_a_folder_as_files_arrive(tmp_path):
    folder = tmp_path / "student"
    rows = storage.RowsWritten(str(folder))
    assert rows() == 0
    _write(folder / "part-1.parquet", 4)
    assert rows() == 4
    _write(folder / "part-2.parquet", 6)
    _write(folder / "_tmp" / "part-3.parquet", 9)
    assert rows() == 10
    assert rows() == storage.parquet_rows(str(folder))
