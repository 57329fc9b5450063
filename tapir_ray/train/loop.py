"""The training loop each Ray Train worker runs: DeepSpeed ZeRO-2/3 + PEFT LoRA, response-only loss.

Reads top to bottom like the algorithm: build the model (ZeRO-3: under HfDeepSpeedConfig so the
weights are partitioned as they load), wrap it in LoRA, hand it to `deepspeed.initialize` with a
client AdamW (no JIT-built fused optimizer) and a cosine schedule with warm-up, stream the
worker's shard of the tokenised dataset, step, report, checkpoint, and finally gather and save
the adapter. Nothing here parses sys.argv: Ray imports this module on every worker.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
from typing import Any

import ray.train
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from tapir_ray import storage
from tapir_ray.chat import IGNORE_INDEX

STATE_FILE = "tapir_train_state.json"
CHECKPOINT_TAG = "engine"  # DeepSpeed also writes a file named "latest" beside the tag folder


def deepspeed_config(cfg: dict[str, Any], bf16: bool, fp16: bool = False) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg["deepspeed_stage"]}
    if cfg["deepspeed_stage"] == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    if cfg["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg["micro_batch_size"],
        "gradient_accumulation_steps": cfg["grad_accum"],
        "train_batch_size": cfg["micro_batch_size"] * cfg["grad_accum"] * cfg["world_size"],
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": fp16},
        "zero_allow_untested_optimizer": True,
        # A client optimizer with CPU offload: DeepSpeed would otherwise insist on its JIT-built CPUAdam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(total_steps: int, warmup_ratio: float, kind: str):
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def schedule(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return (
            max(0.0, 1.0 - progress)
            if kind == "linear"
            else 0.5 * (1.0 + math.cos(math.pi * progress))
        )

    return schedule


def collate(rows: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    ids = [list(x) for x in rows["input_ids"]]
    labels = [list(x) for x in rows["labels"]]
    width = max(len(x) for x in ids)
    return {
        "input_ids": torch.tensor([x + [pad_id] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for y in labels]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
    }


class TokenizeCollate(NumpyBatchCollateFn):
    """Ray Data collate function of a worker's micro-batches: (messages, response) rows are
    tokenised (prompt masked, tapir_ray.chat.sft_example) and padded in Ray Data's prefetch threads,
    so tokenisation overlaps the previous step and needs no process or pass of its own."""

    def __init__(self, model_path: str, max_length: int, chat_template: str | None):
        from tapir_ray.train.tokenize import Tokenize

        self.tokenize = Tokenize(model_path, max_length, chat_template)
        tok = self.tokenize.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.lock = threading.Lock()  # a fast tokenizer is not safe to share between threads

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with self.lock:
            tokens = self.tokenize(batch)
        return collate(tokens, self.pad_id)


def build_model(cfg: dict[str, Any], ds_config: dict[str, Any], dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    keep_alive = None
    if cfg["deepspeed_stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(
            ds_config
        )  # must live while the model is built: partitions on load
    if cfg.get("model_config"):  # a model built from a config (tests, benchmarks): random weights
        config = AutoConfig.for_model(**cfg["model_config"])
        torch.manual_seed(cfg.get("seed", 0))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=dtype)
    if cfg["full_finetune"]:
        return model, keep_alive
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.get("init_adapter"):
        return PeftModel.from_pretrained(model, cfg["init_adapter"], is_trainable=True), keep_alive
    lora = cfg["lora"]
    peft_config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, peft_config), keep_alive


def flops_per_token(model) -> float:
    """6 × parameters: forward and backward of a dense decoder (attention's extra FLOPs ignored)."""
    return 6.0 * sum(
        p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()
    )


def experiment_logger(cfg: dict[str, Any], rank: int):
    """A `log(metrics, step)` for the configured tracker, through Ray's integrations where it has one."""
    kind = cfg.get("logger", "none")
    if kind == "none" or rank != 0:
        return lambda metrics, step: None
    run_config = {
        k: cfg[k]
        for k in ("deepspeed_stage", "lr", "micro_batch_size", "grad_accum", "total_steps", "lora")
    }
    if kind == "mlflow":
        from ray.air.integrations.mlflow import setup_mlflow

        mlflow = setup_mlflow(run_config, rank_zero_only=True)
        return lambda metrics, step: mlflow.log_metrics(metrics, step=step)
    if kind == "wandb":
        from ray.air.integrations.wandb import setup_wandb

        run = setup_wandb(run_config, rank_zero_only=True)
        return lambda metrics, step: run.log(metrics, step=step)
    from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

    writer = SummaryWriter(log_dir=cfg["tensorboard_dir"])

    def log(metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            writer.add_scalar(f"train/{key}", value, step)
        writer.flush()

    return log


def use_bf16(precision: str, use_cuda: bool) -> bool:
    """bf16 where the hardware computes it natively; never fp16 on CPU (the config refuses it)."""
    if precision in ("bf16", "fp32"):
        return precision == "bf16"
    if use_cuda:
        return torch.cuda.is_bf16_supported()
    from tapir_ray.runtime import cpu_supports_bf16

    return cpu_supports_bf16()


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import deepspeed

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = {**cfg, "world_size": world}
    use_cuda = torch.cuda.is_available() and cfg["use_gpu"]
    device = (
        torch.device(f"cuda:{torch.cuda.current_device()}") if use_cuda else torch.device("cpu")
    )
    if not use_cuda:
        # On CPU DeepSpeed compiles a C++ shared-memory op at its first init (g++, ~40 s on 2 cores,
        # again for every new environment) that only its inference all-reduce calls; training's
        # collectives go through gloo. DeepSpeed has no switch for it: marked unavailable here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Ray Train already set up torch.distributed; DeepSpeed adopts that group. It must know the world
    # size before HfDeepSpeedConfig (ZeRO-3) reads the batch sizes.
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    fp16 = cfg["precision"] == "fp16" and use_cuda  # the config refuses fp16 without GPUs
    bf16 = not fp16 and use_bf16(cfg["precision"], use_cuda)
    ds_config = deepspeed_config(cfg, bf16, fp16)
    dtype = torch.float16 if fp16 else torch.bfloat16 if bf16 else torch.float32
    model, _hf_ds = build_model(cfg, ds_config, dtype)
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg["total_steps"], cfg["warmup_ratio"], cfg["scheduler"])
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )

    step, epoch, skip_batches = 0, 0, 0
    history: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            # LoRA checkpoints hold the trainable weights only (see _report_with_checkpoint).
            engine.load_checkpoint(
                folder, tag=CHECKPOINT_TAG, load_module_strict=cfg["full_finetune"]
            )
            with open(os.path.join(folder, STATE_FILE)) as f:
                state = json.load(f)
        step, epoch, skip_batches = state["step"], state["epoch"], state["micro_batches_in_epoch"]
        if storage.exists(cfg["metrics_path"]):  # keep what was reported up to the checkpoint
            history = [m for m in storage.read_json(cfg["metrics_path"]) if m["step"] <= step]

    log_metrics = experiment_logger(cfg, rank)
    shard = ray.train.get_dataset_shard("train")
    fpt = flops_per_token(engine.module)
    peak = cfg.get("peak_flops_per_device")
    collate_fn = TokenizeCollate(cfg["model_path"], cfg["max_length"], cfg["chat_template"])
    if cfg.get("heldout_before_path") and cfg.get("heldout") and checkpoint is None:
        # The model as the fit starts (a fresh LoRA adapter changes nothing): the base student's
        # held-out NLL, computed where it is loaded instead of by a task that loads it again.
        _heldout_nll(engine, cfg, collate_fn, rank, cfg["heldout_before_path"])
        engine.module.train()
    window_tokens = window_response_tokens = window_samples = 0
    window_start = time.perf_counter()
    losses: list[float] = []
    while step < cfg["total_steps"]:
        micro = 0
        for batch in shard.iter_torch_batches(
            batch_size=cfg["micro_batch_size"], prefetch_batches=2, collate_fn=collate_fn
        ):
            micro += 1
            if (
                micro <= skip_batches
            ):  # resumed mid-epoch: these micro-batches were already trained on
                continue
            tensors = {k: v.to(device) for k, v in batch.items()}
            out = engine(**tensors)
            engine.backward(out.loss)
            engine.step()
            losses.append(float(out.loss.detach().float()))
            window_response_tokens += int((tensors["labels"] != IGNORE_INDEX).sum())
            window_tokens += int(tensors["attention_mask"].sum())
            window_samples += len(batch["input_ids"])
            if not engine.is_gradient_accumulation_boundary():
                continue
            step += 1
            elapsed = time.perf_counter() - window_start
            metrics = {
                "step": step,
                "epoch": epoch,
                "loss": sum(losses) / len(losses),
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": window_tokens * world / elapsed if elapsed else 0.0,
                "response_tokens_per_s": window_response_tokens * world / elapsed
                if elapsed
                else 0.0,
                "samples_per_s": window_samples * world / elapsed if elapsed else 0.0,
            }
            if peak and use_cuda:
                metrics["mfu"] = fpt * metrics["tokens_per_s"] / (peak * world)
            losses, window_tokens, window_response_tokens, window_samples = [], 0, 0, 0
            window_start = time.perf_counter()
            if rank == 0:
                history.append(metrics)
                storage.write_json_atomic(cfg["metrics_path"], history)
                log_metrics(metrics, step)
            done = step >= cfg["total_steps"]
            if step % cfg["checkpoint_every_steps"] == 0 or done:
                _report_with_checkpoint(
                    engine,
                    metrics,
                    {"step": step, "epoch": epoch, "micro_batches_in_epoch": micro},
                    rank,
                    cfg["full_finetune"],
                )
            else:
                ray.train.report(metrics)
            if done:
                break
        if step < cfg["total_steps"]:
            epoch += 1
            skip_batches = 0
            if micro == 0:
                raise RuntimeError("the training shard is empty")

    _save_adapter(engine, cfg, rank)
    if cfg.get("heldout"):
        _heldout_nll(engine, cfg, collate_fn, rank, cfg["heldout_path"])


