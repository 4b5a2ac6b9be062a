"""Quantization: turn the downloaded checkpoint into the one we serve, and say honestly what it is.

The recipes are modules of `m3lab.quant` registered in `m3lab.registry.RECIPES`, each with
`quantize(src, tmp, recipe) -> (seconds, dropped_keys, notes)` writing into a temp folder, and
`plan_lines(section) -> list[str]` for `m3lab plan`:

    none         →  pass-through: <out_dir> is a folder of symlinks to the download (no copy of GBs)
    fp8_dynamic  →  llm-compressor `oneshot` + QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC"),
                    saved as compressed-tensors, then renamed back to the upstream hub layout
    mxfp4, autoround, mlx_q4  →  planned: their modules print the card's command and refuse to run

This module holds what every recipe shares: the entry point `quantize` (temp folder, checks, atomic rename),
the hub-layout rewrite after transformers' save, and the quant report. What is *on disk* (size, formats per module,
bits per weight, what is left unquantized, the checkpoint half of the shared-expert check) is measured by
`m3lab.quant.inspector`, the one implementation behind `m3lab inspect DIR` too; this module adds what needs
transformers: reloading the output and comparing what loaded with what is stored.

The story of an fp8_dynamic run (everything happens in a hidden temp folder next to <out_dir>, renamed into place
only at the very end, so a crash never leaves a half-written checkpoint that looks complete):
  1. load the download with transformers (native module names: `model.language_model.layers.N.mlp...`),
  2. `oneshot`: llm-compressor 0.14 first *linearizes* M3's routed experts (`MiniMaxM3VLExperts` keeps them as
     3D nn.Parameters; its generic `linearize_moe` turns every expert into gate/up/down nn.Linear, because the
     class carries transformers' `@use_experts_implementation`), so the routed experts ARE quantized to FP8,
  3. `save_pretrained` writes transformers' reverse mapping of the native names, which is not the hub layout:
     every `.mlp.` becomes `.block_sparse_moe.` (dense layers and the vision tower too) and the linearized
     experts come out as `experts.E.{gate,up,down}_proj`. We rename the keys back (`w1/w3/w2`, `mlp` on dense
     and vision), keeping `weight_scale` with its weight, and restore the download's own config.json plus
     `quantization_config` whose `ignore` is the recipe's patterns (written to match both spellings),
  4. verify: every key of the download is in the output (plus only quantization tensors), the ignore list agrees
     with what is stored, and the output reloads in transformers on CPU and generates,
  5. inspect it (`m3lab.quant.inspector.inspect`), check every MoE layer's shared expert in the files and in the
     reloaded model, write `quant_report.json` (see `QuantReport`) and rename the folder into place. A missing
     or zeroed shared expert fails the stage (`QuantizeError`, naming the layers).

CPU facts (transformers 5.17, compressed-tensors 0.19), measured on the tiny model:
  * `from_pretrained` on the FP8 output works on CPU. By default (`dequantize=False`) Linear weights stay FP8
    until the first forward, where compressed-tensors decompresses them to bf16; `CompressedTensorsConfig(
    dequantize=True)` (the old `run_compressed=False`) decompresses at load. Both give identical logits. Linear
    inputs are still fake-quantized to FP8 per token (QDQ), so attention/shared-expert matmuls emulate W8A8.
  * Routed experts are dequantized to bf16 *at load* (transformers' `DecompressExperts` runs before merging
    w1/w3 into the 3D `gate_up_proj`), and run in bf16 with unquantized inputs: not what vLLM computes.
  * llm-compressor's linearized experts cannot run a forward on M3 (`LinearExperts2D` has no `swiglu_alpha`
    for M3's `_apply_gate`): data-free FP8_DYNAMIC is fine; calibration recipes (GPTQ/AWQ...) would crash.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from m3lab.params import Quantize
from m3lab.quant import inspector
from m3lab.registry import RECIPES

__all__ = [
    "DEFAULT_IGNORE",
    "REPORT_NAME",
    "QuantizeError",
    "QuantRecipe",
    "SharedExpertCheck",
    "QuantReport",
    "QuantResult",
    "quantize",
    "quant_report",
    "check_shared_experts",
    "load_for_check",
    "saved_to_hub_key",
]

REPORT_NAME = inspector.REPORT_NAME  # quant_report.json, written into the output folder

# The FP8 card's exclusions. Each pattern must match two spellings of the same module: transformers' native
# names (what llm-compressor matches while quantizing, and what transformers matches when it reloads) and the
# hub names (what is stored, and what vLLM matches). Exact names only match exactly in compressed-tensors, so
# everything is a `re:` pattern (anchored at the start by `re.match`).
DEFAULT_IGNORE = [
    r"re:.*lm_head$",  # native `lm_head`, hub `language_model.lm_head`
    r"re:.*vision_tower.*",  # vision tower (both spellings contain `vision_tower`)
    r"re:.*multi_modal_projector.*",  # projector; native also holds the patch merge MLP (`merge_linear_*`)
    r"re:.*patch_merge_mlp.*",  # hub spelling of the patch merge MLP
    r"re:.*(block_sparse_moe|mlp)\.gate$",  # router gates: hub `block_sparse_moe.gate`, native `mlp.gate`
    r"re:.*self_attn\.index(_|er\.).*",  # indexer: hub `self_attn.index_q_proj`, native `self_attn.indexer.q_proj`
]

# Tensors that travel with a quantized weight `X.weight` (compressed-tensors names); `X.weight_packed` replaces
# `X.weight` in packed formats (int4, mxfp4), with the logical shape in `X.weight_shape`.
_QUANT_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_global_scale", "weight_g_idx", "weight_shape",
                   "weight_packed")
_QUANT_RE = re.compile(r"^(.*)\.(" + "|".join(_QUANT_SUFFIXES) + r")$")

# Non-Linear modules with a 2D+ weight: never an FP8 target, so absent from `ignore` on purpose.
_NOT_LINEAR_RE = re.compile(r"(^|\.)(embed_tokens|patch_embedding)$")
NOTE_EXAMPLES = 5  # how many keys a note quotes


class QuantizeError(RuntimeError):
    """Quantization produced something unusable; the message names the file, key or module."""


# --------------------------------------------------------------------------------------------------------------
# Recipe and results


@dataclass
class QuantRecipe:
    """What to do: the params section `quantize` (m3lab.params.Quantize, the only declaration of `recipe`,
    `ignore` and `verify` and their defaults), plus where the output goes. Build it with `from_params`.
    `ignore=None` means the recipe's defaults (`DEFAULT_IGNORE` for fp8_dynamic)."""

    recipe: str
    ignore: list[str] | None  # compressed-tensors targets to leave in bf16 ("re:" prefix = regex)
    verify: bool  # reload on CPU + generate + shared-expert reload check; False if it cannot fit in RAM
    # The recipe's own options section (quantize.quark / .autoround / .mlx, per RECIPES meta "options"), as a
    # dict; None for recipes without one.
    options: dict[str, Any] | None = None
    out_dir: str | None = None  # where the output goes; None: "<src_dir>.<recipe>" next to the download
    max_shard_size: str = "5GB"  # bounds memory when shards are rewritten with hub names

    @classmethod
    def from_params(cls, section: Quantize | dict[str, Any] | str, **runtime: Any) -> QuantRecipe:
        """From the params section (or its dict, or just a recipe name with the section's defaults)."""
        if isinstance(section, str):
            section = {"recipe": section}
        try:
            q = section if isinstance(section, Quantize) else Quantize.model_validate(section)
        except ValidationError as e:
            raise ValueError("; ".join(f"{'.'.join(('quantize',) + tuple(map(str, err['loc'])))}: "
                                       f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())) from None
        need = RECIPES.get(q.recipe).meta.get("options")
        options = getattr(q, need).model_dump() if need else None
        return cls(recipe=q.recipe, ignore=q.ignore, verify=q.verify, options=options, **runtime)

    def __post_init__(self) -> None:
        entry = RECIPES.get(self.recipe)  # an unknown name lists the registered ones
        if not entry.meta["implemented"]:
            runnable = ", ".join(e.name for e in RECIPES if e.meta["implemented"])
            raise ValueError(f"quantize.recipe: {self.recipe!r} ({entry.summary}) is planned, not implemented yet; "
                             f"runnable: {runnable}")
        if self.ignore is None:
            self.ignore = list(DEFAULT_IGNORE) if self.recipe != "none" else []
        bad = [p for p in self.ignore if not isinstance(p, str) or not p]
        if bad:
            raise ValueError(f"QuantRecipe.ignore: every entry must be a non-empty string, got {bad!r}")

    @property
    def scheme(self) -> str | None:
        return getattr(RECIPES.load(self.recipe), "SCHEME", None)


