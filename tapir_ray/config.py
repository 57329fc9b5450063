"""The run configuration: one YAML file, validated by the pydantic models in this module.

Every default of the TAPIR and CITING papers (see the algorithm notes in the README) is a field
here, so a run is fully described by its YAML. Secrets never live in the file: an endpoint names
the environment variable that holds its key (`api_key_env`), and `redacted()` is what gets written
to the run directory, logs and job metadata.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# --- helpers -------------------------------------------------------------------------------------

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Shapes of real credentials; a value of this shape is never echoed back in an error message.
SECRET_SHAPES = re.compile(
    r"(sk-[A-Za-z0-9_\-]{8,}|(?:ghp|gho|hf|xox[bap])_[A-Za-z0-9]{8,}|Bearer\s+\S+|AKIA[0-9A-Z]{12,})"
)


class ConfigError(Exception):
    """A config file that cannot be used; `problems` holds one human-readable line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def looks_secret(value: Any) -> bool:
    return isinstance(value, str) and bool(SECRET_SHAPES.search(value))


def redact(text: str, *secrets: str | None) -> str:
    """`text` with every credential-shaped run and each given secret value replaced."""
    for secret in secrets:
        if secret and len(secret) >= 4 and secret != "EMPTY":
            text = text.replace(secret, "[redacted]")
    text = SECRET_SHAPES.sub("[redacted]", text)
    return KEY_FIELDS.sub(lambda m: m.group(1) + "[redacted]", text)


KEY_FIELDS = re.compile(r"((?:api[_-]?key|authorization|x-api-key)[\"'\s:=]+)[^\s\"',}]+", re.I)


