"""Streaming ingest through a real local Ray cluster: formats, schemas, quarantine, dedup, decontamination."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from tapir_ray.config import PoolConfig
from tapir_ray.ingest import IngestError, ingest, normalize_text, read_pool, row_id
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(300)

ALPACA = [
    {
        "instruction": "Give three tips for staying healthy.",
        "input": "",
        "output": "Eat well, sleep, move.",
    },
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
]


def run_ingest(tmp_path: Path, paths, **pool) -> tuple:
    pool.setdefault("decontaminate_against", [])
    summary = ingest(PoolConfig(paths=[str(p) for p in paths], **pool), str(tmp_path / "out"))
    rows = sorted(read_pool(str(tmp_path / "out")).take_all(), key=lambda r: r["order"])
    return summary, rows


def quarantine(tmp_path: Path) -> list[dict]:
    folder = tmp_path / "out" / "quarantine"
    return [
        json.loads(line)
        for f in sorted(folder.glob("*.json*"))
        for line in f.read_text().splitlines()
    ]


def write_jsonl(path: Path, records, extra_lines: tuple[bytes, ...] = ()) -> Path:
    with path.open("wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in extra_lines:
            f.write(line + b"\n")
    return path


# --- formats ---------------------------------------------------------------------------------------


def _as_json(path, records):
    path.write_text(json.dumps(records))


def _as_jsonl(path, records):
    write_jsonl(path, records)


def _as_parquet(path, records):
    pd.DataFrame(records).to_parquet(path)


def _as_csv(path, records):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def _as_hf(path, records):
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))


def _as_hf_dict(path, records):
    import datasets

    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(records),
            "test": datasets.Dataset.from_list(records[:1]),
        }
    ).save_to_disk(str(path))


@pytest.mark.parametrize(
    ("suffix", "writer"),
    [
        (".json", _as_json),
        (".jsonl", _as_jsonl),
        (".parquet", _as_parquet),
        (".csv", _as_csv),
        ("", _as_hf),
        ("", _as_hf_dict),
    ],
    ids=["json", "jsonl", "parquet", "csv", "hf-dataset", "hf-datasetdict-train"],
)
def test_every_format_gives_the_same_canonical_rows(ray_cluster, tmp_path, suffix, writer):
    path = tmp_path / f"pool{suffix}"
    writer(path, ALPACA)
    summary, rows = run_ingest(tmp_path, [path])
    assert (summary.read, summary.kept, summary.quarantined) == (3, 3, 0)
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in ALPACA]
    assert [r["input"] for r in rows] == ["", "Good morning", ""]
    assert [r["output"] for r in rows] == [r["output"] for r in ALPACA]
    assert [r["id"] for r in rows] == [row_id(r["instruction"], r["input"]) for r in ALPACA]
    assert rows[1]["origin"].endswith(":2") and all(r["source"] == "seed" for r in rows)


def test_an_arrow_stream_batch_larger_than_a_block_is_read_whole_and_in_order(
    ray_cluster, tmp_path
):
    """A saved HF dataset of 10 rows is one record batch; read in blocks of 4 rows (as the pool's
    Python rows are made a block at a time), every row comes once, in order."""
    records = [
        {"instruction": f"Say the number {k}.", "input": "", "output": str(k)} for k in range(10)
    ]
    _as_hf(tmp_path / "pool", records)
    summary = ingest(PoolConfig(paths=[str(tmp_path / "pool")], decontaminate_against=[]),
                     str(tmp_path / "out"), block_rows=4)  # fmt: skip
    rows = sorted(read_pool(str(tmp_path / "out")).take_all(), key=lambda r: r["order"])
    assert (summary.read, summary.kept) == (10, 10)
    assert [r["output"] for r in rows] == [str(k) for k in range(10)]


def test_a_folder_of_mixed_files_is_read_in_name_order(ray_cluster, tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    _as_jsonl(folder / "b.jsonl", ALPACA[1:])
    _as_parquet(folder / "a.parquet", ALPACA[:1])
    (folder / "README.txt").write_text("not a pool file")
    summary, rows = run_ingest(tmp_path, [folder])
    assert summary.files == 2 and summary.kept == 3
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in ALPACA]


def test_bundled_alpaca_sample_ingests(ray_cluster, tmp_path):
    summary = ingest(PoolConfig(paths=["bundled:alpaca-5k"]), str(tmp_path / "out"))
    assert summary.read == 5000 and summary.reconciles
    assert summary.kept + summary.duplicates + summary.decontaminated == 5000


# --- schemas ----------------------------------------------------------------------------------------


def test_openai_messages_and_sharegpt_schemas(ray_cluster, tmp_path):
    records = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                      {"role": "assistant", "content": "Blue."}]},
        {"conversations": [{"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "Apple."}]},
        {"messages": [{"role": "user", "content": "No answer yet."}]},
    ]  # fmt: skip
    summary, rows = run_ingest(tmp_path, [write_jsonl(tmp_path / "chat.jsonl", records)])
    assert summary.kept == 3
    assert [(r["instruction"], r["output"]) for r in rows] == [
        ("Name a colour.", "Blue."), ("Name a fruit.", "Apple."), ("No answer yet.", None)
    ]  # fmt: skip


def test_explicit_column_mapping(ray_cluster, tmp_path):
    records = [
        {"prompt": "Sum 1 and 2.", "context": "", "response": "3"},
        {"prompt": "Spell cat.", "response": "c-a-t"},
    ]
    path = write_jsonl(tmp_path / "mapped.jsonl", records)
    columns = {"instruction": "prompt", "input": "context", "output": "response"}
    summary, rows = run_ingest(tmp_path, [path], schema="columns", columns=columns)
    assert summary.kept == 2
    assert [(r["instruction"], r["output"]) for r in rows] == [
        ("Sum 1 and 2.", "3"),
        ("Spell cat.", "c-a-t"),
    ]


# --- quarantine ------------------------------------------------------------------------------------


def test_every_bad_row_class_lands_in_quarantine_with_its_reason(ray_cluster, tmp_path):
    good = {"instruction": "A good row.", "input": "", "output": "ok"}
    records = [
        good,
        {"input": "no instruction"},                                   # 2 missing
        {"instruction": "   ", "output": "x"},                         # 3 empty
        {"instruction": ["a", "list"]},                                # 4 non-string
        {"instruction": "fine", "input": 7},                           # 5 non-string input
        {"instruction": "x" * 300},                                    # 6 over max_chars
        {"messages": [{"role": "assistant", "content": "no user"}]},   # 7 no user turn
        ["not", "an", "object"],                                       # 8 not an object
    ]  # fmt: skip
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        records,
        extra_lines=(
            b'{"instruction": "broken',
            b'{"instruction": "caf\xe9 latin-1 byte"}',
        ),  # 9, 10
    )
    summary, rows = run_ingest(tmp_path, [path], max_chars=200)
    assert summary.reconciles
    assert (summary.read, summary.kept, summary.quarantined) == (10, 1, 9)
    reasons = {q["origin"].rsplit(":", 1)[1]: q["reason"] for q in quarantine(tmp_path)}
    assert reasons == {
        "2": "missing field 'instruction'",
        "3": "field 'instruction' is empty",
        "4": "field 'instruction' is list, expected a string",
        "5": "field 'input' is int, expected a string",
        "6": "instruction + input is 300 characters, over pool.max_chars (200)",
        "7": "field 'messages' has no user turn",
        "8": "record is list, expected an object",
        "9": reasons["9"],
        "10": "field 'instruction' holds undecodable text (invalid UTF-8)",
    }
    assert reasons["9"].startswith("unparsable JSON line")
    assert all(q["origin"].startswith(str(path)) for q in quarantine(tmp_path))
    assert sum(summary.quarantine_reasons.values()) == 9


def test_csv_row_with_wrong_field_count_is_quarantined(ray_cluster, tmp_path):
    path = tmp_path / "pool.csv"
    path.write_text('instruction,input,output\n"Fine row",,ok\n"Too many",a,b,c\n')
    summary, rows = run_ingest(tmp_path, [path])
    assert (summary.kept, summary.quarantined) == (1, 1)
    assert quarantine(tmp_path)[0]["reason"] == "CSV row has 4 fields, the header has 3"


# --- pools as users have them ------------------------------------------------------------------------


def test_pools_with_real_world_quirks(ray_cluster, tmp_path):
    """Byte-order marks, gzip, a JSON array (streamed), a quoted field over two lines, missing
    values written as text, and files no reader takes: each read or reported, never dropped."""
    import gzip

    folder = tmp_path / "pool"
    folder.mkdir()
    bom = "\ufeff"
    (folder / "a.csv").write_text(
        bom + "instruction,input,output\n"
        '"A poem\nover two lines",,ok\n'  # record 1 spans two lines
        "NaN,,x\nNone,,x\nnull,,x\n"  # records 2-4: missing values written as text
        '"Too many",a,b,c\n'  # record 5
        "Keep me,,y\n",
        encoding="utf-8",
    )
    (folder / "b.json").write_text(bom + json.dumps(ALPACA[:2]), encoding="utf-8")
    with gzip.open(folder / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"instruction": "Zipped row.", "output": "z"}) + "\n")
    (folder / "notes.txt").write_text("not a pool file")
    (folder / "README").write_text("no extension")
    summary, rows = run_ingest(tmp_path, [folder])
    assert summary.reconciles and summary.read == 9
    assert sorted(r["instruction"] for r in rows) == sorted(
        [
            "A poem\nover two lines",
            "Keep me",
            "Zipped row.",
            ALPACA[0]["instruction"],
            ALPACA[1]["instruction"],
        ]
    )
    reasons = {q["origin"].rsplit(":", 1)[1]: q["reason"] for q in quarantine(tmp_path)}
    assert reasons == {
        "2": "field 'instruction' is 'NaN', a missing value written as text",
        "3": "field 'instruction' is 'None', a missing value written as text",
        "4": "field 'instruction' is 'null', a missing value written as text",
        "5": "CSV row has 4 fields, the header has 3",  # the record's number, not the line's
    }
    assert summary.skipped_files == [f"{folder}/README", f"{folder}/notes.txt"]
    assert "skipped 2 file(s) no reader takes" in summary.table()


def test_an_empty_or_truncated_parquet_file_is_one_line_naming_it(ray_cluster, tmp_path):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(IngestError, match=r"empty\.parquet: not a readable Parquet file") as info:
        run_ingest(tmp_path, [empty])
    assert "\n" not in str(info.value)
    good = tmp_path / "good.parquet"
    pd.DataFrame(ALPACA).to_parquet(good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(IngestError, match=r"cut\.parquet: not a readable Parquet file"):
        run_ingest(tmp_path, [cut])


def test_a_pool_empty_after_ingest_stops_the_run_in_one_line(ray_cluster, tmp_path):
    from tapir_ray.config import parse_config
    from tapir_ray.launch import RunError, run

    path = write_jsonl(
        tmp_path / "pool.jsonl", [{"instruction": "NaN"}, {"input": "no instruction"}]
    )
    cfg = parse_config({
        "run": {"dir": str(tmp_path / "run")},
        "pool": {"paths": [str(path)], "decontaminate_against": []},
        "oracle": {"teacher": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": None}},
    })  # fmt: skip
    with pytest.raises(RunError) as info:
        run(cfg, log=lambda line: None)
    message = str(info.value)
    assert (
        "\n" not in message and "pool is empty after ingest: 2 rows read = 2 quarantined" in message
    )


# --- ids, dedup, decontamination -------------------------------------------------------------------


def test_id_is_a_stable_hash_of_normalised_text():
    assert row_id("Say  hello.", "") == row_id("say hello.", "") == row_id("\tSAY hello. ", None)
    assert row_id("Say hello.", "in French") != row_id("Say hello.", "")
    assert normalize_text("Ｆｕｌｌ\u00a0width") == "full width"


def test_id_value_is_pinned():
    # A change to normalisation or hashing would silently re-key every run directory.
    import hashlib

    expected = hashlib.sha256(b"give three tips for staying healthy.\n\x00").hexdigest()[:24]
    assert row_id("Give three tips for staying healthy.") == expected


def test_exact_duplicates_keep_the_first(ray_cluster, tmp_path):
    first = tmp_path / "a.jsonl"
    second = tmp_path / "b.jsonl"
    write_jsonl(
        first,
        [
            {"instruction": "Repeat me.", "output": "first"},
            {"instruction": "Other.", "output": "o"},
        ],
    )
    write_jsonl(
        second,
        [
            {"instruction": "repeat   ME.", "output": "second"},
            {"instruction": "Repeat me.", "output": "third"},
        ],
    )
    summary, rows = run_ingest(tmp_path, [first, second])
    assert (summary.read, summary.kept, summary.duplicates) == (4, 2, 2)
    kept = {r["instruction"]: r for r in rows}
    assert kept["Repeat me."]["output"] == "first" and kept["Repeat me."]["origin"] == f"{first}:1"


def test_rows_matching_evaluation_prompts_are_removed(ray_cluster, tmp_path):
    mt_bench_turn = (
        "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
        "experiences and must-see attractions."
    )
    records = [
        {"instruction": mt_bench_turn.upper()},
        {"instruction": "Keep me."},
        {"instruction": "Solve it", "input": "x+1=2"},
    ]
    evals = write_jsonl(tmp_path / "evals.jsonl", [{"instruction": "Solve it", "input": "x+1=2"}])
    path = write_jsonl(tmp_path / "pool.jsonl", records)
    summary, rows = run_ingest(
        tmp_path, [path], decontaminate_against=["bundled:mt-bench", str(evals)]
    )
    assert (summary.kept, summary.decontaminated) == (1, 2) and summary.reconciles
    assert [r["instruction"] for r in rows] == ["Keep me."]


def test_a_rerun_into_the_same_folder_does_not_double_rows(ray_cluster, tmp_path):
    path = write_jsonl(tmp_path / "pool.jsonl", ALPACA)
    run_ingest(tmp_path, [path])
    summary, rows = run_ingest(tmp_path, [path])
    assert summary.kept == 3 and len(rows) == 3


# --- errors a user sees ------------------------------------------------------------------------------


def test_unknown_format_and_missing_file_are_one_line_errors(ray_cluster, tmp_path):
    odd = tmp_path / "pool.xml"
    odd.write_text("<rows/>")
    with pytest.raises(IngestError, match=r"pool\.xml: unknown format"):
        run_ingest(tmp_path, [odd])
    with pytest.raises(IngestError, match=r"missing\.jsonl: no such file or folder"):
        run_ingest(tmp_path, [tmp_path / "missing.jsonl"])
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a"},\n {"instruction": ')
    with pytest.raises(IngestError, match=r"broken\.json: invalid JSON after element 1"):
        run_ingest(tmp_path, [broken])


def test_cli_ingest_prints_reconciled_counts(ray_cluster, tmp_path):
    import ray

    path = write_jsonl(tmp_path / "pool.jsonl", [*ALPACA, ALPACA[0]], extra_lines=(b"{oops",))
    address = ray.get_runtime_context().gcs_address
    result = run_cli(
        "ingest", str(path), "--out", str(tmp_path / "cli-out"), env={"RAY_ADDRESS": address}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout
    assert "read                       5" in table and "kept                       3" in table
    assert "duplicates                 1" in table and "quarantined                1" in table
    assert "read = kept + duplicates + decontaminated + quarantined: yes" in table

    bad = run_cli(
        "ingest",
        str(tmp_path / "nope.parquet"),
        "--out",
        str(tmp_path / "x"),
        env={"RAY_ADDRESS": address},
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().splitlines()[-1]
        == f"tapir-ray: error: {tmp_path / 'nope.parquet'}: no such file or folder"
    )


# --- memory ----------------------------------------------------------------------------------------------


def test_streaming_ingest_keeps_driver_memory_bounded(ray_cluster, tmp_path):
    """A pool ~10× larger than the allowed driver growth ingests without the driver holding it,
    and without Ray's object store holding it either (the store's pages stay mapped in every
    worker that reads them, for the rest of the run)."""
    from benchmarks.ingest_throughput import PeakRSS, write_pool

    warm = tmp_path / "warm.jsonl"
    write_pool(warm, 500)
    ingest(PoolConfig(paths=[str(warm)], decontaminate_against=[]), str(tmp_path / "warm-out"))

    path = tmp_path / "big.jsonl"
    filler = "lorem ipsum dolor sit amet " * 40  # ~1 KB per row: 60K rows ≈ 70 MB of JSON
    with path.open("w") as f:
        for n in range(60_000):
            f.write(
                json.dumps({"instruction": f"Task {n}: {filler}", "input": "", "output": filler})
                + "\n"
            )
    size_mb = path.stat().st_size / 2**20
    with PeakRSS(interval=0.05, store_every=0.2) as rss:
        summary = ingest(
            PoolConfig(paths=[str(path)], decontaminate_against=[]), str(tmp_path / "big-out")
        )
    assert summary.kept == 60_000 and summary.reconciles
    assert size_mb > 60
    assert rss.growth_mb < size_mb / 4, (
        f"driver grew {rss.growth_mb:.0f} MB for a {size_mb:.0f} MB pool"
    )
    assert rss.store_peak_mb < 0.75 * size_mb, (
        f"the object store held {rss.store_peak_mb:.0f} MB for a {size_mb:.0f} MB pool"
    )


def test_dedup_across_hash_partitions_keeps_the_first(ray_cluster, tmp_path, monkeypatch):
    """Large pools count their ids with Ray Data's hash aggregate (only repeated ids leave the
    blocks); force it with a tiny partition size."""
    import tapir_ray.ingest.pipeline as pipeline

    monkeypatch.setattr(pipeline, "ROWS_PER_DEDUP_PARTITION", 3)
    records = [{"instruction": f"Task {n % 7}", "output": f"copy {n}"} for n in range(21)]
    summary, rows = run_ingest(tmp_path, [write_jsonl(tmp_path / "pool.jsonl", records)])
    assert (summary.read, summary.kept, summary.duplicates) == (21, 7, 14)
    assert sorted(r["output"] for r in rows) == sorted(f"copy {n}" for n in range(7))