@dataclass
class SharedExpertCheck:
    """Every MoE layer's shared expert is in the checkpoint, of the expected shape, nonzero, and (when reloaded)
    loaded as stored.

    The AutoRound card's silent failure: the shared experts loaded as zeros and nothing complained. Two halves:
    the checkpoint half is `m3lab.quant.inspector`'s check (MoE layers from whichever config fields exist, every
    stored format dequantized); the reload half loads the folder in transformers and compares each loaded shared
    expert with the stored one, which catches a loader that builds zeros from a good checkpoint. Per-layer detail
    (module names, formats, shapes) is in the stage result's `inspect.shared_expert_check.layers`."""

    passed: bool
    n_shared: int  # shared experts per MoE layer the config asks for (0: nothing to check)
    moe_layers: list[int]
    sources: list[str]  # the config fields the MoE layers came from
    checkpoint_passed: bool  # the inspector's half
    reloaded: bool  # whether the transformers-reload half ran (False: checkpoint half only)
    failing_layers: list[int]
    failures: list[str]  # one line per problem, each naming the layer and the tensor
    notes: list[str]


@dataclass
class QuantReport:
    """What is on disk, as `m3lab.quant.inspector.inspect` measures it (its module docstring has the details):

    * weight tensor: the matrix of a Linear / Embedding / conv module, or a stacked 3D expert parameter, in any
      stored format (bf16, scaled FP8, GPTQ/AutoRound `qweight`, Quark MXFP4, MLX U32, compressed-tensors packed),
      including the routed experts and lm_head. Norms, biases and buffers are not weights.
    * weight_params: the number of logical parameters of all weight tensors (the shape before any packing).
    * weight_stored_bytes: the bytes those tensors take on disk, *plus* their quantization tensors (scales, zero
      points, g_idx, MLX biases, global scales).
    * bits_per_weight = 8 * weight_stored_bytes / weight_params. A bf16 checkpoint gives exactly 16.0; FP8 with one
      bf16 scale per output channel gives 8 + 16/in_features on a quantized matrix, so > 8 overall.
    * size_bytes: the sum of the sizes of every file of the checkpoint folder (symlinks followed), except this
      report itself.
    * formats: modules per stored format, e.g. {"fp8_e4m3 channel": n, "bf16": m}; `activations` says how the
      config quantizes their inputs ("dynamic" for FP8_DYNAMIC; None when the config does not say).
    * excluded_modules: the weight modules stored in high precision while others are quantized (none when
      nothing is quantized); `ignore` is the recipe's patterns that produced them.
    """

    recipe: str
    scheme: str | None
    model_dir: str
    size_bytes: int
    safetensors_bytes: int
    files: int
    quant_method: str | None
    activations: str | None
    weight_params: int
    weight_stored_bytes: int
    bits_per_weight: float
    formats: dict[str, int]
    routed_expert_formats: dict[str, int]  # the routed experts only
    ignore: list[str]  # the recipe's patterns (as written in quantization_config.ignore)
    excluded_modules: list[str]  # hub names of the weight modules left unquantized
    problems: list[str]  # modules whose stored format the inspector could not make sense of
    shared_expert_check: SharedExpertCheck
    reload: dict[str, Any] | None  # transformers reload + generate, None when not verified
    dropped_keys: list[str]  # keys of the download that transformers does not load (e.g. mtp.*), not in output
    notes: list[str]
    seconds: dict[str, float]
    versions: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def file_dict(self) -> dict[str, Any]:
        """What `quant_report.json` holds: the report without its wall-clock timings (`seconds`,
        `reload.load_generate_s`; the stage result keeps them). The output folder is content-addressed and shared
        by every profile whose download, recipe and code are the same; re-making it must write the same bytes, or
        it would invalidate the other runs' recorded artifacts (and so their reuse)."""
        d = self.to_dict()
        d.pop("seconds")
        if d["reload"]:
            d["reload"].pop("load_generate_s", None)
        return d


