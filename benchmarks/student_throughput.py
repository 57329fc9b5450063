"""Student generation throughput: our stages vs the plain library calls, same prompts, one run.

    python benchmarks/student_throughput.py [--prompts 512] [--prompts-hf 192] [--max-tokens 64]

(a) vLLM: tapir-ray's student stage (ray.data.llm processor inside Ray Data, prompts rendered by
    tapir_ray.chat) vs raw `vllm.LLM.generate` on the same token ids.
(b) transformers: our HFStudent stage (Ray Data actor) vs a plain batched `generate` loop.
Greedy decoding, the bundled SmolLM2-135M-Instruct, bf16 where supported. Start-up is timed
separately: the raw runs' generation excludes their model load, and ours is the extra time a full
run takes over a one-batch run of the same stage (which pays the same start-up), or for
transformers its engine's own generate time. Engines left out (--engines) keep their last
figures. Results:
benchmarks/results/student_throughput.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from common import command_line, device_name, print_table, write_results

from tapir_ray.assets import resolve_data, resolve_model
from tapir_ray.chat import prompt_ids
from tapir_ray.config import StudentConfig
from tapir_ray.runtime import best_dtype, configure_data
from tapir_ray.student import run_student

RESULTS = Path(__file__).parent / "results" / "student_throughput.json"


def load_prompts(n: int) -> list[list[dict]]:
    data = json.loads(Path(resolve_data("bundled:alpaca-5k")).read_text())
    return [
        [
            {
                "role": "user",
                "content": (r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")),
            }
        ]
        for r in data[:n]
    ]


def raw_vllm(model: str, ids: list[list[int]], args, use_gpu: bool) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from tapir_ray.runtime import vllm_cpu_dtype

    # As our stage runs it: eager on CPU, in the dtype the CPU computes natively.
    kwargs = (
        {"dtype": "bfloat16"} if use_gpu else {"enforce_eager": True, "dtype": vllm_cpu_dtype()}
    )
    started = time.perf_counter()
    llm = LLM(model=model, max_model_len=args.max_model_len, **kwargs)
    start_s = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    started = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()
    return {
        "engine_start_s": round(start_s, 1),
        "seconds": round(seconds, 2),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
    }


def raw_hf(model: str, ids: list[list[int]], args, use_gpu: bool) -> dict:
    max_tokens, batch_size = args.max_tokens, args.batch_size
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    started = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=best_dtype()).eval()
    start_s = time.perf_counter() - started
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens = 0
    started = time.perf_counter()
    for b in range(0, len(ids), batch_size):
        chunk = ids[b : b + batch_size]
        width = max(len(i) for i in chunk)
        x = torch.tensor([[pad] * (width - len(i)) + i for i in chunk])
        m = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in chunk])
        with torch.inference_mode():
            out = lm.generate(
                input_ids=x,
                attention_mask=m,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        for row in out[:, width:].tolist():
            stop = next((k for k, t in enumerate(row) if t == tok.eos_token_id), None)
            tokens += stop if stop is not None else len(row)
    seconds = time.perf_counter() - started
    return {
        "engine_start_s": round(start_s, 1),
        "seconds": round(seconds, 2),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
    }


def ours(engine: str, prompts: list, args, tmp: str, use_gpu: bool) -> dict:
    student = StudentConfig(
        model="bundled:smollm2-135m", engine=engine, max_model_len=args.max_model_len, batch_size=args.batch_size,
        cpus_per_replica=1.0, gpus_per_replica=1.0 if use_gpu else 0, sampling={"max_tokens": args.max_tokens, "temperature": 0.0},
    )  # fmt: skip
    rows = [{"id": f"p{i}", "messages": json.dumps(m)} for i, m in enumerate(prompts)]
    m = run_student(
        ray.data.from_items(rows),
        student,
        f"{tmp}/{engine}",
        run_dir=tmp,
        round_=0,
        use_gpu=use_gpu,
    )
    out = {
        "time_to_first_output_s": m["time_to_first_output_s"], "seconds": m["seconds"], "generated_tokens": m["generated_tokens"],
        "tokens_per_s": m["generated_tokens_per_s"], "steady_tokens_per_s": m["steady_generated_tokens_per_s"],
    }  # fmt: skip
    if engine == "transformers":
        # The engine's own `generate` time: each batch's seconds are split over its rows.
        latency = pq.read_table(f"{tmp}/{engine}", columns=["latency_s"])["latency_s"]
        out["engine_generate_s"] = round(float(pc.sum(latency).as_py()), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=512, help="prompts for the vLLM pair")
    parser.add_argument(
        "--prompts-hf", type=int, default=192, help="prompts for the transformers pair"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--engines", default="vllm,transformers")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch
    from transformers import AutoTokenizer

    use_gpu = torch.cuda.is_available()
    model = resolve_model("bundled:smollm2-135m")
    tok = AutoTokenizer.from_pretrained(model)
    ray.init(include_dashboard=False, log_to_driver=False)
    configure_data()
    report: dict = {
        "benchmark": "student_throughput",
        "command": command_line("student_throughput.py", args),
        "device": device_name(),
        "model": "bundled:smollm2-135m (SmolLM2-135M-Instruct), greedy, no adapter",
        "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "note": "ratio_*_vs_raw compare generation tokens/s: raw after its model load; ours = (tokens of the full run - tokens of a one-batch run) / (time of the full run - time of the one-batch run), which excludes our start-up as the raw model load is excluded; for transformers, whose batches run in one task, ours = the full run's tokens / its engine's own generate seconds (engine_generate_s). stage_time_*_vs_raw_with_startup = our whole stage's seconds / (the raw engine's load + generation seconds; its imports not counted)",
    }  # fmt: skip
    pairs = [("vllm", args.prompts, raw_vllm), ("transformers", args.prompts_hf, raw_hf)]
    with tempfile.TemporaryDirectory() as tmp:
        for engine, n, raw in pairs:
            if engine not in args.engines:
                continue
            prompts = load_prompts(n)
            ids = [prompt_ids(tok, m)[: args.max_model_len - args.max_tokens] for m in prompts]
            key = "vllm" if engine == "vllm" else "hf"
            report[f"{key}_raw"] = raw(model, ids, args, use_gpu) | {"prompts": n}
            # Our stage's fixed cost (Ray Data start, prompt rendering, engine start) is measured by
            # a run of one batch; what the full run takes beyond it is its generation time.
            fixed = ours(engine, prompts[: args.batch_size], args, f"{tmp}/fixed", use_gpu)
            full = ours(engine, prompts, args, tmp, use_gpu)
            extra_s = full["seconds"] - fixed["seconds"]
            extra_tokens = full["generated_tokens"] - fixed["generated_tokens"]
            full["one_batch_run_s"] = fixed["seconds"]
            full["incremental_tokens_per_s"] = round(extra_tokens / extra_s, 1)
            report[f"{key}_ours"] = full | {"prompts": n}
            raw_run = report[f"{key}_raw"]
            ratio = full["incremental_tokens_per_s"] / raw_run["tokens_per_s"]
            if "engine_generate_s" in full:
                # transformers runs a block's batches in one task, so the difference of two runs
                # is mostly the noise of their start-ups: its engine times its own generation.
                engine_rate = full["generated_tokens"] / full["engine_generate_s"]
                full["engine_tokens_per_s"] = round(engine_rate, 1)
                ratio = engine_rate / raw_run["tokens_per_s"]
            report[f"ratio_{key}_vs_raw"] = round(ratio, 3)
            # The whole stage (start-up included) against the engine's load plus its generation.
            whole = full["seconds"] / (raw_run["engine_start_s"] + raw_run["seconds"])
            report[f"stage_time_{key}_vs_raw_with_startup"] = round(whole, 3)
            keys = (f"{key}_raw", f"{key}_ours", f"ratio_{key}_vs_raw",
                    f"stage_time_{key}_vs_raw_with_startup")  # fmt: skip
            print(json.dumps({k: report[k] for k in keys}), flush=True)
    # Engines not run this time keep their last figures, marked with the command that made them.
    if args.out.exists():
        earlier = json.loads(args.out.read_text())
        for key in ("vllm", "hf"):
            if f"{key}_ours" not in report and f"{key}_ours" in earlier:
                for k in [
                    k
                    for k in earlier
                    if k.startswith((f"{key}_", f"ratio_{key}_", f"stage_time_{key}_"))
                ]:
                    report[k] = earlier[k]
                report[f"{key}_from_earlier_run"] = earlier.get(
                    f"{key}_from_earlier_run", earlier["command"]
                )
    write_results(args.out, report)
    rows = []
    for key in ("vllm_raw", "vllm_ours", "hf_raw", "hf_ours"):
        if key in report:
            r = report[key]
            start = r.get("engine_start_s", r.get("time_to_first_output_s"))
            rows.append(
                [
                    key,
                    r["prompts"],
                    start,
                    r["seconds"],
                    r["generated_tokens"],
                    r["tokens_per_s"],
                    r.get("incremental_tokens_per_s", r["tokens_per_s"]),
                ]
            )
    print_table(
        [
            "path",
            "prompts",
            "start/first s",
            "total s",
            "tokens",
            "tok/s (wall)",
            "generation tok/s",
        ],
        rows,
    )
    for key in ("ratio_vllm_vs_raw", "ratio_hf_vs_raw"):
        if key in report:
            print(f"{key}: {report[key]}")


if __name__ == "__main__":
    main()
