"""Shared fixtures: one local Ray cluster for the session, offline settings, a fresh asset cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# What a run's driver sets for itself and its cluster (runtime.ensure_ray), here for the tests'
# own processes too: two test workers share the machine's cores by design.
from tapir_ray.runtime import CPU_THREADS_ENV  # noqa: E402

for _k, _v in CPU_THREADS_ENV.items():
    os.environ.setdefault(_k, _v)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def asset_cache(tmp_path_factory) -> Path:
    """A cache directory fresh for this test run and shared by its pytest-xdist workers (each
    worker's temporary folder is one of the run's), so the real GGUF conversion and the tiny
    Llama are built once a run, under a file lock, by whichever worker asks first."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tapir-ray-cache"
    path.mkdir(exist_ok=True)
    os.environ["TAPIR_RAY_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster(asset_cache):
    """A real local Ray cluster (2 CPUs) shared by every test of the session (under `make test`,
    each of the two pytest-xdist workers has its own)."""
    import ray

    from tapir_ray.runtime import RAY_SYSTEM_CONFIG, configure_data, worker_env

    env = worker_env() | {"TAPIR_RAY_CACHE": str(asset_cache), "HF_HUB_OFFLINE": "1"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env}, _system_config=RAY_SYSTEM_CONFIG)  # fmt: skip
    configure_data()
    yield ray
    ray.shutdown()


CONVERT = "from tapir_ray.assets import resolve_model; print(resolve_model('bundled:smollm2-135m'))"
CONVERSION_STDERR: list[str] = []  # what the racing conversions printed (tests/test_assets.py)


@pytest.fixture(scope="session")
def smollm2(asset_cache) -> str:
    """Two processes race to convert the bundled GGUF into the same fresh cache; one converts."""
    env = {**os.environ, "TAPIR_RAY_CACHE": str(asset_cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    CONVERSION_STDERR.extend(o[1] for o in outs)
    folders = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(folders) == 1
    return folders.pop()


@pytest.fixture(scope="session")
def tiny_llama(smollm2, asset_cache) -> str:
    """A model folder: tapir_ray.assets.TINY_LLAMA with seeded random weights and the bundled
    model's tokenizer. Built once per session, next to the converted model."""
    from tapir_ray.assets import tiny_llama

    return tiny_llama(asset_cache / "tiny-llama")


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Runs `tapir-ray ARGS` as a user would, in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tapir_ray.cli", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO,
    )  # fmt: skip
