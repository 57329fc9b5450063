"""One driver per run: a lease file in the run directory names the driver that holds the run.

`<run>/lease.json` holds the driver's host, pid, a random token and a heartbeat that a thread
refreshes every few seconds. A second driver (`run --resume` while the first still runs, a retried
cluster job) finds a live lease and is refused in one line; a lease whose driver is gone (its pid
no longer exists on this host, or its heartbeat is older than `stale_s`) is taken over. Works on
any fsspec URL: writes are atomic (temp file + rename) and a writer reads its token back to settle
a race between two drivers starting at the same moment.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

from tapir_ray import storage
from tapir_ray.rundir import RunDir

HEARTBEAT_S = 5.0
STALE_S = 60.0


class LeaseHeld(RuntimeError):
    """Another live driver holds the run."""


def _alive(holder: dict[str, Any], stale_s: float) -> bool:
    if time.time() - float(holder.get("heartbeat", 0)) > stale_s:
        return False
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, KeyError):
            return True
    return True


class RunLease:
    def __init__(self, run_dir: str, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.path = RunDir(run_dir).lease
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        try:
            return storage.read_json(self.path)
        except (FileNotFoundError, ValueError):
            return None

    def _write(self) -> None:
        storage.write_json_atomic(self.path, {
            "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
            "started": self.started, "heartbeat": time.time(),
        })  # fmt: skip

    def acquire(self) -> RunLease:
        held = self.holder()
        if held is not None and held.get("token") != self.token and _alive(held, self.stale_s):
            raise LeaseHeld(_busy(self.path, held))
        self._write()
        time.sleep(0.2)  # a driver that wrote at the same moment: the last rename wins
        held = self.holder()
        if held is None or held.get("token") != self.token:
            raise LeaseHeld(_busy(self.path, held or {}))
        self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lease")
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            held = self.holder()
            if held is not None and held.get("token") != self.token:
                return  # taken over after this driver looked dead: never write over the new one
            self._write()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self.holder()
        if held is not None and held.get("token") == self.token:
            storage.remove(self.path)

    def __enter__(self) -> RunLease:
        return self if self._thread is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _busy(path: str, held: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
    return (
        f"{path.rsplit('/', 1)[0]}: the run is held by another driver (pid {held.get('pid')} on "
        f"{held.get('host')}, since {since}); wait for it to finish or stop it, then --resume"
    )
