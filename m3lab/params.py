"""Params: one profile per hardware/recipe, layered with `extends:` from base, card and hardware files, validated
by a schema.

The story of a params file:
  1. read `params/<profile>.yaml`; if it `extends:` other files (one name or a list: base, card, hardware; see
     params/README.md), read those first, in order, recursively,
  2. deep-merge them left to right, then the profile on top (mappings merge key by key; lists and scalars are
     replaced), remembering which file set each key, so an error can name the file a bad value came from,
  3. validate the merged mapping against `Params` (pydantic, unknown keys forbidden),
  4. hand each stage only the sections it declares (see `m3lab.dag.STAGES`).

papermill's own `-f` merge is shallow, which is why the merge lives here.
"""

from __future__ import annotations

import hashlib
import re
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError


from m3lab import envs
from m3lab.transport import is_loopback
from m3lab.registry import ENGINES, EVAL_RUNNERS, FAULTS, RECIPES, STAGES, Registry

__all__ = [
    "ParamsError",
    "Params",
    "load_params",
    "resolve_profile_path",
    "params_hash",
    "PARAMS_DIR",
    "DEFAULT_PROFILE",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
PARAMS_DIR = REPO_ROOT / "params"
DEFAULT_PROFILE = "cpu-tiny"


class ParamsError(ValueError):
    """A params file is unreadable or invalid; the message names the file and the key path."""


def _registered(registry: Registry) -> Any:
    """A str field that must name an entry of `registry` (the error lists the registered names)."""
    return Annotated[str, AfterValidator(registry.check)]


EngineName = _registered(ENGINES)
RecipeName = _registered(RECIPES)
RunnerName = _registered(EVAL_RUNNERS)
FaultName = _registered(FAULTS)


def _stage_name(name: str) -> str:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return name


StageName = Annotated[str, AfterValidator(_stage_name)]


# --------------------------------------------------------------------------------------------------------------
# Schema. Every section forbids unknown keys: a typo must fail loudly, not be silently ignored.


def _int_like(tp: Any) -> bool:
    """int, int | None, list[int], Annotated[int, …]: the annotations where a YAML `true` would read as 1."""
    if tp is int:
        return True
    args = getattr(tp, "__args__", ()) or ()
    origin = getattr(tp, "__origin__", None)
    if origin is Annotated:
        return _int_like(args[0])
    return any(_int_like(a) for a in args if a is not type(None)) and not any(a in (str, float, bool) for a in args)


def _key_error(key: str, message: str) -> PydanticCustomError:
    """A check across a section's keys, reported at the key it is about (so the error names the file that set it)."""
    return PydanticCustomError("key_error", "{message}", {"key": key, "message": message})


class _Section(BaseModel):
    # Unknown keys are typos; infinities and NaN are never a sane count, size or timeout.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_ints(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, f in cls.model_fields.items():
                v = data.get(name)
                values = v if isinstance(v, list) else [v]
                if _int_like(f.annotation) and any(isinstance(x, bool) for x in values):
                    raise _key_error(name, f"expected an integer, got {v!r} (a YAML boolean)")
        return data


class Hardware(_Section):
    """Facts about the machine (`params/hardware/<name>.yaml`), not settings of a run."""

    name: str = "cpu"
    accelerator: Literal["none", "nvidia", "amd", "apple"] = "none"
    gpus: int = Field(0, ge=0)  # per node
    gpu_memory_gib: float = Field(0.0, ge=0)  # per GPU (unified memory on Apple silicon)
    nodes: int = Field(1, ge=1)  # > 1: vLLM across hosts with the Ray executor
    # Peak memory bandwidth per GPU in GB/s (10^9 bytes/s, as datasheets give it: 4.8 TB/s = 4800), and where the
    # figure comes from (a URL or the datasheet's name). Unset where nobody looked it up (a CPU box).
    memory_bandwidth_gb_s: float | None = Field(None, gt=0)
    memory_bandwidth_source: str | None = None

    @model_validator(mode="after")
    def _bandwidth_has_a_source(self) -> "Hardware":
        bandwidth, source = self.memory_bandwidth_gb_s, self.memory_bandwidth_source
        if bandwidth is not None and not (source or "").strip():
            raise _key_error("memory_bandwidth_gb_s", f"{bandwidth:g} GB/s needs its source: add "
                             "memory_bandwidth_source (the datasheet or URL the figure comes from), or remove the "
                             "bandwidth")
        if source is not None and bandwidth is None:
            raise _key_error("memory_bandwidth_source", "a source without a figure: add memory_bandwidth_gb_s (GB/s "
                             "per GPU), or remove the source")
        return self


class Card(_Section):
    """The model card a profile reproduces (`../shared/seeds/`)."""

    id: str
    title: str
    url: str
    seed_file: str | None = None


class Model(_Section):
    # `embedded`: m3lab builds the tiny M3 and publishes it on a local Hub-compatible server;
    # `hub`: a real repo on the Hugging Face Hub (or any endpoint).
    source: Literal["embedded", "hub"] = "embedded"
    repo_id: str  # the checkpoint to quantize (the base model) — or the embedded repo
    revision: str = Field(min_length=1)
    # A card's own quantized checkpoint; `use: published` downloads it (and skips quantizing),
    # `use: reproduce` downloads `repo_id` and runs the card's recipe.
    published: str | None = None
    published_revision: str | None = None
    use: Literal["reproduce", "published"] = "reproduce"
    max_model_len: int = Field(4096, gt=0)
    # source=embedded only: TinySpec fields to override (e.g. head_dim: 128 for vLLM's Hopper kernels), and the seed.
    embedded: dict[str, int | float | str | list[str]] = Field(default_factory=dict)
    seed: int = 0


class Download(_Section):
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None
    endpoint: str | None = None  # None: the embedded hub for source=embedded, else the real Hub / $HF_ENDPOINT
    token_env: str = Field("HF_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # name of the env var holding the token; the token itself never enters params
    local_dir: str | None = None  # None: results/.cache/models/<repo_id>/<commit the revision resolves to>
    min_free_gb: float = Field(0.0, ge=0)


class QuarkOptions(_Section):
    """AMD Quark (card 001): an LLMTemplate registered for minimax_m3_vl, then file-to-file quantization."""

    model_type: str = "minimax_m3_vl"
    kv_layers_name: list[str]
    q_layer_name: str
    exclude_layers_name: list[str]  # the template's exclusions
    scheme: Literal["mxfp4"] = "mxfp4"
    exclude_layers: list[str]  # passed to template.get_config(exclude_layers=...)
    file_to_file: bool = True  # ModelQuantizer.direct_quantize_checkpoint: no full model load


class AutoRoundOptions(_Section):
    """AutoRound mixed-bit (card 002): per-module bits from a set, one group size."""

    bits: list[int] = Field(min_length=1)  # the bit widths the mix uses, e.g. [2, 3, 4, 8]
    average_bits: float = Field(gt=0)  # the card's headline "3.2-bit"
    group_size: int = Field(gt=0)
    sym: bool = True
    # Config fields the card had to force for vLLM's official M3 model (its loader's FORCE dict).
    hf_overrides: dict[str, Any] = Field(default_factory=dict)


class MLXOptions(_Section):
    """MLX affine quantization (card 003): low bits, one group size, more bits on sensitive tensors."""

    bits: int = Field(4, gt=0)
    group_size: int = Field(64, gt=0)
    high_bits: int = Field(8, gt=0)
    high_bits_modules: list[str] = Field(default_factory=list)  # e.g. lm_head, embed_tokens, chosen attention
    keep_vision: bool = True


class Quantize(_Section):
    recipe: RecipeName = "none"
    tool: str | None = None  # informational: llm-compressor, amd-quark, auto-round, mlx-lm (m3lab plan prints it)
    ignore: list[str] | None = None  # None: the recipe's defaults (lm_head, vision, projector, gates, indexer)
    verify: bool = True  # reload + generate on CPU after quantizing; turn off where the model cannot fit in RAM
    quark: QuarkOptions | None = None
    autoround: AutoRoundOptions | None = None
    mlx: MLXOptions | None = None

    @model_validator(mode="after")
    def _options_match_recipe(self) -> "Quantize":
        need = RECIPES.get(self.recipe).meta["options"]
        if need and getattr(self, need) is None:
            raise ValueError(f"recipe {self.recipe!r} needs its options under quantize.{need}")
        return self


# Parsers vLLM 0.25 ships that these profiles may name; a typo must not reach a GPU box.
KNOWN_PARSERS = {
    "--reasoning-parser": {"minimax_m3", "minimax_m2", "minimax_m2_append_think", "deepseek_r1", "qwen3"},
    "--tool-call-parser": {"minimax_m3", "minimax_m2", "minimax", "hermes", "qwen3_xml"},
}


class Serve(_Section):
    engine: EngineName = "transformers"
    engine_version: str | None = None  # pin: a different installed version is an error before anything starts
    text_only: bool = False  # serve the language model alone (vLLM's MiniMaxM3SparseForCausalLM layout)
    # Fault-injection tests only (m3lab.faults): serve a copy broken the way a naive loader would break it.
    fault: FaultName = "none"
    host: str = "127.0.0.1"
    # Opt-ins, off by default and stated in the report when on: binding beyond loopback exposes the server to
    # the network; `--trust-remote-code` runs Python shipped with the checkpoint.
    allow_nonlocal_host: bool = False
    allow_remote_code: bool = False
    port: int | None = Field(None, ge=1, le=65535)  # None: a free port
    served_model_name: str = "m3"
    startup_timeout_s: float = Field(600.0, gt=0, le=6 * 3600)
    # Engine flags exactly as on the command line: {"--tensor-parallel-size": 8, "--enforce-eager": true}.
    args: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    # Folders (relative to the repo root, or absolute) put in front of the server's inherited PYTHONPATH: how a
    # profile states an engine plugin it needs, e.g. tools/f2/vllm_plugin (the fix for vLLM 0.25.1's M3 sparse
    # path, vLLM #48603). Setting PYTHONPATH in `env` instead would replace the path the engine runs from.
    python_path: list[str] = Field(default_factory=list)
    # A pinned environment of m3lab's (m3lab/envs/<name>.txt, built by `make setup`) put in front of the server's
    # path, e.g. the quantizer library an engine needs to load that recipe's checkpoint.
    environment: str | None = None

    # Sampling the card's users set server-side (card 003: temperature 1.0, top_p 0.95, top_k 40); m3lab's own
    # measuring requests stay greedy unless a stage says otherwise.
    sampling: dict[str, float | int | bool] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _opt_ins(self) -> "Serve":
        if not is_loopback(f"http://{self.host}/") and not self.allow_nonlocal_host:
            raise ValueError(f"host {self.host!r} binds beyond this machine's loopback; m3lab's servers listen on "
                             f"127.0.0.1 unless the profile opts in with serve.allow_nonlocal_host: true")
        if self.args.get("--trust-remote-code") and not self.allow_remote_code:
            raise ValueError("args: --trust-remote-code runs Python code shipped with the checkpoint; the profile "
                             "must say so with serve.allow_remote_code: true")
        if "PYTHONPATH" in self.env:
            raise ValueError("env: PYTHONPATH would replace the path the engine runs from; list the folders in "
                             "serve.python_path instead (they are put in front of it)")
        if self.environment is not None and self.environment not in envs.names():
            raise ValueError(f"environment: unknown environment {self.environment!r}; m3lab/envs/ has "
                             f"{', '.join(envs.names()) or 'none'}")
        for folder in self.python_path:
            path = Path(folder) if Path(folder).is_absolute() else REPO_ROOT / folder
            if not path.is_dir():
                raise ValueError(f"python_path: {folder!r} is not a folder ({path})")
        return self

    @field_validator("args")
    @classmethod
    def _flags_are_flags(cls, v: dict[str, Any]) -> dict[str, Any]:
        for flag in v:
            if not flag.startswith("--"):
                raise ValueError(f"engine flag {flag!r} must be written as on the command line, e.g. '--{flag}'")
        for flag, known in KNOWN_PARSERS.items():
            if flag in v and v[flag] not in known:
                raise ValueError(f"{flag} {v[flag]!r} is not a parser vLLM knows; known: {sorted(known)}")
        return v


class Prompt(_Section):
    id: str
    prompt: str
    expect: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)  # each must appear in the continuation
    lang: str = "en"


class ExpectTool(_Section):
    name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)  # each must equal the call's argument of that name


