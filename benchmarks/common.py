"""What every benchmark reports alongside its figures: the command that made them and the device."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
from pathlib import Path


def command_line(script: str, args: argparse.Namespace) -> str:
    """The command that ran, as a shell would take it (lists as several values, quoted text)."""

    def value(v) -> str:
        return " ".join(map(value, v)) if isinstance(v, list | tuple) else shlex.quote(str(v))

    flags = " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {value(v)}")
        for k, v in vars(args).items()
        if k != "out" and v is not None and v is not False
    )
    return f"python benchmarks/{script} {flags}"


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def write_results(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def print_table(header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)))


def anonymous_bytes(pid: int) -> int | None:
    """A process's private memory: its anonymous pages (heap, stacks), without the pages of
    files and of shared memory it maps (Ray's object store among them), which RSS counts."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Anonymous:"))
    except (OSError, StopIteration, ValueError):
        return None


def _store_stat(pattern: str) -> float | None:
    import re

    from ray._private.internal_api import memory_summary

    found = re.search(pattern, memory_summary(stats_only=True))
    return float(found.group(1)) if found else None


def object_store_used_mb() -> float | None:
    """The cluster's object store in use now (MiB), from Ray's memory summary."""
    return _store_stat(r"Plasma memory usage (\d+) MiB")


def spilled_mb() -> float:
    """What the cluster's object store has spilled to disk so far (MiB), from Ray's memory summary."""
    return _store_stat(r"Spilled (\d+) MiB") or 0.0
