"""Training throughput: our Ray Train + DeepSpeed path vs a plain single-process PEFT loop, one run.

    python benchmarks/train_throughput.py [--rows 256] [--steps 10] [--max-length 256] [--micro 4]

Same model (the bundled SmolLM2-135M-Instruct, or --model), same LoRA (r 16, alpha 32, all linear
projections), same tokenised examples (Alpaca rows with their reference outputs, rendered by
tapir_ray.chat), the same samples per optimizer step. The plain loop runs in this process with
every core; ours runs `train_round` with `--workers` Ray Train workers (1 CPU each on CPU, 1 GPU
each on GPU) under ZeRO-2 and then ZeRO-3. Throughput is the median over steps 2..N of tokens per
second (padding excluded), so model loading, worker start-up and the first step are not counted;
their cost is reported separately as wall time. Results: benchmarks/results/train_throughput.json
(or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import command_line, device_name, print_table, write_results

from tapir_ray.runtime import configure_data

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"


def load_rows(n: int) -> list[dict]:
    from tapir_ray.assets import resolve_data
    from tapir_ray.oracle.prompts import user_content

    data = json.loads(Path(resolve_data("bundled:alpaca-5k")).read_text())
    return [
        {"messages": json.dumps([{"role": "user", "content": user_content(r["instruction"], r["input"])}]),
         "response": r["output"]}
        for r in data[:n]
    ]  # fmt: skip


def plain_loop(model_path: str, rows: list[dict], args) -> dict:
    """The baseline: one process, PEFT LoRA, AdamW, gradient accumulation to the same batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tapir_ray.chat import sft_example
    from tapir_ray.runtime import best_dtype
    from tapir_ray.train.loop import collate

    tok = AutoTokenizer.from_pretrained(model_path)
    examples = [
        sft_example(tok, json.loads(r["messages"]), r["response"], args.max_length) for r in rows
    ]
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=best_dtype()).to(device)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    accum = (
        args.workers
    )  # ours: `workers` micro-batches per step side by side; here one after another
    per_step, losses, cursor = [], [], 0
    for _ in range(args.steps):
        t0, tokens = time.perf_counter(), 0
        for _ in range(accum):
            chunk = examples[cursor : cursor + args.micro]
            cursor = (cursor + args.micro) % (len(examples) - args.micro)
            batch = {
                k: v.to(device)
                for k, v in collate(
                    {k: [e[k] for e in chunk] for k in ("input_ids", "labels")}, pad
                ).items()
            }
            out = model(**batch)
            (out.loss / accum).backward()
            tokens += int(batch["attention_mask"].sum())
            losses.append(float(out.loss))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        per_step.append(tokens / (time.perf_counter() - t0))
    return {"wall_s": round(time.perf_counter() - started, 1), "steps": args.steps,
            "tokens_per_s": round(statistics.median(per_step[1:]), 1), "first_loss": round(losses[0], 4),
            "last_loss": round(losses[-1], 4)}  # fmt: skip


def ours(model: str, rows: list[dict], stage: int, args, tmp: str, use_gpu: bool) -> dict:
    import ray

    from tapir_ray.config import TrainConfig
    from tapir_ray.train import train_round

    cfg = TrainConfig(
        deepspeed_stage=stage, num_workers=args.workers, use_gpu=use_gpu, micro_batch_size=args.micro,
        global_batch_size=args.micro * args.workers, max_steps=args.steps, max_length=args.max_length,
        checkpoint_every_steps=10**6, lora={"r": 16, "alpha": 32}, lr=2e-4, warmup_ratio=0.0, scheduler="constant",
    )  # fmt: skip
    started = time.perf_counter()
    result = train_round(ray.data.from_items(rows), cfg, f"{tmp}/zero{stage}", model=model)
    wall = time.perf_counter() - started
    tps = [m["tokens_per_s"] for m in result.metrics[1:]]
    out = {"wall_s": round(wall, 1), "steps": result.steps, "tokens_per_s": round(statistics.median(tps), 1),
           "first_loss": round(result.metrics[0]["loss"], 4), "last_loss": round(result.metrics[-1]["loss"], 4)}  # fmt: skip
    mfu = [m["mfu"] for m in result.metrics[1:] if m.get("mfu") is not None]
    if mfu:
        out["mfu"] = round(statistics.median(mfu), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="bundled:smollm2-135m")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import ray
    import torch

    from tapir_ray.assets import resolve_model
    from tapir_ray.runtime import best_dtype

    use_gpu = torch.cuda.is_available()
    model_path = resolve_model(args.model)
    rows = load_rows(args.rows)
    report: dict = {
        "benchmark": "train_throughput",
        "command": command_line("train_throughput.py", args),
        "device": device_name(),
        "dtype": str(best_dtype()).removeprefix("torch."),
        "model": args.model, "lora": "r 16, alpha 32, all linear", "samples_per_step": args.micro * args.workers,
    }  # fmt: skip
    report["plain_peft_loop"] = plain_loop(model_path, rows, args)
    print(json.dumps({"plain_peft_loop": report["plain_peft_loop"]}), flush=True)
    ray.init(include_dashboard=False, log_to_driver=False)
    configure_data()
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (int(s) for s in args.stages.split(",")):
            key = f"ours_zero{stage}"
            report[key] = ours(args.model, rows, stage, args, tmp, use_gpu)
            report[f"ratio_vs_plain_zero{stage}"] = round(
                report[key]["tokens_per_s"] / report["plain_peft_loop"]["tokens_per_s"], 3
            )
            print(
                json.dumps(
                    {
                        key: report[key],
                        f"ratio_vs_plain_zero{stage}": report[f"ratio_vs_plain_zero{stage}"],
                    }
                ),
                flush=True,
            )
    write_results(args.out, report)
    rows = [[k, report[k]["tokens_per_s"], report[k]["wall_s"], f"{report[k]['first_loss']} → {report[k]['last_loss']}"]
            for k in ("plain_peft_loop", "ours_zero2", "ours_zero3") if k in report]  # fmt: skip
    print_table(["path", "tokens/s", "wall s", "loss first → last"], rows)
    for key in ("ratio_vs_plain_zero2", "ratio_vs_plain_zero3"):
        if key in report:
            print(f"{key}: {report[key]}")


if __name__ == "__main__":
    main()