class ChatCheck(_Section):
    """One /v1/chat/completions request, judged on the parsed message: the engine's own reasoning and tool
    parsers where it has them (vLLM), else m3lab.parsers (transformers serve, mlx_lm.server return raw text)."""

    id: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] = Field(default_factory=list)
    max_tokens: int = Field(96, gt=0, le=65536)
    expect: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)  # in the content
    expect_reasoning: bool = False  # a non-empty reasoning_content, and no think markup left in the content
    expect_tool: ExpectTool | None = None

    @model_validator(mode="after")
    def _expects_something(self) -> "ChatCheck":
        if not (self.expect or self.expect_reasoning or self.expect_tool):
            raise ValueError(f"chat check {self.id!r} expects nothing: give expect, expect_reasoning or expect_tool")
        if self.expect_tool and not any((t.get("function") or {}).get("name") == self.expect_tool.name
                                        for t in self.tools):
            raise ValueError(f"chat check {self.id!r}: expect_tool {self.expect_tool.name!r} is not among its tools")
        return self


class Parity(_Section):
    enabled: bool = True
    prompts: list[str] = Field(default_factory=list)
    max_tokens: int = Field(16, gt=0)
    min_match_rate: float = Field(1.0, ge=0, le=1)


# The evals the cards report, by id. A profile naming another id is a typo until someone adds it here.
KNOWN_EVALS = {"gsm8k", "gsm8k_platinum", "ifeval", "aime25", "gpqa_diamond", "math_500", "lcb_codegen_v6",
               "mmlu_pro_chat", "tiny_arith", "wikitext2_ppl"}


