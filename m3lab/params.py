"""Params: one YAML file per hardware/recipe, layered with `extends:`, validated by a schema.

The story of a params file:
  1. read `params/<profile>.yaml`; if it `extends:` other files, read those first (recursively),
  2. deep-merge base under profile (mappings merge key by key; lists and scalars are replaced),
     remembering which file set each key, so an error can name the file a bad value came from,
  3. validate the merged mapping against `Params` (pydantic, unknown keys forbidden),
  4. hand each stage only the sections it declares (see `m3lab.dag.STAGES`).

papermill's own `-f` merge is shallow, which is why the merge lives here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


# --------------------------------------------------------------------------------------------------------------
# Schema. Every section forbids unknown keys: a typo must fail loudly, not be silently ignored.


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hardware(_Section):
    name: str = "cpu"
    accelerator: Literal["none", "nvidia", "amd", "apple"] = "none"
    gpus: int = Field(0, ge=0)
    gpu_memory_gib: float = Field(0.0, ge=0)


class Model(_Section):
    # `embedded`: m3lab builds the tiny M3 and publishes it on a local Hub-compatible server;
    # `hub`: a real repo on the Hugging Face Hub (or any endpoint).
    source: Literal["embedded", "hub"] = "embedded"
    repo_id: str
    revision: str
    max_model_len: int = Field(4096, gt=0)
    # source=embedded only: TinySpec fields to override (e.g. head_dim: 128 for vLLM's Hopper kernels), and the seed.
    embedded: dict[str, int | float | str | list[str]] = Field(default_factory=dict)
    seed: int = 0


class Download(_Section):
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None
    endpoint: str | None = None  # None: the embedded hub for source=embedded, else the real Hub / $HF_ENDPOINT
    token_env: str = "HF_TOKEN"  # name of the env var holding the token; the token itself never enters params
    local_dir: str | None = None  # None: results/.cache/models/<repo_id>/<revision>
    min_free_gb: float = Field(0.0, ge=0)


class Quantize(_Section):
    recipe: Literal["none", "fp8_dynamic"] = "none"
    ignore: list[str] | None = None  # None: the recipe's defaults (lm_head, vision, projector, gates, indexer)
    verify: bool = True  # reload + generate on CPU after quantizing; turn off where the model cannot fit in RAM


class Serve(_Section):
    engine: Literal["transformers", "vllm"] = "transformers"
    engine_version: str | None = None  # pin: a different installed version is an error before anything starts
    text_only: bool = False  # serve the language model alone (vLLM's MiniMaxM3SparseForCausalLM layout)
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535)  # None: a free port
    served_model_name: str = "m3"
    startup_timeout_s: float = Field(600.0, gt=0)
    # Engine flags exactly as on the command line: {"--tensor-parallel-size": 8, "--enforce-eager": true}.
    args: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("args")
    @classmethod
    def _flags_are_flags(cls, v: dict[str, Any]) -> dict[str, Any]:
        for flag in v:
            if not flag.startswith("--"):
                raise ValueError(f"engine flag {flag!r} must be written as on the command line, e.g. '--{flag}'")
        return v


class Prompt(_Section):
    id: str
    prompt: str
    expect: list[str] = Field(min_length=1)  # every substring must appear in the greedy continuation
    lang: str = "en"


class Parity(_Section):
    enabled: bool = True
    prompts: list[str] = Field(default_factory=list)
    max_tokens: int = Field(16, gt=0)
    min_match_rate: float = Field(1.0, ge=0, le=1)


class Correctness(_Section):
    max_tokens: int = Field(16, gt=0)
    prompts: list[Prompt] = Field(min_length=1)
    parity: Parity = Field(default_factory=Parity)


class Needle(_Section):
    lengths: list[int] = Field(min_length=1)
    depths: list[float] = Field(min_length=1)
    max_tokens: int = Field(8, gt=0)
    seed: int = 0

    @field_validator("depths")
    @classmethod
    def _depths_are_percentages(cls, v: list[float]) -> list[float]:
        bad = [d for d in v if not 0 <= d <= 100]
        if bad:
            raise ValueError(f"depths are percentages in [0, 100], got {bad}")
        return v


class Benchmark(_Section):
    concurrency: list[int] = Field(min_length=1)
    num_prompts: int = Field(8, gt=0)
    input_len: int = Field(128, gt=0)
    output_len: int = Field(32, gt=0)
    ignore_eos: bool = True
    seed: int = 0
    request_timeout_s: float = Field(300.0, gt=0)


class Plot(_Section):
    dpi: int = Field(110, gt=0)


class Params(_Section):
    profile: str
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


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{_display(path)}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{_display(path)}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, over: dict, origins: dict, over_file: str, prefix: tuple = ()) -> dict:
    out = dict(base)
    for k, v in over.items():
        path = prefix + (k,)
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v, origins, over_file, path)
        else:
            out[k] = v
            # A replaced subtree: every key under it now comes from this file.
            for p in [p for p in origins if p[: len(path)] == path]:
                del origins[p]
            origins[path] = over_file
    return out


def _load_merged(path: Path, origins: dict, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in chain:
        cycle = " -> ".join(_display(p) for p in chain + (path,))
        raise ParamsError(f"{_display(path)}: extends: cycle {cycle}")
    data = _read_yaml(path)
    bases = data.get("extends") or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ParamsError(f"{_display(path)}: extends: expected a file name or a list of them, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = (path.parent / base) if (path.parent / base).is_file() else None
        if base_path is None:
            try:
                base_path = resolve_profile_path(base)
            except ParamsError:
                raise ParamsError(f"{_display(path)}: extends: no such params file {base!r}") from None
        merged = _deep_merge(merged, _load_merged(base_path, origins, chain + (path,)), origins, _display(base_path))
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
    for prefix, name in _EXPECTED.items():
        if kind.startswith(prefix + "_") and ("type" in kind or "parsing" in kind):
            return f"expected {name}, got {err.get('input')!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{msg}, got {err.get('input')!r}" if kind != "value_error" else msg


def _origin(origins: dict, loc: tuple, default: str) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in origins:
            return origins[loc[:n]]
    return default


def load_params(profile: str | Path | None = None) -> Params:
    """Read, merge and validate a profile. Raises ParamsError naming the file and the key path."""
    path = resolve_profile_path(profile)
    origins: dict[tuple, str] = {}
    merged = _load_merged(path, origins)
    merged.setdefault("profile", path.stem)
    try:
        return Params.model_validate(merged)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(str(x) for x in err["loc"])
            where = _origin(origins, tuple(err["loc"]), _display(path))
            lines.append(f"{where}: {'.'.join(loc)}: {_explain(err)}")
        raise ParamsError("\n".join(lines)) from None


def params_hash(obj: Any) -> str:
    """sha256 of a canonical JSON form: the same params always hash the same, key order aside."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