def is_loopback(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Strict(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]


# --- run -----------------------------------------------------------------------------------------


class RunConfig(_Strict):
    dir: str = Field(
        "runs/default",
        description="Run directory: a local path or an fsspec URL (s3://, gs://, ...).",
    )
    name: str | None = Field(
        None, description="A label for reports; defaults to the run directory's name."
    )
    seed: int = Field(
        0,
        description="Seeds sampling, splits and down-sampling; the same seed gives the same training sets.",
    )


# --- pool ----------------------------------------------------------------------------------------

PoolFormat = Literal["auto", "json", "jsonl", "parquet", "csv", "hf"]
PoolSchema = Literal["auto", "alpaca", "messages", "sharegpt", "columns"]


class ColumnMap(_Strict):
    instruction: str = "instruction"
    input: str | None = "input"
    output: str | None = "output"


class PoolConfig(_Strict):
    paths: list[str] = Field(default_factory=lambda: ["bundled:alpaca-5k"], min_length=1)
    format: PoolFormat = "auto"
    schema_: PoolSchema = Field("auto", alias="schema")
    columns: ColumnMap = Field(default_factory=ColumnMap)
    limit: PositiveInt | None = Field(
        None, description="Read at most this many rows (in file order)."
    )
    max_chars: PositiveInt = Field(
        16000, description="Rows whose instruction + input exceed this go to the quarantine."
    )
    decontaminate_against: list[str] = Field(
        default_factory=lambda: ["bundled:mt-bench"],
        description="Evaluation prompt files; pool rows whose normalised text matches one are removed.",
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


# --- student -------------------------------------------------------------------------------------


class SamplingConfig(_Strict):
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    max_tokens: PositiveInt = 512
    seed: int | None = None


class StudentConfig(_Strict):
    model: str = Field(
        "bundled:smollm2-135m",
        description="A local HF folder, a hub id on a cluster with hub access, or bundled:NAME.",
    )
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto",
        description="auto: bfloat16 on GPUs and on CPUs that compute it natively (AVX512-BF16, "
        "AMX), float32 on other CPUs.",
    )
    max_model_len: PositiveInt = 2048
    over_length: Literal["truncate", "dead-letter"] = Field(
        "truncate", description="What happens to a prompt longer than max_model_len - max_tokens."
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    batch_size: PositiveInt = 16
    replicas: PositiveInt = Field(1, description="vLLM engine replicas (one actor each).")
    tensor_parallel_size: PositiveInt = 1
    gpus_per_replica: Annotated[float, Field(ge=0)] = 1.0
    cpus_per_replica: Annotated[float, Field(gt=0)] = 1.0
    cpu_threads: PositiveInt | None = Field(
        None,
        description="Threads the transformers engine computes with on a CPU. None: every core "
        "the node gives the process, as vLLM-CPU does (Ray's default for a 1-CPU actor is one).",
    )
    accelerator_type: str | None = Field(
        None, description="GPU type the engines need on a mixed cluster (Ray's name, e.g. H100)."
    )
    max_lora_rank: PositiveInt = 64
    chat_template: str | None = Field(
        None,
        description="The chat template prompts are rendered with, for inference and training alike: "
        "chatml, llama-2, llama-3 or the path of a Jinja file. None: the model's own, or chatml "
        "for a model without one (a base model).",
    )

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if (
            v is None
            or v in ("chatml", "llama-2", "llama-3")
            or v.endswith((".jinja", ".j2", ".txt"))
        ):
            return v
        raise ValueError("chatml, llama-2, llama-3, or the path of a .jinja file")


# --- oracle --------------------------------------------------------------------------------------


class BatchSettings(_Strict):
    """How an endpoint takes batches (OpenAI's Batch API; vLLM's `run-batch` reads the same files)."""

    price_factor: Annotated[float, Field(ge=0, le=1)] = Field(
        0.5, description="The batch price as a share of the online price (OpenAI: half)."
    )
    completion_window: str = "24h"
    max_requests: PositiveInt = Field(
        50_000, description="Requests per batch file (OpenAI: 50,000)."
    )
    max_bytes: PositiveInt = Field(
        200 * 2**20, description="Bytes per batch file (OpenAI: 200 MB)."
    )
    poll_s: Annotated[float, Field(gt=0)] = Field(
        15.0,
        description="First wait between two status checks of a batch; it doubles up to poll_max_s.",
    )
    poll_max_s: Annotated[float, Field(gt=0)] = 300.0
    max_attempts: PositiveInt = Field(
        3,
        description="Submissions of one request (after an expired or cancelled batch, or a retryable "
        "status on its line) before it is a dead letter.",
    )


class EndpointConfig(_Strict):
    base_url: str | None = Field(
        None,
        description="OpenAI-compatible base URL, e.g. https://api.openai.com/v1. None = the local server.",
    )
    model: str = "local"
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the key (never the key itself).",
    )
    rpm: PositiveInt = 500
    tpm: PositiveInt = 200_000
    max_concurrency: PositiveInt = Field(
        32,
        description="Requests one oracle actor keeps in flight. An actor left with rows at the end "
        "of a stage borrows the slots its stage's other actors leave unused: a stage holds at most "
        "its actors times this.",
    )
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    max_retries: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description="Retries of a retryable failure (429, 408, 409, 5xx, timeouts, dropped "
        "connections) before the row is dead-lettered. None = retry until retry_deadline_s.",
    )
    retry_deadline_s: Annotated[float, Field(gt=0)] = Field(
        600.0,
        description="How long one request keeps retrying (from its first attempt): long enough to "
        "ride out an outage of several minutes.",
    )
    max_retry_after_s: Annotated[float, Field(gt=0)] = Field(
        120.0, description="A Retry-After longer than this is capped (and logged)."
    )
    allow_key_over_http: bool = Field(
        False,
        description="Send the key over plain http to a host that is not this machine. Off: such an "
        "endpoint must use https or name no api_key_env.",
    )
    continue_final_message: bool = Field(
        False,
        description="The endpoint continues a final assistant turn (vLLM, tapir-ray's server): judge and "
        "classifier replies are prefilled with the verdict's opening. Not for OpenAI's API.",
    )
    structured_choice: bool = Field(
        False,
        description="The endpoint takes vLLM's `structured_outputs: {choice: [...]}` (vLLM, SGLang): "
        "classification replies are constrained to the taxonomy's labels. Not for OpenAI's API.",
    )
    price_input_per_m: Annotated[float, Field(ge=0)] = 0.0
    price_output_per_m: Annotated[float, Field(ge=0)] = 0.0
    batch: BatchSettings = Field(default_factory=BatchSettings)

    @field_validator("api_key_env")
    @classmethod
    def _env_name_not_secret(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if looks_secret(v) or not ENV_NAME.match(v):
            raise ValueError(
                "the name of an environment variable (e.g. OPENAI_API_KEY), never the key itself"
            )
        return v

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if looks_secret(v):
            raise ValueError(
                "a URL without credentials; put the key in the environment variable named by api_key_env"
            )
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("an http(s) URL such as http://127.0.0.1:8000/v1")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _key_not_in_clear(self) -> EndpointConfig:
        if (
            self.api_key_env
            and self.base_url
            and self.base_url.startswith("http://")
            and not is_loopback(self.base_url)
            and not self.allow_key_over_http
        ):
            raise ValueError(
                "plain http to a host other than this machine would send the key in clear: use "
                "https, set api_key_env: null, or set allow_key_over_http: true"
            )
        return self

    def api_key(self) -> str:
        """The key from the environment; local servers accept any non-empty key."""
        if self.api_key_env and os.environ.get(self.api_key_env):
            return os.environ[self.api_key_env]
        return "EMPTY"


OracleMode = Literal["online", "batch"]
# The roles a mode can be set for: `eval` is `tapir-ray eval`'s judge, `types` and `rubric` build
# CITING's rubrics; `default` covers every role not named.
MODE_ROLES = ("default", "teacher", "judge", "refine", "expand", "classify", "types", "rubric",
              "revise", "eval")  # fmt: skip


class OracleConfig(_Strict):
    mode: OracleMode | dict[str, OracleMode] = Field(
        "online",
        description="online: chat requests, many in flight. batch: the provider's Batch API (half "
        "the price, answers within its completion window). One value, or one per role, e.g. "
        "{default: online, teacher: batch, judge: batch}.",
    )
    local: bool = Field(
        False,
        description="Start `tapir-ray oracle serve` for this run and point every role without a base_url at it.",
    )
    local_backend: Literal["auto", "vllm", "hf", "scripted"] = Field(
        "auto",
        description="The local server: vllm (vLLM's OpenAI-compatible server), hf (transformers "
        "`generate` behind `tapir-ray oracle serve`), scripted (rule-based replies, for tests); "
        "auto = vllm when it is installed, else hf.",
    )
    local_model: str = "bundled:smollm2-135m"
    local_port: int = Field(0, ge=0, le=65535, description="0 = pick a free port.")
    local_max_batch: PositiveInt = Field(
        8, description="Requests the local model generates together."
    )
    local_max_model_len: PositiveInt = Field(
        4096, description="vllm backend: the longest prompt + reply, in tokens."
    )
    teacher: EndpointConfig = Field(default_factory=EndpointConfig)
    judge: EndpointConfig | None = Field(None, description="Defaults to the teacher's endpoint.")
    max_usd: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="Stop sending requests once this much is spent; the run pauses, resumable.",
    )
    max_dead_letter_share: Fraction = Field(
        0.05,
        description="An oracle stage whose dead-lettered share is above this fails (one line naming "
        "the stage, the count and the commonest reason) instead of carrying holes on; --resume "
        "asks the dead-lettered rows again.",
    )
    actors: PositiveInt = 4
    cpus_per_actor: Annotated[float, Field(gt=0)] = 0.25
    nice: int = Field(
        19,
        ge=0,
        le=19,
        description="The oracle actors' CPU priority (Unix nice value; Ray starts its workers, the "
        "student engine's among them, at 15). They mostly wait on the endpoint: on a node they share "
        "with the engine its processes come first, and the actors take the CPU it leaves (15 or "
        "less: the same priority as the engine).",
    )
    teacher_max_tokens: PositiveInt = Field(
        1024, description="max_tokens of teacher answers and refinements."
    )
    teacher_temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0

    @field_validator("mode")
    @classmethod
    def _mode_roles(cls, v: Any) -> Any:
        if isinstance(v, dict) and (unknown := sorted(set(v) - set(MODE_ROLES))):
            raise ValueError(f"unknown role {unknown[0]!r}; roles: {', '.join(MODE_ROLES)}")
        return v

    def endpoint(self, role: str) -> EndpointConfig:
        if role == "judge" and self.judge is not None:
            return self.judge
        return self.teacher

    def local_server(self) -> str:
        """The local backend a run starts: `auto` is vllm where it is installed, else hf."""
        if self.local_backend != "auto":
            return self.local_backend
        import importlib.util

        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"

    def mode_for(self, role: str) -> OracleMode:
        """The mode of a stage's role (`eval-judge` is the `eval` role)."""
        if isinstance(self.mode, str):
            return self.mode
        name = "eval" if role.startswith("eval") else role
        return self.mode.get(name, self.mode.get("default", "online"))