class Eval(_Section):
    """One accuracy eval, run by the correctness stage against the served model."""

    id: str
    runner: RunnerName = "lm_eval"
    # The runner's flags, verbatim; {model}, {base_url}, {tokenizer} (and {seed} for lighteval) are filled in.
    args: dict[str, str | int | float | bool | None | dict[str, Any]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=list)  # one run per seed, scores averaged; [] → the runner's default
    metric: str = ""  # the key in the runner's results, e.g. "exact_match,flexible-extract" (lm_eval, lighteval)
    task: str | None = None  # which task's metric to report when --tasks names several
    limit: int | None = Field(None, gt=0)
    timeout_s: float = Field(21600.0, gt=0)  # per seed run
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _metric_names_a_result(self) -> "Eval":
        if self.runner == "lm_eval" and ("," not in self.metric or not all(self.metric.split(",", 1))):
            raise ValueError(f"metric {self.metric!r}: lm-eval reports scores as '<metric>,<filter>', e.g. "
                             f"'exact_match,flexible-extract'")
        if self.runner == "lighteval" and not self.metric:
            raise ValueError("metric: lighteval's metric name is required, e.g. 'math_pass@1:1_samples'")
        return self

    @field_validator("id")
    @classmethod
    def _known_eval(cls, v: str) -> str:
        if v not in KNOWN_EVALS:
            raise ValueError(f"unknown eval {v!r}; known: {sorted(KNOWN_EVALS)}")
        return v


