"""The workbook's vocabularies, declared once: stages, engines, quantization recipes, eval runners and faults.

Every other place that needs one of these names reads it from here: the params schema (an unknown name is an
error that lists the registered ones), `m3lab stages`, `m3lab plan`, the DAG runner, the notebooks' generator and
the report. Each entry names the module that implements it; adding an engine or a recipe is one new module plus
one line below.

This module imports nothing from m3lab, so anything may import it. The entries' modules are checked to exist
when it is imported (without importing them: they may need heavy libraries), so a typo here fails at once and
names the module.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

__all__ = ["RegistryError", "Entry", "Registry", "StageSpec", "STAGES", "ENGINES", "RECIPES", "EVAL_RUNNERS",
           "FAULTS", "stage_names"]


class RegistryError(ValueError):
    """An unknown name, or an entry whose module does not exist."""


_PACKAGE_DIR = Path(__file__).resolve().parent


def _module_exists(module: str) -> bool:
    """Looked up on disk, not imported: a package's __init__ may itself import this registry."""
    parts = module.split(".")
    if parts[0] == "m3lab":
        base = _PACKAGE_DIR.joinpath(*parts[1:])
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class Entry:
    name: str
    module: str  # the implementing module, e.g. "m3lab.engines.vllm"
    summary: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