# --- curriculum ----------------------------------------------------------------------------------

# The DistilQwen2 recipe's taxonomy and target ratios (it follows TAPIR).
DEFAULT_TAXONOMY: dict[str, float] = {
    "Math": 0.167, "Reasoning": 0.167, "Code Generation": 0.083, "Code Debug": 0.083, "Others": 0.041,
    **{c: 0.017 for c in (
        "Writing", "Computer Science", "Complex Format", "Common-Sense", "Counterfactual", "Multilingual",
        "Roleplay", "Biology", "Technology", "Ethics", "Sport", "Law", "Medicine", "Literature",
        "Entertainment", "Art", "Music", "Toxicity", "Economy", "Physics", "History", "Chemistry",
        "Philosophy", "Health", "Ecology", "Grammar", "Paraphrase",
    )},
}  # fmt: skip

STEP_BY_STEP = "math"
DEFAULT_STYLES: dict[str, str] = {
    "Math": "math",
    "Reasoning": "reasoning", "Common-Sense": "reasoning", "Counterfactual": "reasoning",
    "Code Generation": "code_generation",
    "Code Debug": "code_debug",
    "Complex Format": "exact_format", "Paraphrase": "exact_format", "Grammar": "exact_format",
}  # fmt: skip


class JudgeSettings(_Strict):
    mode: Literal["single", "pairwise"] = "single"
    logprob_scoring: bool = Field(
        False,
        description="G-Eval style probability-weighted score where the endpoint returns top logprobs.",
    )
    temperature: Annotated[float, Field(ge=0.0)] = 0.0
    max_tokens: PositiveInt = 512
    min_valid_mass: Fraction = Field(
        0.5,
        description="With logprob scoring: a verdict whose well-formed scores (or A/B) carry less "
        "of the judge's probability than this is a parse failure (repair, then dead letter), "
        "never a number.",
    )