class Numerics(_Section):
    """m3lab.numerics: non-finite outputs, determinism, teacher-forced parity and prefix-cache A/B."""

    enabled: bool = True
    lengths: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)  # [] → the needle lengths
    edges: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [127, 128, 129, 511, 512, 513])
    max_tokens: int = Field(8, gt=0, le=4096)
    repeats: int = Field(3, ge=2, le=100)  # each determinism probe alone, then once more in a concurrent batch
    batch: int = Field(4, ge=1, le=256)  # determinism / prefix-cache probes, sent together
    max_mean_abs_delta: float = Field(0.05, ge=0)  # teacher-forced parity: mean |Δ logprob| per probe, nats
    min_top1: float = Field(0.99, ge=0, le=1)  # teacher-forced parity: top-1 agreement per probe, counted where
    top1_margin: float = Field(0.5, ge=0)  # the reference's top-1 leads its runner-up by this many nats or more
    seed: int = 0
    request_timeout_s: float = Field(600.0, gt=0)


class Baseline(_Section):
    """What recoveries are measured against: the same evals on the unquantized checkpoint, item by item
    (m3lab.evals.paired). Exactly one source:

    checkpoint: download   the download stage's checkpoint, served by a second server of the same engine and
                           settings while the evals run (room for two servers: on a GPU, memory for both)
    profile: NAME          the newest run of another profile (e.g. a bf16 one) whose correctness stage ended ok
    """

    checkpoint: Literal["download"] | None = None
    profile: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

    @model_validator(mode="after")
    def _one_source(self) -> "Baseline":
        if (self.checkpoint is None) == (self.profile is None):
            raise ValueError("name exactly one baseline source: checkpoint: download, or profile: <name>")
        return self


