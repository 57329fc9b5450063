"""Training: one round's LoRA (or full) fine-tune on Ray Train with DeepSpeed ZeRO-2/3.

    rows (messages JSON, response) → TorchTrainer(train_loop_per_worker, ScalingConfig from
        `train:`) → workers stream their shard (ray.train.get_dataset_shard), tokenised as they go
        (Tokenize: tapir_ray.chat.sft_example, prompt masked) → checkpoints via ray.train.report
        → <out>/adapter/ (PEFT format) + sha256, <out>/metrics.json (per step)

A round killed mid-training resumes from its newest checkpoint when called again: Ray Train keeps
the run's checkpoint history under `<out>/checkpoints/fit`.
Public surface: `train_round()`, `TrainResult`, `export_model()`.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray

from tapir_ray import storage
from tapir_ray.assets import resolve_model
from tapir_ray.config import TrainConfig
from tapir_ray.student.adapter import adapter_sha256
from tapir_ray.train.tokenize import Tokenize

__all__ = ["Tokenize", "TrainResult", "export_model", "train_round"]


@dataclass
class TrainResult:
    adapter_dir: str
    adapter_sha256: str
    steps: int
    final_loss: float | None
    seconds: float
    metrics: list[dict[str, Any]]
    heldout: dict[str, Any] | None = None  # {nll, tokens, rows} when held-out rows were given
    heldout_before: dict[str, Any] | None = None  # the same, before the first step (heldout_before)


def scaling_config(train: TrainConfig):
    """Ray Train's workers from the config: num_workers × (cpus_per_worker, gpus_per_worker),
    on GPUs of `accelerator_type` when the cluster mixes kinds."""
    from ray.train import ScalingConfig

    resources = {
        "CPU": train.cpus_per_worker,
        **({"GPU": train.gpus_per_worker} if train.use_gpu else {}),
    }
    return ScalingConfig(
        num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources,
        accelerator_type=train.accelerator_type if train.use_gpu else None,
    )  # fmt: skip


def train_round(
    ds: ray.data.Dataset,
    train: TrainConfig,
    out_dir: str,
    *,
    model: str,
    init_adapter: str | None = None,
    model_config: dict[str, Any] | None = None,
    seed: int = 0,
    peak_flops_per_device: float | None = None,
    chat_template: str | None = None,
    heldout: list[dict[str, Any]] | None = None,
    heldout_before: bool = False,
) -> TrainResult:
    """Fine-tune on `ds` (messages JSON + response) and write `<out_dir>/adapter/`; prompts are
    rendered with `chat_template` (see tapir_ray.chat.load_tokenizer), as inference renders them.
    `heldout` rows (messages, response): the trained model's held-out NLL, computed in the fit;
    with `heldout_before`, also the starting model's (the base student's, for a fit without
    `init_adapter`), unless the fit resumes from a checkpoint."""
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from tapir_ray.train.loop import train_loop_per_worker

    started = time.perf_counter()
    out_dir = storage.absolute(out_dir)  # the workers write into it from their own directories
    model_path = resolve_model(model)
    # Read into the object store before the fit: while it runs the workers may hold every CPU (a
    # 2-CPU machine, or a GPU node whose CPUs go to workers), which would starve any read task and
    # hang the fit. Each worker tokenises its own shard as it iterates (loop.TokenizeCollate, in
    # Ray Data's prefetch threads), so no tokenising process starts and no pass over the data runs
    # before the fit. The rows are never collected on the driver.
    rows_in = ds.select_columns(["messages", "response"]).materialize()
    rows = rows_in.count()
    if rows == 0:
        raise ValueError("the training set is empty")
    world = train.num_workers
    micro_per_epoch = math.ceil((rows // world or 1) / train.micro_batch_size)
    total_steps = train.max_steps or max(
        1, math.floor(micro_per_epoch * train.epochs / train.grad_accum)
    )
    target = train.lora.target_modules
    cfg = {
        "model_path": model_path,
        "model_config": model_config,
        "init_adapter": init_adapter,
        "seed": seed,
        "full_finetune": train.full_finetune,
        "lora": {**train.lora.model_dump(), "target_modules": target},
        "deepspeed_stage": train.deepspeed_stage,
        "offload_optimizer": train.offload_optimizer,
        "precision": train.precision,
        "micro_batch_size": train.micro_batch_size,
        "grad_accum": train.grad_accum,
        "lr": train.learning_rate,
        "weight_decay": train.weight_decay,
        "warmup_ratio": train.warmup_ratio,
        "scheduler": train.scheduler,
        "total_steps": total_steps,
        "checkpoint_every_steps": train.checkpoint_every_steps,
        "gradient_checkpointing": False,
        "use_gpu": train.use_gpu,
        "max_length": train.max_length,
        "chat_template": chat_template,
        "adapter_dir": storage.join(out_dir, "adapter"),
        "metrics_path": storage.join(out_dir, "metrics.json"),
        "logger": train.logger,
        "tensorboard_dir": storage.absolute(storage.join(out_dir, "tensorboard")),
        "peak_flops_per_device": peak_flops_per_device,
        "heldout": heldout or [],
        "heldout_path": storage.join(out_dir, "heldout_nll.json"),
        "heldout_before_path": storage.join(out_dir, "heldout_nll_before.json")
        if heldout_before
        else None,
    }
    storage.remove(cfg["heldout_path"])  # a figure of an earlier fit of this round is not this one
    storage_path = storage.join(out_dir, "checkpoints")
    storage.makedirs(storage_path)
    # Ray Train's controller polls its workers every 2 s by default, so a finished fit is noticed
    # up to 2 s late (every round, every resume); half a second costs a few RPCs a second.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg,
        scaling_config=scaling_config(train),
        run_config=RunConfig(
            name="fit", storage_path=storage.absolute(storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": rows_in},
        # Resume: Ray Train restores a run from its own checkpoint history when a fit is started
        # again with the same name and storage path (a killed round picks up where it stopped).
    )  # fmt: skip
    # Ray Train makes its own SIGINT handler the process's for a fit (Ctrl-C aborts the fit) and
    # leaves it there: it holds the finished fit's controller actor, which it keeps alive, and a
    # later Ctrl-C (in the next round's scoring phase) only asks that idle controller to abort:
    # the run goes on, and the third Ctrl-C exits with status 0. The caller's handler comes back.
    caller_handler = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, caller_handler)
    metrics = storage.read_json(cfg["metrics_path"]) if storage.exists(cfg["metrics_path"]) else []
    nll = (
        storage.read_json(cfg["heldout_path"])
        if heldout and storage.exists(cfg["heldout_path"])
        else None
    )
    before = cfg["heldout_before_path"]
    nll_before = storage.read_json(before) if before and storage.exists(before) else None
    sha = adapter_sha256(cfg["adapter_dir"]) if not train.full_finetune else ""
    if sha:
        storage.write_text_atomic(storage.join(cfg["adapter_dir"], "SHA256"), sha + "\n")
    return TrainResult(
        adapter_dir=cfg["adapter_dir"],
        adapter_sha256=sha,
        steps=metrics[-1]["step"] if metrics else 0,
        final_loss=metrics[-1]["loss"] if metrics else None,
        seconds=time.perf_counter() - started,
        metrics=metrics,
        heldout=nll,
        heldout_before=nll_before,
    )


def export_model(adapter_dir: str, out: str, *, base_model: str, merge: bool) -> str:
    """Copy the adapter, or merge it into the base model and save a plain HF model folder."""
    import shutil

    if not merge:
        fs, src = storage.fs_and_path(adapter_dir)
        ofs, dst = storage.fs_and_path(out)
        ofs.makedirs(dst, exist_ok=True)
        for f in fs.ls(src, detail=False):
            name = f.rsplit("/", 1)[-1]
            with fs.open(f, "rb") as i, ofs.open(f"{dst}/{name}", "wb") as o:
                shutil.copyfileobj(i, o)
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(base_model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out