class ClassifierSettings(_Strict):
    method: Literal["oracle", "embedding"] = "oracle"
    embedding_model: str = "bundled:all-minilm-l6-v2"
    label_sample: PositiveInt = Field(
        2000, description="Oracle-labelled rows that train the embedding classifier."
    )
    holdout_fraction: Fraction = 0.2


class TapirConfig(_Strict):
    rounds: PositiveInt = 3
    alpha: list[Fraction] = Field(
        default_factory=lambda: [0.3, 0.5, 0.7], description="Hard share per round."
    )
    round_sizes: list[PositiveInt] | None = Field(
        None, description="Cumulative N_r; None = round_size_fractions × pool size."
    )
    round_size_fractions: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [30 / 52, 50 / 52, 70 / 52],
        description="30K → 50K → 70K for a 52K pool, scaled.",
    )
    delta: float = Field(
        1.0, description="x is hard iff MFD(x) = f_J(x, y_T) − f_J(x, y_S) ≥ delta."
    )
    reuse_reference_outputs: bool = Field(
        False, description="Use the pool's outputs as y_T instead of asking the teacher."
    )
    warmup: bool = True
    warmup_rows: PositiveInt = 1000
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    classifier: ClassifierSettings = Field(default_factory=ClassifierSettings)
    taxonomy: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: dict(DEFAULT_TAXONOMY)
    )
    expansion: bool = True
    expansion_attempts: PositiveInt = Field(
        3, description="Teacher calls per missing item before duplication."
    )
    expansion_max_tokens: PositiveInt = Field(
        256, description="Token cap of one expansion reply (a new instruction, not an answer)."
    )
    near_duplicate_threshold: Fraction = Field(
        0.92, description="Cosine similarity above which an expansion is a near-duplicate."
    )
    styles: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_STYLES),
        description="Category → refinement style; others → 'general'.",
    )
    rescore_unused: bool = True
    selection: Literal["mfd", "random"] = Field(
        "mfd",
        description="mfd: TAPIR (hard share α_r by Model Fitting Difficulty). random: the control "
        "arm — the same round sizes chosen at random (seeded) without the student or the judge.",
    )
    random_quotas: bool = Field(
        True, description="With selection: random, keep the taxonomy's per-category quotas."
    )
    judge_random: bool = Field(
        False,
        description="With selection: random, still answer and judge the unused candidates as mfd "
        "does (the same oracle spend, for a control arm at equal budget) and record how many of "
        "the random picks the judge found hard; the picks stay random.",
    )
    heldout_fraction: Fraction = Field(
        0.02, description="Share of the pool held out for the per-round NLL."
    )
    nll_max_rows: PositiveInt = Field(500, description="Held-out rows the per-round NLL reads.")

    @model_validator(mode="after")
    def _schedules(self) -> TapirConfig:
        if len(self.alpha) != self.rounds:
            raise ValueError(
                f"alpha has {len(self.alpha)} entries; expected one per round ({self.rounds})"
            )
        sizes = self.round_sizes if self.round_sizes is not None else self.round_size_fractions
        name = "round_sizes" if self.round_sizes is not None else "round_size_fractions"
        if len(sizes) != self.rounds:
            raise ValueError(
                f"{name} has {len(sizes)} entries; expected one per round ({self.rounds})"
            )
        if any(b < a for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ValueError(f"{name} must not decrease (they are cumulative)")
        if "Others" not in self.taxonomy:
            raise ValueError("taxonomy must contain 'Others' (unknown labels map to it)")
        if sum(self.taxonomy.values()) <= 0:
            raise ValueError("taxonomy ratios must not all be zero")
        if self.judge_random and self.selection != "random":
            raise ValueError("judge_random applies to selection: random (mfd always judges)")
        return self


class CitingConfig(_Strict):
    split: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.8, 0.1, 0.1], min_length=3, max_length=3
    )
    warmup: bool = True
    warmup_rows: PositiveInt | None = Field(
        None, description="SFT warm-up rows from the train split (None = all of it)."
    )
    max_types: Annotated[int, Field(ge=2, le=50)] = 20
    induction_batch_size: PositiveInt = 50
    criteria_min: Annotated[int, Field(ge=1)] = 3
    criteria_max: Annotated[int, Field(ge=1)] = 7
    required_criteria: list[str] = Field(
        default_factory=lambda: ["articulate", "in-depth", "comprehensive"]
    )
    revision_rounds: PositiveInt = 3
    curriculum_questions: PositiveInt = 1000
    resample_each_round: bool = False
    inference_revisions: Annotated[int, Field(ge=0)] = Field(
        1, description="T_inf when it is not tuned (tune_inference_revisions: false)."
    )
    tune_inference_revisions: bool = True
    max_self_revisions: Annotated[int, Field(ge=0)] = Field(
        3,
        description="T_inf is chosen on the validation split among 0..max_self_revisions "
        "(tune_inference_revisions); `tapir-ray generate` uses the chosen one by default.",
    )

    @property
    def eval_drafts(self) -> int:
        """Self-revisions written in each round's evaluation: the T_inf candidates."""
        return (
            self.max_self_revisions if self.tune_inference_revisions else self.inference_revisions
        )

    type_fallback: Literal["description", "none"] = Field(
        "description",
        description="Questions the teacher names no type for: typed by the nearest type description "
        "(sentence embedding), or left untyped (none).",
    )
    rubric_max_tokens: PositiveInt = Field(
        512, description="max_tokens of the teacher's type lists, type merge and rubrics."
    )
    embedding_model: str = "bundled:all-minilm-l6-v2"
    eval_questions: PositiveInt = Field(
        100, description="Test-split questions judged each round against the SFT warm-up student."
    )

    @model_validator(mode="after")
    def _ranges(self) -> CitingConfig:
        if abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(f"split must sum to 1 (got {sum(self.split):g})")
        if self.criteria_min > self.criteria_max:
            raise ValueError("criteria_min must not exceed criteria_max")
        return self