class Correctness(_Section):
    max_tokens: int = Field(16, gt=0)
    prompts: list[Prompt] = Field(min_length=1)
    parity: Parity = Field(default_factory=Parity)
    evals: list[Eval] = Field(default_factory=list)
    chat: list[ChatCheck] = Field(default_factory=list)  # reasoning and tool-call checks (m3lab.correctness)
    baseline: Baseline | None = None  # None: recoveries are `not run (no baseline measured)`
    numerics: Numerics = Field(default_factory=Numerics)


class Needle(_Section):
    lengths: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)  # prompt tokens
    depths: list[float] = Field(min_length=1)  # where the key sits, % of the prompt
    max_tokens: int = Field(8, gt=0)  # "48213." fits in a few tokens; more only adds latency
    seed: int = 0
    request_timeout_s: float = Field(600.0, gt=0)

    @field_validator("depths")
    @classmethod
    def _depths_are_percentages(cls, v: list[float]) -> list[float]:
        bad = [d for d in v if not 0 <= d <= 100]
        if bad:
            raise ValueError(f"depths are percentages in [0, 100], got {bad}")
        return v


class Benchmark(_Section):
    """The benchmark's load (m3lab.benchmark). This is the only declaration of each setting and its default;
    the stage receives this section as it is."""

    concurrency: list[Annotated[int, Field(ge=1, le=4096)]] = Field(min_length=1, max_length=64)  # levels, in order
    num_prompts: int = Field(8, gt=0, le=100_000)  # timed requests per concurrency level
    input_len: int = Field(128, gt=0, le=1_048_576)  # prompt tokens (local tokenizer, without special tokens)
    output_len: int = Field(32, gt=0, le=1_048_576)  # max_tokens
    ignore_eos: bool = True  # ask for exactly output_len tokens, the engine's way (engines.*.force_output_len)
    temperature: float = Field(0.0, ge=0, le=2)  # 0: greedy
    seed: int = Field(0, ge=0, le=2**32 - 1)
    # Untimed requests before each level's timed part = warmup_factor × concurrency, sent at that concurrency so at
    # least one full batch has run (InferenceX: 2 × conc). 0: no warm-up.
    warmup_factor: int = Field(2, ge=0, le=16)
    request_timeout_s: float = Field(300.0, gt=0, le=86_400)  # one request, connect to last byte
    total_timeout_s: float = Field(3600.0, gt=0, le=7 * 86_400)  # the whole sweep, warm-ups too
    crosscheck_vllm_bench: bool = False  # also run `vllm bench serve` at each level; agree within ±10%, or disagree


class Plot(_Section):
    dpi: int = Field(110, gt=0)


