"""One progress line per stage while it runs: rows done / total, rate and ETA, every few seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """`with Progress("round 1 · judge", total, done_fn): ...` prints while the block runs."""

    def __init__(
        self,
        label: str,
        total: int | None,
        done: Callable[[], int],
        *,
        every_s: float = 15.0,
        log: Callable[[str], None] = print,
        detail: Callable[[], str] | None = None,
    ):
        """`detail`: more of the stage's state for the end of the line (a streaming phase's
        earlier steps, say), read as often as the count."""
        self.label, self.total, self.done, self.every_s, self.log = label, total, done, every_s, log
        self.detail = detail
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def line(self) -> str:
        try:
            n = self.done()
            more = f" · {self.detail()}" if self.detail is not None else ""
        except Exception:  # progress must never break a stage
            return f"{self.label}: running for {_clock(time.monotonic() - self.started)}"
        elapsed = max(1e-9, time.monotonic() - self.started)
        rate = n / elapsed
        if self.total:
            eta = f", ETA {_clock((self.total - n) / rate)}" if rate > 0 and n < self.total else ""
            return f"{self.label}: {n}/{self.total} rows ({rate:.1f}/s{eta}){more}"
        return f"{self.label}: {n} rows ({rate:.1f}/s){more}"

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.log(self.line())

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