def _heldout_nll(
    engine, cfg: dict[str, Any], collate_fn: TokenizeCollate, rank: int, path: str
) -> None:
    """The held-out NLL of the model just trained, computed where it is already loaded (rather
    than by a task that loads it again). Every rank runs the same forwards, as ZeRO-3 gathers each
    layer's weights collectively; rank 0 writes the figure (as eval.nll.heldout_nll computes it)."""
    from tapir_ray.eval.nll import sft_examples, token_nll

    examples = sft_examples(collate_fn.tokenize.tokenizer, cfg["heldout"], cfg["max_length"])
    engine.module.eval()
    with torch.no_grad():
        total, count = token_nll(engine.module, examples, collate_fn.pad_id)
    if rank == 0:
        nll = round(total / count, 5) if count else None
        storage.write_json_atomic(path, {"nll": nll, "tokens": count, "rows": len(cfg["heldout"])})


def _report_with_checkpoint(
    engine, metrics: dict, state: dict, rank: int, full_finetune: bool
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        # A collective: every rank writes its shard. The frozen base weights are left out (they are
        # the base model's; a 7B base would otherwise be copied into every LoRA checkpoint).
        engine.save_checkpoint(
            folder, tag=CHECKPOINT_TAG, exclude_frozen_parameters=not full_finetune
        )
        if rank == 0:
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(state, f)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"checkpoint-step-{state['step']:06d}",
        )


def _save_adapter(engine, cfg: dict[str, Any], rank: int) -> None:
    """Gathers the trainable weights (ZeRO-3 partitions them) and saves them from rank 0."""
    import deepspeed

    module = engine.module
    trainable = [p for p in module.parameters() if p.requires_grad]
    stage3 = cfg["deepspeed_stage"] == 3
    gather = (
        deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
        if stage3
        else contextlib.nullcontext()
    )
    with gather:
        if rank != 0:
            return
        with tempfile.TemporaryDirectory() as tmp:
            if cfg["full_finetune"]:
                module.save_pretrained(tmp, safe_serialization=True)
            else:
                names = {n for n, p in module.named_parameters() if p.requires_grad}
                state = {
                    n: p.detach().to(torch.float32).cpu().clone()
                    for n, p in module.named_parameters()
                    if n in names
                }
                module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            fs, dest = storage.fs_and_path(cfg["adapter_dir"])
            if fs.exists(dest):
                fs.rm(dest, recursive=True)
            fs.makedirs(dest, exist_ok=True)
            for name in os.listdir(tmp):
                fs.put_file(os.path.join(tmp, name), f"{dest}/{name}")