class Registry:
    """Named entries of one kind ("engine", "recipe", …), in declaration order."""

    def __init__(self, kind: str, key: str, entries: list[Entry]) -> None:
        self.kind, self.key = kind, key  # key: where profiles name it, e.g. "serve.engine"
        self._entries = {e.name: e for e in entries}
        if len(self._entries) != len(entries):
            raise RegistryError(f"{kind} registry: a name appears twice")
        for e in entries:
            if not _module_exists(e.module):
                raise RegistryError(f"{kind} {e.name!r}: its module {e.module} does not exist (m3lab/registry.py)")

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise RegistryError(f"{self.key}: unknown {self.kind} {name!r}; registered: {', '.join(self._entries)}")
        return self._entries[name]

    def check(self, name: str) -> str:
        """Validator for params fields: the name, or an error listing the registered names (the params loader
        prefixes the file and key)."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self._entries)}")
        return name

    def load(self, name: str) -> ModuleType:
        return importlib.import_module(self.get(name).module)


# --------------------------------------------------------------------------------------------------------------
# The DAG's nodes. `sections`: the params sections a stage reads (its slice). `plugins`: where its params pick a
# registered implementation, so the stage's fingerprint covers that module's code too.


@dataclass(frozen=True)
class StageSpec:
    name: str
    notebook: str  # notebooks/<notebook>
    module: str  # the stage's glue module
    sections: tuple[str, ...]
    deps: tuple[str, ...] = ()
    needs_server: bool = False
    soft_deps: bool = False  # runs even if a dep failed (the plot shows what there is)
    plugins: tuple[tuple[str, str], ...] = ()  # (registry kind, params path), e.g. ("engine", "serve.engine")
    summary: str = ""

    def slice(self, params: dict[str, Any]) -> dict[str, Any]:
        """The params this stage reads (and is fingerprinted by): whole sections, or one key of a section
        written `section.key`."""
        out: dict[str, Any] = {}
        for s in self.sections:
            top, _, key = s.partition(".")
            if key:
                out.setdefault(top, {})[key] = params[top][key]
            else:
                out[top] = params[top]
        return out


_STAGES = [
    StageSpec("download", "01_download.ipynb", "m3lab.download", ("model", "download"),
              summary="fetch the checkpoint at a pinned revision (the embedded model from m3lab's local Hub)"),
    StageSpec("quantize", "02_quantize.ipynb", "m3lab.quantize", ("quantize",), deps=("download",),
              plugins=(("recipe", "quantize.recipe"),),
              summary="apply the card's recipe, or take the card's published checkpoint; report what is on disk"),
    StageSpec("serve", "03_serve.ipynb", "m3lab.serve", ("serve", "hardware", "model"), deps=("quantize",),
              plugins=(("engine", "serve.engine"), ("fault", "serve.fault")),
              summary="start the engine's OpenAI-compatible server on 127.0.0.1 and wait for health"),
    # correctness also reads the needle lengths (the numerics checks probe the lengths the needle stage sends)
    # and the serve settings (a baseline checkpoint gets a second server with the same ones).
    StageSpec("correctness", "04_correctness.ipynb", "m3lab.correctness", ("correctness", "needle.lengths", "serve"),
              deps=("serve",),
              needs_server=True, plugins=(("eval runner", "correctness.evals[].runner"),),
              summary="prompt suite, serving parity against offline greedy, accuracy evals"),
    StageSpec("needle", "05_needle.ipynb", "m3lab.needle", ("needle", "model"), deps=("serve",), needs_server=True,
              summary="pass-key retrieval over a length × depth grid"),
    StageSpec("benchmark", "06_benchmark.ipynb", "m3lab.benchmark", ("benchmark",), deps=("serve",),
              needs_server=True, summary="streaming load at each concurrency level, vLLM's metric names"),
    StageSpec("plot", "07_plot.ipynb", "m3lab.plot", ("plot", "claims"), deps=("correctness", "needle", "benchmark"),
              soft_deps=True, summary="figures and the claims ledger's verdicts"),
]
STAGES: dict[str, StageSpec] = {s.name: s for s in _STAGES}


def stage_names() -> tuple[str, ...]:
    return tuple(STAGES)


for _s in _STAGES:
    if not _module_exists(_s.module):
        raise RegistryError(f"stage {_s.name!r}: its module {_s.module} does not exist (m3lab/registry.py)")


# --------------------------------------------------------------------------------------------------------------
# Engines: how a server is started (m3lab.engines.<name>: `command`, `executable`, `package`, …).

ENGINES = Registry("engine", "serve.engine", [
    # What each engine's server can return (m3lab.numerics reads it): logprobs of generated tokens, vLLM's
    # prompt_logprobs, and whether it has a prefix cache.
    Entry("transformers", "m3lab.engines.transformers", "`transformers serve` on CPU (the embedded default)"),
    Entry("vllm", "m3lab.engines.vllm", "`vllm serve` on GPUs (the cards' engine)",
          {"logprobs": True, "prompt_logprobs": True, "prefix_cache": True}),
    Entry("mlx", "m3lab.engines.mlx", "`mlx_lm.server` on Apple silicon (card 003's oMLX stand-in)",
          {"logprobs": True}),
    Entry("reference", "m3lab.engines.reference", "m3lab's reference server: transformers forward passes behind "
          "/v1/completions with vLLM's prompt_logprobs, for CPU fidelity checks",
          {"logprobs": True, "prompt_logprobs": True}),
])

# Quantization recipes (m3lab.quant.<name>: `quantize(src, tmp, options)`). `implemented: False` is a recipe
# m3lab plans (prints its command) but cannot run yet; `model.use: reproduce` with it stops with a clear error.
RECIPES = Registry("recipe", "quantize.recipe", [
    Entry("none", "m3lab.quant.none", "pass-through: serve the download as it is",
          {"implemented": True, "tool": None, "options": None}),
    Entry("fp8_dynamic", "m3lab.quant.fp8_dynamic", "llm-compressor FP8_DYNAMIC (card 000)",
          {"implemented": True, "tool": "llm-compressor", "options": None}),
    Entry("mxfp4", "m3lab.quant.mxfp4", "AMD Quark OCP MXFP4 (card 001)",
          {"implemented": False, "tool": "amd-quark", "options": "quark"}),
    Entry("autoround", "m3lab.quant.autoround", "Intel AutoRound mixed 2/3/4/8-bit (card 002)",
          {"implemented": False, "tool": "auto-round", "options": "autoround"}),
    Entry("mlx_q4", "m3lab.quant.mlx_q4", "MLX affine 4-bit with 8-bit sensitive layers (card 003)",
          {"implemented": False, "tool": "mlx-lm", "options": "mlx"}),
])

# Eval runners (m3lab.evals.<name>): what the correctness stage runs for each entry of `correctness.evals`.
EVAL_RUNNERS = Registry("eval runner", "correctness.evals[].runner", [
    Entry("lm_eval", "m3lab.evals.lm_eval", "lm-evaluation-harness against the served endpoint",
          {"implemented": True}),
    Entry("lighteval", "m3lab.evals.lighteval", "lighteval through LiteLLM (card 000): command planned",
          {"implemented": False}),
    Entry("prompt_logprobs_ppl", "m3lab.evals.ppl", "token-level perplexity from the server's prompt_logprobs",
          {"implemented": True}),
])

# Planted faults (m3lab.faults.<name>: `apply(model_dir) -> int`): for fault-injection tests only.
FAULTS = Registry("fault", "serve.fault", [
    Entry("none", "m3lab.faults.none", "serve the checkpoint as it is"),
    Entry("zero_shared_experts", "m3lab.faults.zero_shared_experts",
          "every MoE layer's shared expert loads as zeros (card 002's silent failure)"),
    Entry("wrong_rope_theta", "m3lab.faults.wrong_rope_theta",
          "RoPE base 10,000 instead of 5,000,000 (a loader that ignores rope_parameters)"),
    Entry("nan_routed_expert", "m3lab.faults.nan_routed_expert",
          "one routed expert of the first MoE layer holds NaN (NaN logits from some position on, as vLLM 0.25.1's "
          "M3 sparse path returned)"),
])

REGISTRIES: dict[str, Registry] = {r.kind: r for r in (ENGINES, RECIPES, EVAL_RUNNERS, FAULTS)}
