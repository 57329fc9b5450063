"""`tapir-ray submit`: the job description never carries a secret, and a real Ray head on
127.0.0.1 with token authentication runs the (shrunk) demo config to success through the Ray Jobs
API, with the API key provided by the cluster's environment."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml

from tapir_ray.config import load_config, parse_config
from tapir_ray.oracle.local import LocalOracle
from tapir_ray.submit import JOB_CONFIG, SubmitError, build_job
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.timeout(1200)
KEY_ENV = "TAPIR_SUBMIT_TEST_KEY"


def small_demo(base_url: str | None = None) -> dict:
    """jobs/demo_cpu.yaml, shrunk to one small round against an external teacher that needs a key."""
    raw = yaml.safe_load((REPO / "jobs/demo_cpu.yaml").read_text())
    raw["pool"]["limit"] = 24
    raw["student"].update(
        engine="transformers", batch_size=16, cpus_per_replica=0.5, sampling={"max_tokens": 12}
    )
    raw["oracle"] = {
        "local": False,
        "teacher": {"base_url": base_url or "https://10.0.0.1:8000/v1", "model": "local",
                    "api_key_env": KEY_ENV, "continue_final_message": True, "max_concurrency": 4,
                    "rpm": 100_000, "tpm": 10**8},
        "actors": 1, "teacher_max_tokens": 48,
    }  # fmt: skip
    raw["curriculum"]["tapir"].update(
        rounds=1, alpha=[0.5], round_sizes=[8], warmup=False, heldout_fraction=0.1, nll_max_rows=4
    )
    raw["train"].update(
        num_workers=1, micro_batch_size=2, global_batch_size=4, max_length=128, lora={"r": 8},
        max_steps=2, checkpoint_every_steps=2,
    )  # fmt: skip
    return raw


def test_the_job_description_names_keys_and_never_carries_them(tmp_path, monkeypatch):
    key = "sk-" + secrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, key)
    cfg = parse_config(small_demo())
    spec = build_job(cfg, address="http://127.0.0.1:8265", config_name="demo_cpu.yaml")
    assert spec.secrets_by_name == [KEY_ENV]
    assert spec.metadata["tapir_ray.secrets_by_name"] == KEY_ENV
    assert key not in spec.as_text()
    shipped = load_config(Path(spec.staging_dir) / JOB_CONFIG)
    assert shipped.oracle.teacher.api_key_env == KEY_ENV
    # A cluster on this machine shares its disk: relative paths are resolved for it ...
    assert shipped.run.dir == os.path.abspath("runs/demo") == spec.metadata["tapir_ray.run_dir"]
    assert spec.entrypoint == f"python -m tapir_ray.cli run {JOB_CONFIG}"
    assert "py_modules" not in spec.runtime_env
    local = build_job(cfg, address="http://127.0.0.1:8265", code="local", resume=True)
    assert local.runtime_env["py_modules"][0].endswith("tapir_ray")
    assert local.entrypoint.endswith("--resume")
    until = build_job(cfg, address="http://127.0.0.1:8265", resume=True, until="round-1/student")
    assert until.entrypoint.endswith("--resume --until round-1/student")
    with pytest.raises(SubmitError, match="a stage name is"):
        build_job(cfg, address="http://127.0.0.1:8265", until="teacher; rm -rf /")
    # ... a remote one's job runs in a temporary folder, so a relative run dir is refused.
    with pytest.raises(SubmitError, match="run.dir 'runs/demo' is relative"):
        build_job(cfg, address="http://head.example:8265")
    remote = build_job(cfg, address="http://head.example:8265", run_dir="s3://bucket/runs/demo")
    assert remote.metadata["tapir_ray.run_dir"] == "s3://bucket/runs/demo"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    nowhere = subprocess.run([sys.executable, "-m", "tapir_ray.cli", "submit", "jobs/demo_cpu.yaml"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=120)  # fmt: skip
    assert nowhere.returncode == 2 and "no cluster address" in nowhere.stderr
    # Defence in depth: a secret's value anywhere in the job (here in a pip requirement's URL)
    # stops the submission.
    with pytest.raises(SubmitError, match=f"value of \\${KEY_ENV}"):
        build_job(cfg, address="http://127.0.0.1:8265", pip=[f"https://x:{key}@pypi.example/p"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(ray_cluster, asset_cache, tmp_path):
    """A second Ray cluster: a head on 127.0.0.1 with token authentication and the API key in its
    environment, as a Kubernetes Secret would put it there. Stopped by killing only its own
    process group, so the test session's cluster lives on."""
    token = secrets.token_hex(16)
    key = "sk-" + secrets.token_hex(16)
    dashboard = _free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, KEY_ENV: key,
           "TAPIR_RAY_CACHE": str(asset_cache), "PATH": f"{venv_bin}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    temp_dir = tempfile.mkdtemp(prefix="trh-", dir="/tmp")  # Unix socket paths stay short
    log = open(tmp_path / "head.log", "wb")  # noqa: SIM115
    cmd = [
        f"{venv_bin}/ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(_free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
        "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port()),
        "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 300  # a loaded 2-core machine can take minutes
    try:  # the head is stopped below even when it never came up
        while True:
            try:
                req = urllib.request.Request(
                    f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}
                )
                urllib.request.urlopen(req, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "head.log").read_text()[-3000:]) from None
                time.sleep(1)
        yield {"address": address, "token": token, "key": key}
    finally:
        # Only this cluster's processes: `ray stop` would stop every Ray cluster on the machine.
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=3)  # a test cluster: its state is thrown away, no need to drain
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of that cluster is still in the group
        proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert ray.get(ray.put("still here")) == "still here"  # the session's cluster lives on