class Tolerance(_Section):
    """Exactly one rule (see m3lab.claims)."""

    abs: float | None = Field(None, ge=0)
    rel: float | None = Field(None, ge=0)
    stderr: float | None = Field(None, gt=0)
    range: list[float] | None = Field(None, min_length=2, max_length=2)
    min: float | None = None
    max: float | None = None
    equals: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Tolerance":
        set_rules = [k for k, v in self.model_dump().items() if v is not None]
        if len(set_rules) != 1:
            raise ValueError(f"a tolerance has exactly one rule (abs, rel, stderr, range, min, max, equals); "
                             f"got {set_rules or 'none'}")
        return self

    def rule(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Claim(_Section):
    """A number a card states, the stage that measures it, and how close counts as reproduced."""

    id: str
    card: str
    metric: str
    claimed: float | bool | str | list[float]
    unit: str = ""
    baseline: float | None = None
    kind: Literal["value", "recovery"] = "value"
    stage: StageName
    measure: str  # dotted path into the stage's result.json (m3lab.claims.lookup)
    measure_stderr: str | None = None
    tolerance: Tolerance
    note: str = ""
    # How the card measured it, as the eval's own flags (e.g. a PPL's {--window-tokens: 2048, --stride: 2048}):
    # the eval that `measure` points into must run with exactly these, or the profile is refused.
    protocol: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _recovery_has_a_baseline(self) -> "Claim":
        # A recovery is judged on the paired record of the eval `measure` points into (m3lab.claims), never
        # on the card's baseline; the card's baseline is kept as what the card said.
        if self.kind == "recovery" and self.baseline is None:
            raise ValueError("a recovery claim states the card's baseline (what the card said it recovered from)")
        if self.kind == "recovery" and not self.measure.startswith("evals["):
            raise ValueError(f"measure {self.measure!r}: a recovery claim points into an eval's record "
                             f"(e.g. evals[id=gsm8k].score_pct), whose paired record m3lab judges")
        if self.tolerance.stderr is not None and not self.measure_stderr and self.kind != "recovery":
            raise ValueError("a stderr tolerance needs measure_stderr (where the stage reports the stderr)")
        return self


class Params(_Section):
    profile: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # a folder name under results/
    description: str = ""
    extends: list[str] | str | None = None  # consumed by the loader; kept for `m3lab show`
    hardware: Hardware = Field(default_factory=Hardware)
    model: Model
    download: Download = Field(default_factory=Download)
    quantize: Quantize = Field(default_factory=Quantize)
    serve: Serve = Field(default_factory=Serve)
    correctness: Correctness
    needle: Needle
    benchmark: Benchmark
    plot: Plot = Field(default_factory=Plot)
    card: Card | None = None
    claims: list[Claim] = Field(default_factory=list)
    plan_only: bool = False  # hardware nobody here has: `m3lab plan` only (`m3lab run` refuses)

    @model_validator(mode="after")
    def _parallelism_fits_the_hardware(self) -> "Params":
        if self.serve.engine != "vllm":
            return self
        tp = int(self.serve.args.get("--tensor-parallel-size") or 1)
        pp = int(self.serve.args.get("--pipeline-parallel-size") or 1)
        have = max(self.hardware.gpus, 1) * self.hardware.nodes
        if tp * pp > have:
            raise ValueError(f"serve.args: --tensor-parallel-size {tp} × --pipeline-parallel-size {pp} needs "
                             f"{tp * pp} GPUs; the profile declares hardware.gpus {self.hardware.gpus} × "
                             f"hardware.nodes {self.hardware.nodes} = {have}")
        if self.hardware.nodes > 1 and self.serve.args.get("--distributed-executor-backend") != "ray":
            raise ValueError("serve.args: hardware.nodes > 1 needs '--distributed-executor-backend: ray' "
                             "(vLLM spans hosts only with the Ray executor)")
        return self

    @model_validator(mode="after")
    def _lengths_fit_the_model(self) -> "Params":
        fits = [n for n in self.needle.lengths if n + self.needle.max_tokens <= self.model.max_model_len]
        if not fits:
            raise ValueError(f"needle.lengths {self.needle.lengths}: none fits model.max_model_len "
                             f"{self.model.max_model_len} with max_tokens {self.needle.max_tokens}")
        need = self.benchmark.input_len + self.benchmark.output_len
        if need > self.model.max_model_len:
            raise ValueError(f"benchmark: input_len {self.benchmark.input_len} + output_len "
                             f"{self.benchmark.output_len} = {need} exceeds model.max_model_len "
                             f"{self.model.max_model_len}")
        return self

    @model_validator(mode="after")
    def _baseline_can_be_served(self) -> "Params":
        base = self.correctness.baseline
        if base is None:
            return self
        if base.checkpoint is not None:
            if self.quantize.recipe == "none":
                raise ValueError("correctness.baseline.checkpoint: download is the checkpoint this profile "
                                 "serves (quantize.recipe none): a recovery against itself measures nothing")
        if base.profile == self.profile:
            raise ValueError(f"correctness.baseline.profile: {base.profile!r} is this profile")
        if base.profile is not None and not (PARAMS_DIR / f"{base.profile}.yaml").is_file():
            raise ValueError(f"correctness.baseline.profile: no profile {base.profile!r} in {PARAMS_DIR}")
        return self

    @model_validator(mode="after")
    def _claims_are_measured_the_cards_way(self) -> "Params":
        evals = {e.id: e for e in self.correctness.evals}
        for c in self.claims:
            if not c.protocol:
                continue
            m = re.match(r"evals\[id=([^\],]+)\]", c.measure)
            if c.stage != "correctness" or not m or m[1] not in evals:
                raise ValueError(f"claims[{c.id}].protocol: its measure {c.measure!r} names no eval of this profile")
            args = evals[m[1]].args
            for flag, want in c.protocol.items():
                if args.get(flag) != want:
                    raise ValueError(f"claims[{c.id}].protocol: the card measured with {flag} {want!r}, but "
                                     f"correctness.evals[{m[1]}].args has {flag} {args.get(flag)!r}")
        return self

    @model_validator(mode="after")
    def _claim_ids_are_unique(self) -> "Params":
        seen: set[str] = set()
        for c in self.claims:
            if c.id in seen:
                raise ValueError(f"claims: id {c.id!r} appears twice")
            seen.add(c.id)
        return self


# --------------------------------------------------------------------------------------------------------------
# Loading: extends + deep merge, with the origin of every key kept for error messages.


def resolve_profile_path(profile: str | Path | None) -> Path:
    """`cpu-tiny`, `params/cpu-tiny.yaml` or any path → an existing file (None → the embedded default)."""
    if profile is None:
        profile = DEFAULT_PROFILE
    p = Path(profile)
    candidates = [p] if p.suffix in (".yaml", ".yml") else [p, PARAMS_DIR / f"{profile}.yaml"]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    known = ", ".join(sorted(x.stem for x in PARAMS_DIR.glob("*.yaml")))
    raise ParamsError(f"{profile}: no such params file (known profiles in {PARAMS_DIR}: {known})")


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML mapping that says a key twice is an error (PyYAML keeps the last silently: a duplicated `host`
    could flip a loopback bind to 0.0.0.0 unnoticed)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ParamsError(f"{_display(path)}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ParamsError(f"{_display(path)}: cannot read it: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ParamsError(f"{_display(path)}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{_display(path)}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, over: dict, origins: dict, over_file: str, prefix: tuple = (),
                over_origins: dict | None = None) -> dict:
    """`over` merged onto `base`; `origins` (key path -> file) follows: a key `over` sets comes from `over_file`, or,
    when `over` is itself a merge of several files, from the file `over_origins` names for it."""
    out = dict(base)
    for k, v in over.items():
        path = prefix + (k,)
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v, origins, over_file, path, over_origins)
        else:
            out[k] = v
            # A replaced subtree: every key under it now comes from the file(s) that set it in `over`.
            for p in [p for p in origins if p[: len(path)] == path]:
                del origins[p]
            if over_origins is None:
                origins[path] = over_file
            else:
                origins[path] = _enclosing(over_origins, path, over_file)
                origins.update({p: f for p, f in over_origins.items() if p[: len(path)] == path})
    return out


def _extends_path(path: Path, base: str) -> Path:
    """Where an `extends:` entry points: next to the file that names it, else under params/ (`cards/000.yaml`,
    `hardware/h200x8.yaml`, `cpu-tiny`), else relative to the working directory (as profile names are)."""
    tried = [path.parent / base, PARAMS_DIR / base]
    if Path(base).suffix not in (".yaml", ".yml"):
        tried.append(PARAMS_DIR / f"{base}.yaml")
    tried.append(Path(base))
    for c in tried:
        if c.is_file():
            return c.resolve()
    looked = ", ".join(dict.fromkeys(_display(c) for c in tried))
    raise ParamsError(f"{_display(path)}: extends: no such params file {base!r} (looked for {looked}); fix the "
                      f"name in {_display(path)} or add the file")


def _load_merged(path: Path, origins: dict, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """`path` merged over what it extends: each `extends:` entry in order (left to right, later wins), then the
    file's own keys. `origins` gets the file that set each key path."""
    if path in chain:
        cycle = " -> ".join(_display(p) for p in chain + (path,))
        raise ParamsError(f"{_display(chain[-1])}: extends: cycle {cycle}; remove one of these extends entries")
    data = _read_yaml(path)
    bases = data.get("extends") or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list):
        raise ParamsError(f"{_display(path)}: extends: expected a file name or a list of them, got {bases!r}")
    for i, base in enumerate(bases):
        if not isinstance(base, str) or not base:
            raise ParamsError(f"{_display(path)}: extends.{i}: expected a file name (e.g. cards/000.yaml), got "
                              f"{base!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = _extends_path(path, base)
        base_origins: dict[tuple, str] = {}
        base_data = _load_merged(base_path, base_origins, chain + (path,))
        merged = _deep_merge(merged, base_data, origins, _display(base_path), over_origins=base_origins)
    return _deep_merge(merged, data, origins, _display(path))


_EXPECTED = {
    "int": "int",
    "float": "float",
    "bool": "bool",
    "string": "str",
    "list": "list",
    "dict": "mapping",
    "model": "mapping",
}


def _explain(err: dict[str, Any]) -> str:
    kind: str = err["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "key_error":
        return err["msg"]
    for prefix, name in _EXPECTED.items():
        if kind.startswith(prefix + "_") and ("type" in kind or "parsing" in kind):
            return f"expected {name}, got {err.get('input')!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{msg}, got {err.get('input')!r}" if kind != "value_error" else msg


def _enclosing(origins: dict, loc: tuple, default: str) -> str:
    """The file that set `loc` itself or the nearest mapping around it."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in origins:
            return origins[loc[:n]]
    return default


def _origin(origins: dict, loc: tuple, default: str) -> str:
    """The file an error at `loc` is blamed on: for a mapping several files wrote into (a section-level check), the
    file that wrote into it last (the override); otherwise the one that set `loc` or the mapping around it."""
    under = [f for p, f in origins.items() if p[: len(loc)] == loc and len(p) > len(loc)]
    if loc and under:
        return under[-1]
    return _enclosing(origins, loc, default)


# Token shapes: Hugging Face (hf_…), OpenAI-style (sk-…), GitHub (ghp_/github_pat_…). A params file is data that
# lands in params.json, notebooks and HTML; a secret belongs in the environment (download.token_env names it).
_SECRET = re.compile(r"(?<![A-Za-z0-9])(hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|ghp_[A-Za-z0-9]{30,}|"
                     r"github_pat_[A-Za-z0-9_]{30,})")


def _refuse_secrets(node: Any, origins: dict, path: Path, loc: tuple = ()) -> None:
    """A token-shaped value anywhere is an error that names the key, never the value."""
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_secrets(v, origins, path, loc + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_secrets(v, origins, path, loc + (i,))
    elif isinstance(node, str) and _SECRET.search(node):
        where = _origin(origins, loc, _display(path))
        raise ParamsError(f"{where}: {'.'.join(map(str, loc))}: looks like an access token; secrets never go in "
                          f"params (they would land in params.json, notebooks and HTML): put it in the "
                          f"environment and name the variable in download.token_env")


def load_params(profile: str | Path | None = None) -> Params:
    """Read, merge and validate a profile. Raises ParamsError naming the file and the key path."""
    path = resolve_profile_path(profile)
    origins: dict[tuple, str] = {}
    merged = _load_merged(path, origins)
    merged.setdefault("profile", path.stem)
    _refuse_secrets(merged, origins, path)
    try:
        return Params.model_validate(merged)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key_path = tuple(err["loc"]) + ((err["ctx"]["key"],) if err["type"] == "key_error" else ())
            loc = tuple(str(x) for x in key_path)
            where = _origin(origins, key_path, _display(path))
            lines.append(f"{where}: {'.'.join(loc) + ': ' if loc else ''}{_explain(err)}")
        raise ParamsError("\n".join(lines)) from None


def params_hash(obj: Any) -> str:
    """sha256 of a canonical JSON form: the same params always hash the same, key order aside."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
