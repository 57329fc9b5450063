"""The progress line a stage prints while it runs."""

from __future__ import annotations

import re
import time

from tapir_ray.progress import Progress


def test_the_line_counts_rows_with_rate_eta_and_the_pipelines_earlier_steps():
    counts = iter([0, 30] + [100] * 1000)
    answered = iter(["0/50 answered", "20/50 answered", "50/50 answered"])
    lines: list[str] = []
    with Progress("round-1 · judge", 100, lambda: next(counts), every_s=0.05, log=lines.append,
                  detail=lambda: next(answered, "50/50 answered")) as progress:  # fmt: skip
        time.sleep(0.3)
    assert lines, "nothing was printed while the stage ran"
    assert lines[0] == "round-1 · judge: 0/100 rows (0.0/s) · 0/50 answered"
    assert re.fullmatch(
        r"round-1 · judge: 30/100 rows \([\d.]+/s, ETA \d+s\) · 20/50 answered", lines[1]
    )
    # Done: no ETA; the count never goes back.
    assert re.fullmatch(r"round-1 · judge: 100/100 rows \([\d.]+/s\) · 50/50 answered", lines[2])
    assert all(line.startswith("round-1 · judge: 100/100 rows") for line in lines[2:])
    assert progress.line().startswith("round-1 · judge: 100/100 rows")


def test_a_failing_count_or_detail_never_breaks_the_stage():
    def broken() -> str:
        raise FileNotFoundError("the folder is not there yet")

    line = Progress("teacher", 10, lambda: 3, detail=broken).line()
    assert line.startswith("teacher: running for ")