class CurriculumConfig(_Strict):
    algorithm: Literal["tapir", "citing"] = "tapir"
    tapir: TapirConfig = Field(default_factory=TapirConfig)
    citing: CitingConfig = Field(default_factory=CitingConfig)


# --- train ---------------------------------------------------------------------------------------


class LoraConfig(_Strict):
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Fraction = 0.05
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainConfig(_Strict):
    full_finetune: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)
    deepspeed_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    precision: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    num_workers: PositiveInt = 2
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0)] = 1.0
    accelerator_type: str | None = Field(
        None, description="GPU type the workers need on a mixed cluster (Ray's name, e.g. A100)."
    )
    micro_batch_size: PositiveInt = 4
    global_batch_size: PositiveInt = 32
    epochs: Annotated[float, Field(gt=0)] = 3
    max_steps: PositiveInt | None = None
    lr: Annotated[float, Field(gt=0)] | None = Field(
        None, description="None = 2e-4 for LoRA, 2e-5 for full fine-tuning."
    )
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_ratio: Fraction = 0.03
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_length: PositiveInt = 2048
    checkpoint_every_steps: PositiveInt = 50
    logger: Literal["none", "mlflow", "wandb", "tensorboard"] = "none"

    @model_validator(mode="after")
    def _batches(self) -> TrainConfig:
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size × num_workers ({per_step})"
            )
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError(
                "precision fp16 is not supported on CPU (use bf16 or fp32, or set use_gpu: true)"
            )
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.full_finetune else 2e-4)

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


