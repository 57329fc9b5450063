"""Starting and stopping a local OpenAI-compatible oracle as a child process on 127.0.0.1.

Used by runs with `oracle.local: true` (the offline teacher and judge) and by tests.
- `LocalOracle`: `tapir-ray oracle serve` (the transformers or scripted backend). The server
  writes its bound port to a ready file once it listens; `LocalOracle` waits for it.
- `VLLMOracle`: vLLM's own OpenAI-compatible server (`vllm.entrypoints.openai.api_server`), which
  continues a prefilled assistant turn (`continue_final_message`) and returns top log-probabilities,
  as the judge needs. Ready once `/health` answers.
Both stop their child (and only it) on exit, and the child goes when the process that started it
dies (a killed driver leaves no server behind).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable

# Runs `argv` in place of a Python that first asks Linux to send it SIGTERM when its parent dies
# (PR_SET_PDEATHSIG survives exec). Done in the child rather than as Popen's preexec_fn, which is
# unsafe in a process with threads (a Ray driver has many).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\n"
    "except OSError:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('the process that started this server is gone')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class LocalOracle:
    def __init__(self, *args: str, startup_timeout: float = 300.0, log_path: str | None = None,
                 nice: int = 0):  # fmt: skip
        self.args = list(args)
        self.nice = nice  # the server's CPU priority (`nice -n`)
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
        from tapir_ray.runtime import cpu_threads_env

        env = {**os.environ, **cpu_threads_env()}  # an hf backend computes on every core
        if self.nice > 0:
            cmd = ["nice", "-n", str(self.nice), *cmd]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        self._wait_until(lambda: os.path.exists(ready), "the local oracle server", 0.1)
        with open(ready) as f:
            self.port = int(f.read())
        return self

    def wait_ready(self) -> None:
        """Ready once `__enter__` returns (VLLMOracle can also start without waiting)."""

    def _wait_until(self, ready: Callable[[], bool], what: str, poll_s: float) -> None:
        """Until `ready()`: one line naming the log if the child exits or outlasts the timeout."""
        deadline = time.monotonic() + self.startup_timeout
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{what} exited with code {self.proc.returncode} (see {self.log_path or 'its output'})"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{what} did not start within {self.startup_timeout:.0f} s")
            time.sleep(poll_s)

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


class VLLMOracle(LocalOracle):
    """vLLM's OpenAI-compatible server for one local model, served as `local`."""

    def __init__(self, model_path: str, *, max_num_seqs: int = 16, max_model_len: int = 4096,
                 port: int = 0, startup_timeout: float = 600.0, log_path: str | None = None):  # fmt: skip
        super().__init__(startup_timeout=startup_timeout, log_path=log_path)
        self.model_path = model_path
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.want_port = port

    @staticmethod
    def on_cpu() -> bool:
        """vLLM's CPU build serves here (no CUDA device)."""
        import torch

        return not torch.cuda.is_available()

    def command(self) -> list[str]:
        from tapir_ray.chat import DEFAULT_TEMPLATE, template_text
        from tapir_ray.runtime import vllm_cpu_dtype as cpu_dtype

        cpu = self.on_cpu()
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_path, "--served-model-name", "local",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
            "--max-logprobs", "20", "--disable-uvicorn-access-log",
            # On CPU: eager (CUDA graphs and torch.compile cost a minute or more of start-up), and
            # the engine core and its worker in one process (runtime.VLLM_CPU_ONE_PROCESS, set in
            # `start`'s environment): measured 38 → 30 s start-up and +10 % tokens/s on 2 cores.
            *(["--dtype", cpu_dtype(), "--enforce-eager", "--distributed-executor-backend", "uni"] if cpu else []),
        ]  # fmt: skip
        if not _has_chat_template(self.model_path):  # a base model: the same fallback as training
            path = os.path.join(tempfile.mkdtemp(prefix="tapir-oracle-"), "chat_template.jinja")
            with open(path, "w") as f:
                f.write(template_text(DEFAULT_TEMPLATE))
            cmd += ["--chat-template", path]
        return cmd

    def __enter__(self) -> VLLMOracle:
        self.start()
        self.wait_ready()
        return self

    def start(self) -> VLLMOracle:
        """Starts the server and returns at once (`wait_ready` waits for it): a run ingests its pool
        while vLLM loads."""
        self.port = self.want_port or _free_port()
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ)
        env["VLLM_LOGGING_LEVEL"] = "INFO"  # its own log file: throughput lines included
        # Every CPU this process may use: vLLM's automatic binding keeps one core for its HTTP
        # front, which on 2 cores halves generation (measured 119 → 187 tokens/s, 64 sequences).
        env.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0))))
        )
        cmd = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *self.command()]
        if self.on_cpu():  # `command` asked for the in-process executor (`uni`)
            from tapir_ray.runtime import vllm_cpu_env

            env.update(vllm_cpu_env())
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        self.ready = False
        return self

    def wait_ready(self) -> None:
        if not self.ready:
            self._wait_until(self._healthy, "the local vLLM oracle server", 0.5)
            self.ready = True

    def _healthy(self) -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).close()
            return True
        except OSError:
            return False

    def stats(self) -> dict:
        raise NotImplementedError("vLLM's server keeps no request statistics of ours")

    reset_stats = stats


def _has_chat_template(model_path: str) -> bool:
    from transformers import AutoTokenizer

    return bool(AutoTokenizer.from_pretrained(model_path).chat_template)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
