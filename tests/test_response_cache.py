"""The response cache: replies stored in groups (not a file each), found again by any later reader,
misses answered from memory, compaction that keeps every reply and its cost."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from tapir_ray.oracle import cache as cache_mod
from tapir_ray.oracle.cache import ResponseCache, cache_key


def _key(i: int) -> str:
    return cache_key("http://x/v1", "m", [{"role": "user", "content": f"q{i}"}], {"max_tokens": 8})


def _entry(i: int) -> dict:
    return {"text": f"answer {i}", "usage": {"prompt_tokens": 3, "completion_tokens": i}, "usd": 0.01 * i,
            "response_id": f"r{i}", "refusal": False, "logprobs": None}  # fmt: skip


def _segments(root: Path) -> list[Path]:
    return sorted((root / "segments").glob("*.parquet")) + sorted(
        (root / "segments").glob("*.jsonl")
    )


def test_replies_arriving_together_share_a_segment_and_are_durable_when_put_returns(tmp_path):
    root = tmp_path / "oracle-cache"
    writer = ResponseCache(str(root))
    seen_on_return: list[bool] = []

    async def reply(i: int) -> None:
        await writer.put_async(_key(i), _entry(i))
        # Durable before the row goes on: a new reader (another process, a resumed run) finds it.
        seen_on_return.append(ResponseCache(str(root)).get(_key(i)) == _entry(i))

    async def main() -> None:
        await asyncio.gather(*(reply(i) for i in range(300)))

    asyncio.run(main())
    assert all(seen_on_return) and len(seen_on_return) == 300
    assert 1 <= len(_segments(root)) <= 3  # 300 replies in a few files, not 300
    assert writer.get(_key(5)) == _entry(5)  # the writer reads its own replies too
    assert ResponseCache(str(root)).total_usd() == pytest.approx(sum(0.01 * i for i in range(300)))


def test_a_writer_merges_its_segments_and_a_reader_whose_index_is_older_still_finds_them(
    tmp_path, monkeypatch
):
    import pyarrow.parquet as pq

    monkeypatch.setattr(cache_mod, "COMPACT_ROW_GROUP", 64)
    root = tmp_path / "oracle-cache"
    writer = ResponseCache(str(root))
    writer.put(_key(0), _entry(0))
    stale = ResponseCache(str(root))
    assert stale.get(_key(999)) is None  # its index: one segment, soon merged away
    for i in range(1, 300):  # replies one at a time, as a slow endpoint sends them
        writer.put(_key(i), _entry(i))
    fanin = cache_mod.MERGE_FANIN
    assert len(_segments(root)) < 3 * fanin  # not 300
    assert {p.name.split("-L")[1][0] for p in _segments(root)} >= {"1", "2"}  # merged twice over
    # A merge streams: its output is written a row group at a time as its inputs are read.
    (merged,) = [pq.ParquetFile(p).metadata for p in _segments(root) if "-L2-" in p.name]
    assert merged.num_rows == fanin**2 and merged.num_row_groups == fanin**2 // 64
    assert [writer.get(_key(i)) for i in range(300)] == [_entry(i) for i in range(300)]
    # Its segment is gone: the reader indexes again and finds it, and what came later too.
    assert stale.get(_key(0)) == _entry(0) and stale.get(_key(7)) == _entry(7)
    assert ResponseCache(str(root)).total_usd() == pytest.approx(sum(0.01 * i for i in range(300)))


def _count_reads(monkeypatch) -> list[list[str] | None]:
    """The columns of every segment read from now on (None: all of them)."""
    reads: list[list[str] | None] = []
    real_read = ResponseCache._read

    def counting(self, path, columns=None):
        reads.append(columns)
        return real_read(self, path, columns)

    monkeypatch.setattr(ResponseCache, "_read", counting)
    return reads


def test_a_miss_reads_no_file_and_a_resumed_stage_reads_each_segment_once(tmp_path, monkeypatch):
    root = tmp_path / "oracle-cache"
    for start in range(0, 100, 10):  # ten segments, as ten groups of replies leave them
        ResponseCache(str(root)).put_many([(_key(i), _entry(i)) for i in range(start, start + 10)])
    assert len(_segments(root)) == 10
    reads = _count_reads(monkeypatch)
    reader = ResponseCache(str(root))
    assert not reader.surely_missing(_key(1000))  # no index yet: only a lookup can tell
    assert reader.get(_key(1000)) is None
    assert reads == [["key"]] * 10  # the index: each segment's key column, once
    assert all(reader.get(_key(1000 + i)) is None for i in range(50))
    assert len(reads) == 10  # misses answered from memory
    # ... and told without a lookup (the oracle client's fast path), never for a cached key
    assert all(reader.surely_missing(_key(2000 + i)) for i in range(50))
    assert not any(reader.surely_missing(_key(i)) for i in range(100))
    assert [reader.get(_key(i)) for i in range(100)] == [_entry(i) for i in range(100)]
    assert reads.count(["key", "entry"]) == 10  # rows asked in write order: each segment read once


def test_compaction_merges_small_segments_and_an_old_per_reply_cache_keeping_every_reply(
    tmp_path, monkeypatch
):
    root = tmp_path / "oracle-cache"
    for i in range(30):
        ResponseCache(str(root)).put(_key(i), _entry(i))  # 30 one-reply segments
    for i in range(30, 35):  # what an older version left: one JSON file per reply
        key = _key(i)
        (root / key[:2]).mkdir(parents=True, exist_ok=True)
        (root / key[:2] / f"{key}.json").write_text(json.dumps(_entry(i)))
    before = ResponseCache(str(root)).total_usd()
    assert ResponseCache(str(root)).compact() == 35
    assert len(_segments(root)) == 1 and not list(root.glob("??/*.json"))
    reader = ResponseCache(str(root))
    assert [reader.get(_key(i)) for i in range(35)] == [_entry(i) for i in range(35)]
    assert reader.total_usd() == pytest.approx(before + sum(0.01 * i for i in range(30, 35)))
    assert ResponseCache(str(root)).compact() == 0  # nothing small left to merge
    # A compaction killed after writing its segment but before removing the old ones leaves
    # every reply twice: still found, and its cost counted once.
    shutil.copy(_segments(root)[0], root / "segments" / "copy-00000001-n35.parquet")
    assert ResponseCache(str(root)).total_usd() == pytest.approx(reader.total_usd())
    assert ResponseCache(str(root)).get(_key(3)) == _entry(3)
    # Segments of COMPACT_BELOW entries or more are left as they are.
    monkeypatch.setattr(cache_mod, "COMPACT_BELOW", 20)
    monkeypatch.setattr(cache_mod, "COMPACT_WHEN", 0)
    assert ResponseCache(str(root)).compact() == 0


def test_compaction_streams_into_segments_of_at_most_compact_below_entries(tmp_path, monkeypatch):
    """Merged a few segments at a time: every output segment holds at most COMPACT_BELOW entries,
    its name counts them, and every reply and its cost are kept."""
    import pyarrow.parquet as pq

    monkeypatch.setattr(cache_mod, "COMPACT_BELOW", 16)
    monkeypatch.setattr(cache_mod, "COMPACT_ROW_GROUP", 5)
    root, i = tmp_path / "oracle-cache", 0
    for size in [7, 3, 11, 1, 9, 4, 13, 2, 6, 8, 5, 10, 1, 3, 12, 7, 2, 9]:  # 113 replies
        ResponseCache(str(root)).put_many([(_key(k), _entry(k)) for k in range(i, i + size)])
        i += size
    before = ResponseCache(str(root)).total_usd()
    assert ResponseCache(str(root)).compact() == 18
    out = _segments(root)
    counts = [pq.ParquetFile(p).metadata.num_rows for p in out]
    assert sum(counts) == i and counts.count(16) == i // 16 and max(counts) == 16
    assert [int(p.stem.rsplit("-n", 1)[1]) for p in out] == counts
    assert not list((root / "segments").glob(".*"))  # no temporary file left
    reader = ResponseCache(str(root))
    assert [reader.get(_key(k)) for k in range(i)] == [_entry(k) for k in range(i)]
    assert reader.total_usd() == pytest.approx(before)


def test_a_writer_finds_what_it_wrote_without_holding_every_key_it_wrote(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "WRITTEN_FOLD", 8)
    monkeypatch.setattr(cache_mod, "WRITTEN_CHUNKS", 2)
    root = tmp_path / "oracle-cache"
    writer = ResponseCache(str(root))
    assert writer.get(_key(999)) is None  # its index is built before it writes, as in a stage
    reads = _count_reads(monkeypatch)
    for i in range(300):  # one at a time: its segments are merged over and over meanwhile
        writer.put(_key(i), _entry(i))
    assert len(writer._written) < 8  # the keys as strings: a few, not 300
    # Each key indexed once: a merged segment is found under the keys of the ones it replaced.
    assert len(writer._written) + sum(len(prefixes) for prefixes, _ in writer._chunks) == 300
    assert [writer.get(_key(i)) for i in range(300)] == [_entry(i) for i in range(300)]
    assert not any(writer.surely_missing(_key(i)) for i in range(300))  # written, folded or not
    assert writer.get(_key(1000)) is None and writer.surely_missing(_key(1000))
    assert ["key"] not in reads  # found from what it wrote: the folder was not indexed again


def test_keys_sharing_an_index_prefix_are_told_apart(tmp_path):
    root = tmp_path / "oracle-cache"
    a, b = "ab" * 8 + "0" * 48, "ab" * 8 + "1" * 48  # the same 8-byte prefix
    ResponseCache(str(root)).put(a, _entry(1))
    ResponseCache(str(root)).put(b, _entry(2))
    reader = ResponseCache(str(root))
    assert reader.get(a) == _entry(1) and reader.get(b) == _entry(2)
    assert reader.get("ab" * 8 + "2" * 48) is None
    assert not reader.surely_missing("ab" * 8 + "2" * 48)  # its prefix is there: a lookup tells
