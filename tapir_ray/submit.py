"""`tapir-ray submit`: run a config on a Ray cluster as a Ray job, through the Ray Jobs SDK.

The job runs `tapir-ray run` on the cluster's head node with a runtime_env that carries the
resolved config (and, with `code="local"`, this package's source). Secrets never travel with the
job: the config names API keys by environment variable, the cluster provides the values (from a
Kubernetes Secret, or the head node's environment), and `build_job` refuses a job description
that contains the value of any secret-looking variable of the submitting environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from tapir_ray.config import Config, looks_secret, parse_config

JOB_CONFIG = "tapir-ray-job.yaml"
PACKAGE_DIR = Path(__file__).resolve().parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.IGNORECASE)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


class SubmitError(Exception):
    """A problem with the submission, said in one line."""


@dataclass
class JobSpec:
    """What `submit_job` receives; kept as data so it can be checked before anything is sent."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str
    staging_dir: str
    secrets_by_name: list[str] = field(default_factory=list)

    def as_text(self) -> str:
        return json.dumps(
            {
                "entrypoint": self.entrypoint,
                "runtime_env": self.runtime_env,
                "metadata": self.metadata,
            },
            sort_keys=True,
        )


def dashboard_address(address: str | None) -> str:
    """The Jobs API address: the flag, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS if it is http(s)."""
    address = (
        address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    )
    if not address:
        raise SubmitError(
            "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard) or set RAY_API_SERVER_ADDRESS"
        )
    if not re.match(r"^https?://", address):
        raise SubmitError(
            f"--address {address!r}: expected the dashboard's http(s) URL, e.g. http://HEAD:8265"
        )
    return address.rstrip("/")


def is_local(address: str) -> bool:
    return (urlparse(address).hostname or "") in LOCAL_HOSTS


def _cluster_path(value: str, what: str, local: bool) -> str:
    """A path as the job will see it: URLs and absolute paths as they are; relative paths are
    resolved here for a cluster on this machine and refused for a remote one (the job's working
    folder is a temporary copy that Ray deletes)."""
    if "://" in value or value.startswith("bundled:") or os.path.isabs(value):
        return value
    if local:
        return os.path.abspath(value)
    raise SubmitError(
        f"{what} {value!r} is relative; a job on a remote cluster runs in a temporary folder, so give a path on shared storage (absolute, or s3://…)"
    )


