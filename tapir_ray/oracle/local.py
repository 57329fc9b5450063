"""Starting and stopping `tapir-ray oracle serve` as a child process on 127.0.0.1.

Used by runs with `oracle.local: true` (the offline teacher and judge) and by tests. The server
writes its bound port to a ready file once it listens; `LocalOracle` waits for it and stops the
child (and only that child) on exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request


class LocalOracle:
    def __init__(self, *args: str, startup_timeout: float = 300.0, log_path: str | None = None):
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as r:
            return json.loads(r.read())

    def reset_stats(self) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/stats/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()

    def __enter__(self) -> LocalOracle:
        ready = os.path.join(tempfile.mkdtemp(prefix="tapir-oracle-"), "port")
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        cmd = [
            sys.executable,
            "-m",
            "tapir_ray.cli",
            "oracle",
            "serve",
            "--port",
            "0",
            "--ready-file",
            ready,
            "--parent-pid",
            str(os.getpid()),
            *self.args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the local oracle server exited with code {self.proc.returncode} (see {self.log_path or 'its output'})"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the local oracle server did not start within {self.startup_timeout:.0f} s"
                )
            time.sleep(0.1)
        with open(ready) as f:
            self.port = int(f.read())
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
