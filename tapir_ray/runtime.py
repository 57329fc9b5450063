"""Connecting to Ray: the cluster named by the config or RAY_ADDRESS, else a local one."""

from __future__ import annotations

import logging
import os

import ray

from tapir_ray.config import ResourcesConfig

log = logging.getLogger(__name__)

# Offline by default: nothing in tapir-ray downloads weights at run time unless asked to.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def ensure_ray(resources: ResourcesConfig | None = None) -> None:
    """Initialise Ray once per process; a no-op when it already is (tests, Ray Jobs)."""
    if ray.is_initialized():
        return
    resources = resources or ResourcesConfig()
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    env_vars = {k: os.environ[k] for k in (*OFFLINE_ENV, "TAPIR_RAY_CACHE") if k in os.environ}
    address = resources.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": True}
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
        return
    if resources.num_cpus:
        kwargs["num_cpus"] = resources.num_cpus
    if resources.object_store_gb:
        kwargs["object_store_memory"] = int(resources.object_store_gb * 2**30)
    ray.init(include_dashboard=False, **kwargs)