@dataclass
class QuantResult:
    recipe: str
    src_dir: str
    model_dir: str  # what serve / correctness load
    report_path: str
    report: QuantReport
    inspect: dict[str, Any]  # m3lab.quant.inspector.inspect of the output: what `m3lab inspect model_dir` prints

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Entry point


def quantize(src_dir: str | Path, out_dir: str | Path | None, recipe: QuantRecipe | str) -> QuantResult:
    """Quantize `src_dir` (a hub-layout checkpoint) into `out_dir` per `recipe`; replaces an existing `out_dir`.

    `out_dir=None` takes `recipe.out_dir`, else `<src_dir>.<recipe>`. Raises `QuantizeError` (and leaves no
    `out_dir`) when the output fails its checks."""
    if isinstance(recipe, str):
        recipe = QuantRecipe.from_params(recipe)
    src = Path(src_dir).resolve()
    if not (src / "config.json").is_file():
        raise QuantizeError(f"quantize: {src / 'config.json'} not found: {src} is not a checkpoint folder")
    out = Path(out_dir or recipe.out_dir or f"{src}.{recipe.recipe}").absolute()
    if out.resolve() == src or src in out.resolve().parents:
        raise QuantizeError(f"quantize: out_dir {out} must not be (inside) the source {src}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        seconds, dropped, notes = RECIPES.load(recipe.recipe).quantize(src, tmp, recipe)
        inspection = inspector.inspect(tmp)
        report = quant_report(tmp, recipe, verify=recipe.verify, seconds=seconds, dropped=dropped, notes=notes,
                              inspection=inspection)
        check = report.shared_expert_check
        if not check.passed:
            layers = f"MoE layers {check.failing_layers}" if check.failing_layers else "no MoE layer named"
            raise QuantizeError(f"quantize: shared-expert check failed on {src} ({layers} of {check.moe_layers}): "
                                + "; ".join(check.failures))
        report.model_dir = inspection["model_dir"] = str(out)
        report.seconds["total"] = round(time.perf_counter() - t0, 3)
        (tmp / REPORT_NAME).write_text(json.dumps(report.file_dict(), indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return QuantResult(recipe=recipe.recipe, src_dir=str(src), model_dir=str(out),
                       report_path=str(out / REPORT_NAME), report=report, inspect=inspection)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and deleted after (rename is atomic)."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def model_class(model_dir: Path) -> type:
    """The class named in config.json `architectures` (M3 VL: MiniMaxM3SparseForConditionalGeneration)."""
    import transformers

    cfg = _read_config(model_dir)
    archs = cfg.get("architectures") or []
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    raise QuantizeError(f"{model_dir / 'config.json'}: architectures={archs!r} names no transformers class")


def _read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg.get("text_config") or cfg


# --------------------------------------------------------------------------------------------------------------
# Hub layout


_EXPERT_RE = re.compile(r"\.experts\.(\d+)\.(gate|up|down)_proj\.")
_EXPERT_HUB = {"gate": "w1", "up": "w3", "down": "w2"}
_LAYER_MOE_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.block_sparse_moe\.")


def saved_to_hub_key(key: str, mlp_layer_types: list[str]) -> str:
    """The hub name of a key that transformers' `save_pretrained` wrote for M3 (after llm-compressor).

    Two differences to undo: linearized experts `experts.E.{gate,up,down}_proj` are `experts.E.{w1,w3,w2}`
    upstream, and `block_sparse_moe` only names the MoE layers' MLP upstream (dense layers and the vision
    tower keep `mlp`). Quantization tensors (`.weight_scale` ...) follow their weight by construction."""
    key = _EXPERT_RE.sub(lambda m: f".experts.{m[1]}.{_EXPERT_HUB[m[2]]}.", key)
    if "vision_tower" in key:
        return key.replace(".block_sparse_moe.", ".mlp.")
    m = _LAYER_MOE_RE.search(key)
    if m and int(m[1]) < len(mlp_layer_types) and mlp_layer_types[int(m[1])] != "sparse":
        return key.replace(".block_sparse_moe.", ".mlp.")
    return key


def _shards(model_dir: Path) -> list[Path]:
    return sorted(p for p in Path(model_dir).glob("*.safetensors"))


def rewrite_hub_layout(model_dir: Path, src: Path) -> list[str]:
    """Rewrite every shard (and the index) with hub names, one shard in memory at a time.

    Tensors that were not quantized must be the download's, bit for bit: we check it, and put back the
    download's dtype where transformers cast it (the hub stores `e_score_correction_bias` in float32; the
    bf16 model saves it in bf16). Returns the keys whose dtype was restored."""
    types = _text_config(_read_config(src)).get("mlp_layer_types") or []
    src_meta = _tensor_meta(src)
    saved = {saved_to_hub_key(k, types) for k in _tensor_meta(model_dir)}
    companions = {k for k in saved if _QUANT_RE.match(k)}
    quantized = companions | {_QUANT_RE.match(k)[1] + ".weight" for k in companions}  # left as llm-compressor wrote
    renamed: dict[str, str] = {}
    restored: list[str] = []
    handles: dict[Path, Any] = {}
    try:
        for shard in _shards(model_dir):
            with safe_open(shard, "pt") as f:
                meta = f.metadata() or {"format": "pt"}
                tensors = {}
                for k in f.keys():
                    new = saved_to_hub_key(k, types)
                    if new in tensors:
                        raise QuantizeError(f"{shard}: keys {renamed.get(new, new)!r} and {k!r} both map to {new!r}")
                    t = f.get_tensor(k)
                    if new not in quantized and new in src_meta:
                        path = src_meta[new][0]
                        if path not in handles:
                            handles[path] = safe_open(path, "pt").__enter__()
                        orig = handles[path].get_tensor(new)
                        if orig.shape != t.shape or not torch.equal(orig.to(t.dtype), t):
                            raise QuantizeError(f"{shard}: unquantized tensor {k!r} differs from {new!r} in {path}")
                        if orig.dtype != t.dtype:
                            t = orig
                            restored.append(new)
                    tensors[new] = t
                    renamed[k] = new
            part = shard.with_name(f".{shard.name}.tmp")
            save_file(tensors, part, metadata=meta)
            del tensors
            os.replace(part, shard)
            os.chmod(shard, 0o644)  # the saved shards come out 0600; a server running as another user must read them
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text(encoding="utf-8"))
        idx["weight_map"] = {renamed.get(k, k): v for k, v in idx["weight_map"].items()}
        idx.setdefault("metadata", {})["total_size"] = sum(t.nbytes for shard in _shards(model_dir)
                                                           for t in inspector.read_header(shard).values())
        index.write_text(json.dumps(idx, indent=2) + "\n", encoding="utf-8")
    return sorted(restored)


def write_config(model_dir: Path, src: Path, ignore: list[str]) -> None:
    """config.json = the download's own config (the fields vLLM reads, untouched) + quantization_config.

    llm-compressor writes `ignore` as a list of module names, half native, half reverse-mapped (e.g.
    `model.multi_modal_projector.linear_1`, `...self_attn.indexer.q_proj`): matched by neither loader, so
    transformers quantizes those bf16 modules on reload (their `weight_scale` comes out MISSING). The recipe's
    patterns match both spellings instead."""
    saved = _read_config(model_dir)
    qcfg = saved.get("quantization_config")
    if not qcfg:
        raise QuantizeError(f"{model_dir / 'config.json'}: llm-compressor wrote no quantization_config")
    qcfg["ignore"] = list(ignore)
    cfg = _read_config(src)
    cfg["quantization_config"] = qcfg
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template, processor and generation configs: everything but the weights and config.json.
    The download's own generation_config wins over the one save_pretrained regenerated."""
    for entry in src.iterdir():
        if entry.is_dir() or entry.suffix == ".safetensors" or entry.name in (
                "config.json", "model.safetensors.index.json", REPORT_NAME) or entry.name.startswith("."):
            continue
        shutil.copy2(entry, dst / entry.name)


def _tensor_meta(model_dir: Path) -> dict[str, tuple[Path, str, list[int]]]:
    """key → (shard, safetensors dtype, shape), from the headers only."""
    meta: dict[str, tuple[Path, str, list[int]]] = {}
    for shard in _shards(model_dir):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                meta[k] = (shard, sl.get_dtype(), list(sl.get_shape()))
    if not meta:
        raise QuantizeError(f"{model_dir}: no *.safetensors files")
    return meta


def check_layout(out: Path, src: Path) -> list[str]:
    """Output keys = the download's keys + quantization tensors. Returns the download keys that are missing
    because transformers does not load them (e.g. `mtp.*`); any other difference is an error."""
    out_meta, src_meta = _tensor_meta(out), _tensor_meta(src)
    quant = {k for k in out_meta if _QUANT_RE.match(k)}
    packed = {_QUANT_RE.match(k)[1] + ".weight" for k in quant if k.endswith(".weight_packed")}
    missing = sorted(set(src_meta) - set(out_meta) - packed)
    extra = sorted(set(out_meta) - set(src_meta) - quant)
    orphans = sorted(k for k in quant if _QUANT_RE.match(k)[1] + ".weight" not in out_meta
                     and _QUANT_RE.match(k)[1] + ".weight_packed" not in out_meta)
    skip = [re.compile(p) for p in getattr(model_class(src), "_keys_to_ignore_on_load_unexpected", None) or []]
    dropped = [k for k in missing if any(p.search(k) for p in skip)]
    missing = [k for k in missing if k not in dropped]
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys of {src} are missing from the output, e.g. {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} output keys are not in {src} (not hub layout), e.g. {extra[:5]}")
    if orphans:
        problems.append(f"quantization tensors without their weight: {orphans[:5]}")
    shape_diff = [k for k in set(src_meta) & set(out_meta) if src_meta[k][2] != out_meta[k][2]]
    if shape_diff:
        k = sorted(shape_diff)[0]
        problems.append(f"{len(shape_diff)} keys changed shape, e.g. {k}: {src_meta[k][2]} → {out_meta[k][2]}")
    if problems:
        raise QuantizeError(f"quantize: output {out} is not in the hub layout: " + "; ".join(problems))
    return dropped


def _matches(name: str, patterns: list[str]) -> bool:
    """compressed-tensors semantics: `re:` → re.match (anchored at the start), else the exact name."""
    return any(re.match(p[3:], name) if p.startswith("re:") else p == name for p in patterns)


def check_ignore_consistency(model_dir: Path, ignore: list[str]) -> None:
    """What `ignore` says = what is stored: a matched module is not quantized, and an unquantized module that a
    loader would treat as a Linear target is matched (else vLLM expects a `weight_scale` that is not there).
    Modules and whether each is quantized come from the inspector's format detectors."""
    _, mods, _ = inspector.scan(model_dir)
    problems = []
    for name, m in sorted(mods.items()):
        if not m.params:
            continue
        ignored = _matches(name, ignore)
        if m.quantized and ignored:
            problems.append(f"{name} matches ignore but was quantized: llm-compressor matches ignore against "
                            "transformers' module names, so patterns must match both spellings (see DEFAULT_IGNORE)")
        elif not m.quantized and not ignored and not _NOT_LINEAR_RE.search(name):
            problems.append(f"{name} is stored unquantized but matches no ignore pattern")
    if problems:
        raise QuantizeError(f"quantize: {model_dir / 'config.json'} quantization_config.ignore disagrees with the "
                            f"weights ({len(problems)}): " + "; ".join(problems[:5]))


# --------------------------------------------------------------------------------------------------------------
# Report


def quant_report(model_dir: str | Path, recipe: QuantRecipe, verify: bool = True,
                 seconds: dict[str, float] | None = None, dropped: list[str] | None = None,
                 notes: list[str] | None = None, inspection: dict[str, Any] | None = None) -> QuantReport:
    """Measure a checkpoint folder (see QuantReport for the definitions); `verify` reloads it in transformers.

    `inspection` is `inspector.inspect(model_dir)` when the caller already has it. The report is returned even
    when the shared-expert check fails (the caller raises); a reload that fails or loads something else than
    what is stored raises `QuantizeError` here, unless the shared-expert check already explains it."""
    model_dir = Path(model_dir)
    ins = inspection if inspection is not None else inspector.inspect(model_dir)
    cfg = _read_config(model_dir)
    notes = list(notes or [])
    model = load_error = None
    info: dict[str, Any] = {}
    reload_info = None
    t = time.perf_counter()
    if verify:
        try:
            model, info = load_for_check(model_dir)
        except Exception as e:  # noqa: BLE001 - a missing tensor can break the load; the check says which layer
            load_error = e
    if load_error is not None and ins["shared_expert_check"]["passed"]:
        raise QuantizeError(f"{model_dir}: transformers reload failed: {type(load_error).__name__}: "
                            f"{load_error}") from load_error
    check = _check_shared(model_dir, ins["shared_expert_check"], model, reload=verify, load_error=load_error)
    bad = {k: v for k, v in info.items() if v}
    if check.passed and bad:
        raise QuantizeError(f"{model_dir}: transformers reload does not match the checkpoint: "
                            + "; ".join(f"{k}: {sorted(map(str, v))[:5]}" for k, v in bad.items()))
    if model is not None and check.passed:
        reload_info = _generate(model, cfg)
        reload_info["load_generate_s"] = round(time.perf_counter() - t, 3)
    del model
    for label in ("routed experts", "shared experts", "router", "indexer"):
        c = ins["classes"].get(label)
        if c:
            excluded = ins["excluded"]["by_class"].get(label, 0)
            notes.append(f"{label}: {c['modules']} modules, stored as {c['formats']}, {excluded} left unquantized"
                         + (" (MiniMaxM3VLTopKRouter is not an nn.Linear: never an FP8 target)"
                            if label == "router" and excluded else ""))
    notes += [f"inspector: {p}" for p in ins["problems"]]
    return QuantReport(
        recipe=recipe.recipe, scheme=recipe.scheme, model_dir=str(model_dir), size_bytes=ins["size_bytes"],
        safetensors_bytes=ins["safetensors_bytes"], files=ins["files"], quant_method=ins["quant_method"],
        activations=ins["activations"], weight_params=ins["weight_params"],
        weight_stored_bytes=ins["weight_stored_bytes"], bits_per_weight=ins["bits_per_weight"],
        formats={f: v["modules"] for f, v in ins["formats"].items()},
        routed_expert_formats=dict((ins["classes"].get("routed experts") or {}).get("formats") or {}),
        ignore=list(recipe.ignore) if recipe.recipe != "none" else [], excluded_modules=ins["excluded"]["modules"],
        problems=list(ins["problems"]), shared_expert_check=check, reload=reload_info,
        dropped_keys=list(dropped or []), notes=notes, seconds={k: round(v, 3) for k, v in (seconds or {}).items()},
        versions=_versions())


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "llmcompressor", "compressed-tensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# --------------------------------------------------------------------------------------------------------------
# Reload checks


def load_for_check(model_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load on CPU with weights decompressed at load (`dequantize=True`, same logits as the default lazy path),
    so loaded values can be compared with the checkpoint. Returns (model, loading info: missing/unexpected/
    mismatched keys, each empty when the checkpoint matched the model)."""
    model_dir = Path(model_dir)
    cfg = _read_config(model_dir)
    kwargs: dict[str, Any] = {}
    if (cfg.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model, info = model_class(model_dir).from_pretrained(model_dir, dtype="auto", output_loading_info=True, **kwargs)
    model.eval()
    keep = ("missing_keys", "unexpected_keys", "mismatched_keys")
    return model, {k: list(info.get(k) or []) for k in keep}


@torch.no_grad()
def _generate(model: torch.nn.Module, cfg: dict[str, Any], new_tokens: int = 4) -> dict[str, Any]:
    tc = _text_config(cfg)
    vocab = int(tc["vocab_size"])
    bos = tc.get("bos_token_id")
    # BOS, then ordinary ids past the tiny tokenizer's 11 special tokens
    prompt = [bos if isinstance(bos, int) and 0 <= bos < vocab else 1] + [i % vocab for i in range(11, 16)]
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    new = out[0, len(prompt):].tolist()
    if len(new) == 0 or not all(0 <= t < vocab for t in new):
        raise QuantizeError(f"reloaded model generated {new!r} from {prompt!r}")
    return {"ok": True, "prompt_ids": prompt, "generated_ids": new}


def check_shared_experts(model_dir: str | Path, model: torch.nn.Module | None = None,
                         reload: bool = True) -> SharedExpertCheck:
    """Checkpoint half (`inspector.check_shared_experts`): every MoE layer's shared expert is stored, of the
    expected logical shape, and not all zeros, in any stored format. Reload half (`model` given, or loaded here
    when `reload`): the loaded shared expert is nonzero and equals the checkpoint's dequantized values."""
    model_dir = Path(model_dir)
    checkpoint = inspector.check_shared_experts(model_dir).to_dict()
    load_error = None
    if model is None and reload and checkpoint["n_shared"]:
        try:
            model, _ = load_for_check(model_dir)
        except Exception as e:  # noqa: BLE001 - e.g. transformers cannot init a missing FP8 tensor: say which layers
            load_error = e
    return _check_shared(model_dir, checkpoint, model, reload=reload, load_error=load_error)


@torch.no_grad()
def _check_shared(model_dir: Path, checkpoint: dict[str, Any], model: torch.nn.Module | None, reload: bool,
                  load_error: BaseException | None = None) -> SharedExpertCheck:
    """Both halves, from the inspector's check (its `to_dict()`) and the reloaded model (None: not loaded)."""
    failures: list[tuple[int | None, str]] = []  # (layer, message); None: not about one layer
    for layer, v in checkpoint["layers"].items():
        failures += [(int(layer), p) for p in v["problems"]]
    layered = {f for _, f in failures}
    failures += [(None, f) for f in checkpoint["failures"] if f not in layered]
    moe_layers = list(checkpoint["moe_layers"])
    reloaded = bool(reload or model is not None) and bool(checkpoint["n_shared"] and moe_layers)  # else nothing to load
    if reloaded and load_error is not None:
        failures.append((None, f"reload in transformers failed: {type(load_error).__name__}: {load_error}"))
    if reloaded and model is not None:
        _, mods, _ = inspector.scan(model_dir)
        loaded = {int(m[1]): mod for name, mod in model.named_modules()
                  if "vision" not in name and (m := re.search(r"layers\.(\d+)\.mlp\.shared_experts$", name))}
        for layer in moe_layers:
            if layer not in loaded:
                failures.append((layer, f"layer {layer}: the reloaded model has no mlp.shared_experts"))
                continue
            tensors = checkpoint["layers"][str(layer)]["tensors"]
            stored = inspector.shared_expert_weights(mods, tensors)
            failures += [(layer, f) for f in _compare_loaded(layer, loaded[layer], stored)]
    failing = sorted({layer for layer, _ in failures if layer is not None})
    return SharedExpertCheck(passed=not failures, n_shared=checkpoint["n_shared"], moe_layers=moe_layers,
                             sources=list(checkpoint["sources"]), checkpoint_passed=checkpoint["passed"],
                             reloaded=reloaded, failing_layers=failing, failures=[f for _, f in failures],
                             notes=list(checkpoint["notes"]))


def _compare_loaded(layer: int, mod: torch.nn.Module, stored: dict[str, Any]) -> list[str]:
    """transformers fuses gate and up into `gate_up_proj` (gate rows first); compare per fused parameter.
    `stored`: projection → dequantized float32 array (None: stored, but in a format not dequantized here, so
    only the zero test applies); a projection absent from `stored` is not in the checkpoint."""
    absent = object()
    pairs: list[tuple[str, torch.Tensor, Any]] = []
    if hasattr(mod, "gate_up_proj"):
        gu = [stored.get(p, absent) for p in ("gate", "up")]
        fused = absent if any(x is absent for x in gu) else (
            None if any(x is None for x in gu) else np.concatenate(gu, axis=-2))
        pairs.append(("gate_up_proj", mod.gate_up_proj.weight, fused))
    else:
        pairs += [(f"{p}_proj", getattr(mod, f"{p}_proj").weight, stored.get(p, absent)) for p in ("gate", "up")]
    pairs.append(("down_proj", mod.down_proj.weight, stored.get("down", absent)))
    out = []
    for name, got, want in pairs:
        got = got.detach().float()
        if not torch.any(got != 0):
            out.append(f"layer {layer}: shared_experts.{name} loaded as zeros")
        elif want is absent:
            out.append(f"layer {layer}: shared_experts.{name} loaded, but the checkpoint lacks a part of it "
                       "(so its values are freshly initialized)")
        elif want is None:
            continue
        elif list(got.shape) != list(want.shape):
            out.append(f"layer {layer}: shared_experts.{name} loaded with shape {list(got.shape)}, "
                       f"checkpoint {list(want.shape)}")
        else:
            want = torch.from_numpy(np.ascontiguousarray(want, dtype=np.float32))
            diff = (got - want).abs().max().item()
            tol = 1e-2 * want.abs().max().item() + 1e-6  # bf16 rounding of the dequantized product
            if diff > tol:
                out.append(f"layer {layer}: shared_experts.{name} loaded != checkpoint (max abs diff {diff:.3g})")
    return out