def secret_values(env: dict[str, str] | None = None) -> dict[str, str]:
    """Values of the submitting environment's secret-looking variables (names with KEY, TOKEN, …)."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 8}


def _secret_names(cfg: Config) -> list[str]:
    endpoints = [cfg.oracle.teacher] + ([cfg.oracle.judge] if cfg.oracle.judge else [])
    return sorted({e.api_key_env for e in endpoints if e.api_key_env})


def build_job(
    cfg: Config,
    *,
    address: str,
    config_name: str = "config.yaml",
    run_dir: str | None = None,
    code: str = "installed",
    pip: list[str] | None = None,
    resume: bool | str = False,
    until: str | None = None,
    submission_id: str | None = None,
    env: dict[str, str] | None = None,
) -> JobSpec:
    """The job for a config: a staging folder with the resolved config, the entrypoint, the
    runtime_env and searchable metadata. Raises SubmitError when anything would leak a secret."""
    local = is_local(address)
    raw = yaml.safe_load(cfg.to_yaml())
    raw["run"]["dir"] = _cluster_path(run_dir or cfg.run.dir, "run.dir", local)
    raw["pool"]["paths"] = [_cluster_path(p, "pool path", local) for p in cfg.pool.paths]
    resolved = parse_config(raw, source=config_name)
    staging = tempfile.mkdtemp(prefix="tapir-ray-job-")
    Path(staging, JOB_CONFIG).write_text(resolved.to_yaml(), encoding="utf-8")

    runtime_env: dict[str, Any] = {"working_dir": staging}
    if code == "local":
        # The package's source travels with the job; its dependencies come from the cluster's
        # image (cluster/docker/Dockerfile) or from `pip`.
        runtime_env["py_modules"] = [str(PACKAGE_DIR)]
        runtime_env["excludes"] = ["__pycache__", "*.pyc"]
    elif code != "installed":
        raise SubmitError(f"--code {code!r}: expected installed or local")
    if pip:
        runtime_env["pip"] = list(pip)
    flags = " --auto-resume" if resume == "auto" else " --resume" if resume else ""
    if until:
        if not re.fullmatch(r"[A-Za-z0-9_/-]+", until):
            raise SubmitError(f"--until {until!r}: a stage name is letters, digits, - _ and /")
        flags += f" --until {until}"
    entrypoint = f"python -m tapir_ray.cli run {JOB_CONFIG}{flags}"
    name = resolved.run.name or Path(resolved.run.dir).name or "run"
    sid = (
        submission_id
        or f"tapir-ray-{re.sub(r'[^A-Za-z0-9_-]', '-', name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    names = _secret_names(resolved)
    metadata = {
        "tapir_ray.config": config_name,
        "tapir_ray.run_dir": resolved.run.dir,
        "tapir_ray.algorithm": resolved.curriculum.algorithm,
        "tapir_ray.secrets_by_name": ",".join(names),
    }
    spec = JobSpec(entrypoint, runtime_env, metadata, sid, staging, names)
    text = spec.as_text() + Path(staging, JOB_CONFIG).read_text(encoding="utf-8")
    for name_, value in secret_values(env).items():
        if value in text:
            raise SubmitError(f"the job would carry the value of ${name_}; refusing to submit it")
    if looks_secret(text):
        raise SubmitError("the job description contains a key-shaped value; refusing to submit it")
    return spec


# --- talking to the cluster ---------------------------------------------------------------------


def _enable_token_auth_from_env() -> None:
    """Ray's SDK sends the cluster token only when RAY_AUTH_MODE=token; a user who exported the
    token (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) clearly wants it sent."""
    if "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    ):
        os.environ["RAY_AUTH_MODE"] = "token"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else text


def client(address: str):
    _enable_token_auth_from_env()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # the SDK raises ConnectionError, RuntimeError or ValueError
        raise SubmitError(
            f"cannot reach the Ray Jobs API at {address}: {_first_line(exc)}"
        ) from None


def _call(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        message = _first_line(exc)
        if "401" in message or "Authentication required" in message:
            message += " (the cluster uses token authentication: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
        raise SubmitError(f"{what}: {message}") from None


AGENT_WAIT_S = 60.0
# What a head that has just started answers while its job agent or its dashboard is not up yet.
NOT_READY = ("No available agent", "Connection aborted", "RemoteDisconnected", "Connection refused")


def _until_agent(send, **kwargs):
    """`send(**kwargs)`, asked again while a head that has just started is not ready, for up to a
    minute: its job agent is not up ("No available agent to submit job, please try again
    later"), or its dashboard drops the connection. A dropped request may have submitted the job:
    asked again, "already exists" for our own submission id means it did."""
    import time

    deadline = time.monotonic() + AGENT_WAIT_S
    dropped = False
    while True:
        try:
            return send(**kwargs)
        except Exception as exc:
            text, sid = str(exc), kwargs.get("submission_id")
            if dropped and sid and f"submission_id {sid} already exists" in text:
                return sid
            if not any(s in text for s in NOT_READY) or time.monotonic() > deadline:
                raise
            dropped = dropped or "No available agent" not in text
            time.sleep(2)


def submit(spec: JobSpec, address: str) -> str:
    c = client(address)
    return _call(
        "submitting the job",
        _until_agent,
        c.submit_job,
        entrypoint=spec.entrypoint,
        runtime_env=spec.runtime_env,
        metadata=spec.metadata,
        submission_id=spec.submission_id,
    )


def status(address: str, job_id: str) -> dict[str, Any]:
    info = _call(f"job {job_id}", client(address).get_job_info, job_id)
    return {
        "job_id": job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "metadata": dict(info.metadata or {}),
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def stop(address: str, job_id: str) -> bool:
    return bool(_call(f"stopping job {job_id}", client(address).stop_job, job_id))


def follow(address: str, job_id: str, out=None) -> str:
    """Prints the job's logs as they come and returns its final status."""
    out = out or sys.stdout
    c = client(address)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the log stream closed early; the status below still tells
        out.write(f"(log stream ended: {_first_line(exc)})\n")
    while True:
        state = status(address, job_id)["status"]
        if state in TERMINAL:
            return state
        time.sleep(1.0)


def format_status(info: dict[str, Any]) -> str:
    def when(ms):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"

    meta = info["metadata"]
    lines = [
        f"job        {info['job_id']}",
        f"status     {info['status']}" + (f"  ({info['message']})" if info["message"] else ""),
        f"started    {when(info['start_time'])}",
        f"ended      {when(info['end_time'])}",
        f"run dir    {meta.get('tapir_ray.run_dir', '-')}",
        f"config     {meta.get('tapir_ray.config', '-')}",
    ]
    return "\n".join(lines)