# --- resources -----------------------------------------------------------------------------------


class ResourcesConfig(_Strict):
    ray_address: str | None = Field(
        None, description="None = connect to RAY_ADDRESS or start a local Ray."
    )
    num_cpus: PositiveInt | None = Field(None, description="CPUs for a local Ray (None = all).")
    object_store_gb: Annotated[float, Field(gt=0)] | None = None
    pin_curriculum_to_head: bool = True
    ingest_batch_size: PositiveInt = 4096
    embed_on_gpu: bool = Field(
        True,
        description="Sentence embeddings on the cluster's GPUs when it has any (one encoder actor "
        "per GPU, a quarter of it each); false: on CPU tasks.",
    )


# --- the whole file ------------------------------------------------------------------------------


class Config(_Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    oracle: OracleConfig = Field(default_factory=OracleConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    def redacted(self) -> dict[str, Any]:
        """The resolved config as plain data, safe to write anywhere (keys are only ever env names)."""
        data = self.model_dump(mode="json", by_alias=True)
        return _redact(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.redacted(), sort_keys=False)


def _redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    if looks_secret(obj):
        return "<redacted>"
    return obj


# --- loading and error messages ------------------------------------------------------------------


def _fields_by_alias(cls: type[BaseModel]) -> dict[str, Any]:
    return {(f.alias or name): f for name, f in cls.model_fields.items()}


def _show(value: Any) -> str:
    if looks_secret(value):
        return "<redacted>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(err: dict[str, Any], model: type[BaseModel]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        parent = _model_at(model, err["loc"][:-1])
        keys = ", ".join(_fields_by_alias(parent)) if parent else ""
        return f"unknown key (expected one of: {keys})" if keys else "unknown key"
    if kind == "missing":
        return "a value (this key is required)"
    if kind == "literal_error":
        return msg.replace("Input should be", "one of")
    if kind == "model_type":
        return "a mapping of keys"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    msg = msg.removeprefix("Input should be ").removeprefix("Input ")
    return msg[0].lower() + msg[1:] if msg else kind


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        fields = _fields_by_alias(current)
        if part not in fields:
            return None
        ann = fields[part].annotation
        current = next(
            (
                a
                for a in getattr(ann, "__args__", (ann,))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            ann,
        )
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


_NO_VALUE = object()


def format_errors(exc: ValidationError, model: type[BaseModel] = Config) -> list[str]:
    """One line per key path: `path: got VALUE, expected WHAT` (alternatives of a union joined)."""
    by_path: dict[str, tuple[Any, list[str]]] = {}
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        # pydantic adds union members' type names to the location; keep only key names.
        loc = [
            p for p in loc if not re.match(r"^(function-|constrained-|list\[|dict\[|literal\[)", p)
        ]
        loc = [p for p in loc if p not in ("str", "int", "float", "bool", "none")]
        path = ".".join(loc) or "(top level)"
        value = (
            err.get("input", _NO_VALUE)
            if err["type"] not in ("missing", "extra_forbidden")
            else _NO_VALUE
        )
        if isinstance(
            value, dict
        ):  # a check across several keys of a section: the section is not the culprit
            value = _NO_VALUE
        entry = by_path.setdefault(path, (value, []))
        what = _expected(err, model)
        if what not in entry[1]:
            entry[1].append(what)
    lines = []
    for path, (value, whats) in by_path.items():
        what = " or ".join(whats)
        lines.append(
            f"{path}: got {_show(value)}, expected {what}"
            if value is not _NO_VALUE
            else f"{path}: {what}"
        )
    return lines


def parse_config(data: Any, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            source,
            [f"(top level): got {_show(data)}, expected a mapping of sections (run, pool, ...)"],
        )
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_errors(exc)) from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ["cannot read the file: it does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(str(path), [f"{where}invalid YAML ({problem})"]) from None
    return parse_config(data, str(path))