def test_a_head_that_is_not_ready_is_asked_again_and_a_dropped_submission_is_not_doubled(
    monkeypatch,
):
    from tapir_ray import submit as S

    monkeypatch.setattr(time, "sleep", lambda s: None)
    replies = [
        RuntimeError("No available agent to submit job, please try again later."),
        ConnectionError(
            "('Connection aborted.', RemoteDisconnected('Remote end closed connection'))"
        ),
        ValueError("Job with submission_id tapir-1 already exists. Please use a different one."),
    ]
    sent = []

    def send(**kwargs):
        sent.append(kwargs)
        raise replies.pop(0)

    # The dropped request had submitted it: the job is ours, not submitted a second time.
    assert S._until_agent(send, submission_id="tapir-1") == "tapir-1" and len(sent) == 3
    # An id already taken before anything was dropped is the user's error, said as it is.
    replies[:] = [ValueError("Job with submission_id tapir-1 already exists.")]
    with pytest.raises(ValueError, match="already exists"):
        S._until_agent(send, submission_id="tapir-1")
    replies[:] = [PermissionError("401 Authentication required")]
    with pytest.raises(PermissionError):  # not a head starting up: not asked again
        S._until_agent(send, submission_id="tapir-2")


def test_submit_runs_the_demo_config_on_a_ray_head_with_token_auth(ray_head, smollm2, tmp_path):
    key, token, address = ray_head["key"], ray_head["token"], ray_head["address"]
    os.environ[KEY_ENV] = key  # the submitting shell has the key too; it must stay here
    try:
        with LocalOracle("--backend", "scripted", "--api-key-env", KEY_ENV) as teacher:
            config = tmp_path / "demo_cpu.yaml"
            config.write_text(yaml.safe_dump(small_demo(teacher.base_url)))
            run_dir = tmp_path / "run"
            auth = {"RAY_AUTH_TOKEN": token, KEY_ENV: key}
            t0 = time.perf_counter()
            done = run_cli(
                "submit", str(config), "--address", address, "--run-dir", str(run_dir),
                "--job-id", "tapir-ray-submit-test", "--until", "labels", "--follow", env=auth,
                timeout=900,
            )  # fmt: skip
            took = time.perf_counter() - t0
            assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
            assert "submitted job tapir-ray-submit-test" in done.stdout
            assert "job tapir-ray-submit-test: SUCCEEDED" in done.stdout
            assert "run stopped after stage labels" in done.stdout  # the job's own log, followed
            print(f"submit --follow took {took:.0f} s")
            stats = teacher.stats()
            # Every oracle request of the job carried the key the cluster's environment provides.
            assert stats["ok"] > 0 and stats["by_status"].get("401", 0) == 0
        # The oracle stages ran on the cluster's actors, with the key; --until stopped the run.
        state = json.loads((run_dir / "state.json").read_text())
        assert state["status"] == "stopped" and list(state["stages"]) == [
            "ingest",
            "teacher",
            "labels",
        ]
        assert (
            state["stages"]["labels"]["rows_out"] > 0
        )  # the demo's teacher reuses Alpaca's answers

        # Nothing the cluster stores about the job holds the key or the cluster token.
        req = urllib.request.Request(f"{address}/api/jobs/tapir-ray-submit-test",
                                     headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            stored = r.read().decode()
        info = json.loads(stored)
        assert info["metadata"]["tapir_ray.secrets_by_name"] == KEY_ENV
        assert key not in stored and token not in stored
        assert key not in (run_dir / "config.yaml").read_text()

        status = run_cli(
            "submit", "--status", "tapir-ray-submit-test", "--address", address, env=auth
        )
        assert status.returncode == 0 and "SUCCEEDED" in status.stdout
        assert str(run_dir) in status.stdout
        # A wrong token is refused with one line, not a traceback.
        wrong = run_cli("submit", "--status", "tapir-ray-submit-test", "--address", address,
                        env={"RAY_AUTH_TOKEN": "not-the-token"})  # fmt: skip
        assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
        assert "tapir-ray: error:" in wrong.stderr

        # --stop: a second job is stopped and says so.
        second = run_cli(
            "submit", str(config), "--address", address, "--run-dir", str(tmp_path / "run2"),
            "--job-id", "tapir-ray-stop-test", env=auth,
        )  # fmt: skip
        assert second.returncode == 0, second.stderr
        stopped = run_cli("submit", "--stop", "tapir-ray-stop-test", "--address", address, env=auth)
        assert stopped.returncode == 0, stopped.stderr
        deadline = time.monotonic() + 120
        while True:
            st = run_cli(
                "submit", "--status", "tapir-ray-stop-test", "--address", address, env=auth
            )
            if "STOPPED" in st.stdout or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert "STOPPED" in st.stdout, st.stdout
    finally:
        os.environ.pop(KEY_ENV, None)
