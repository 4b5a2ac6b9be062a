"""MiniMax-M3 checkpoint layouts, and conversions between them.

The same weights go by different names in different places:

    hub      what `MiniMaxAI/MiniMax-M3` ships, and what vLLM and transformers' conversion mapping for
             `minimax_m3_vl` read: `language_model.model.layers.N...`, `language_model.lm_head`,
             MoE layers under `block_sparse_moe.` with one `experts.E.w1/w2/w3` per expert, dense layers
             as `mlp.gate_proj/up_proj/down_proj`, the indexer as `self_attn.index_{q,k}_{proj,norm}`,
             vision under `vision_tower.vision_model.`, `multi_modal_projector.`, `patch_merge_mlp.`.
    native   transformers' module tree (`model.state_dict()`): `model.language_model.layers.N...`,
             gate and up fused into one `gate_up_proj`, the experts stacked into 3D parameters
             `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I].

Each comes as a VL layout (the whole model) and a text layout (the language model alone, rooted at
`model.` / `lm_head.`): vLLM serves text from hub names, transformers' `MiniMaxM3VLForCausalLM` loads
native names only (no conversion mapping is registered for `minimax_m3_vl_text`).

Why write names ourselves: `save_pretrained` on M3 reverses the conversion mapping blindly and renames
every `.mlp.` to `.block_sparse_moe.` (dense layers and the vision tower too), which is not the hub layout.

Key names are mapped per tensor and work for any suffix (`.weight`, and quantization tensors such as
`.weight_scale`, `.input_scale`, `.weight_packed`). A hub tensor that lands inside a fused native tensor
is described by a `Slot` (native key, expert index, gate/up half).
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "Slot",
    "native_slot",
    "hub_key",
    "hub_to_native",
    "native_to_hub",
    "vl_to_text_key",
    "read_tensors",
    "write_tensors",
    "text_only",
]

Layout = Literal["vl", "text"]
Flavor = Literal["transformers", "vllm"]

# Files a text-only copy takes along. Image/video processor configs stay behind: a text model takes no pixels.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)

# Fixed safetensors header metadata, so that identical tensors give identical bytes.
SAFETENSORS_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class Slot:
    """Where one hub tensor sits in the native layout.

    key:    the native key.
    expert: index along dim 0 of a stacked expert tensor, or None.
    half:   0 (gate: `w1` / `gate_proj`) or 1 (up: `w3` / `up_proj`) of a fused `gate_up_proj`, or None.
    """

    key: str
    expert: int | None = None
    half: int | None = None


# ---------------------------------------------------------------------------------------------------
# Prefixes: (native, hub), first match wins. Module paths outside the language model are renamed as a
# whole; inside it, the per-layer renames below apply.

_LM_PREFIX = {"vl": ("model.language_model.", "language_model.model."), "text": ("model.", "model.")}
_HEAD_PREFIX = {"vl": ("lm_head.", "language_model.lm_head."), "text": ("lm_head.", "lm_head.")}
_VISION_PREFIXES = (
    ("model.vision_tower.embeddings.proj.", "vision_tower.vision_model.embeddings.patch_embedding."),
    ("model.vision_tower.layers.", "vision_tower.vision_model.encoder.layers."),
    ("model.vision_tower.pre_layrnorm.", "vision_tower.vision_model.pre_layrnorm."),
    ("model.multi_modal_projector.merge_linear_", "patch_merge_mlp.linear_"),
    ("model.multi_modal_projector.linear_", "multi_modal_projector.linear_"),
)

# In-layer renames (after `layers.N.`) that are one tensor to one tensor: (native, hub) name prefixes.
_LAYER_RENAMES = (
    ("self_attn.indexer.q_proj.", "self_attn.index_q_proj."),
    ("self_attn.indexer.k_proj.", "self_attn.index_k_proj."),
    ("self_attn.indexer.q_norm.", "self_attn.index_q_norm."),
    ("self_attn.indexer.k_norm.", "self_attn.index_k_norm."),
    ("mlp.gate.e_score_correction_bias", "block_sparse_moe.e_score_correction_bias"),
    ("mlp.gate.", "block_sparse_moe.gate."),
    ("mlp.shared_experts.down_proj.", "block_sparse_moe.shared_experts.down_proj."),
)

# hub: one routed expert's projection. w1 = gate, w3 = up (fused as gate_up_proj), w2 = down.
_HUB_EXPERT = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w[123])\.(.+)$")
# hub: gate or up half of a dense MLP or of the shared expert.
_HUB_HALF = re.compile(r"^(mlp|block_sparse_moe\.shared_experts)\.(gate|up)_proj\.(.+)$")
# native: a stacked expert tensor; `.weight` is the bare parameter, any other suffix S is `<param>_S`
# (transformers' FP8 path names expert scales the same way, e.g. `gate_up_proj_scale_inv`).
_NATIVE_EXPERT = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)(?:_(.+))?$")
_NATIVE_FUSED = re.compile(r"^(mlp|mlp\.shared_experts)\.gate_up_proj\.(.+)$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")

_W_TO_PARAM = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None)}
_HALF_NAMES = ("gate", "up")


def _hub_layer_to_native(name: str) -> tuple[str, int | None, int | None]:
    """In-layer hub name -> (native name, expert, half)."""
    if m := _HUB_EXPERT.match(name):
        expert, w, suffix = int(m[1]), m[2], m[3]
        param, half = _W_TO_PARAM[w]
        return f"mlp.experts.{param}" + ("" if suffix == "weight" else f"_{suffix}"), expert, half
    if m := _HUB_HALF.match(name):
        owner = "mlp" if m[1] == "mlp" else "mlp.shared_experts"
        return f"{owner}.gate_up_proj.{m[3]}", None, _HALF_NAMES.index(m[2])
    for native, hub in _LAYER_RENAMES:
        if name.startswith(hub):
            return native + name[len(hub) :], None, None
    # `mlp.down_proj.*` (dense), attention projections and norms, layer norms: same name both ways.
    if name.startswith("block_sparse_moe."):
        raise KeyError(f"unknown MoE tensor name {name!r}")
    return name, None, None


def _native_layer_to_hub(name: str, expert: int | None, half: int | None) -> str:
    """In-layer native name (+ expert, half) -> hub name."""
    if m := _NATIVE_EXPERT.match(name):
        if expert is None:
            raise KeyError(f"{name!r} is a stacked expert tensor: its hub name needs an expert index")
        param, suffix = m[1], m[2] or "weight"
        w = "w2" if param == "down_proj" else ("w1", "w3")[_require_half(name, half)]
        return f"block_sparse_moe.experts.{expert}.{w}.{suffix}"
    if m := _NATIVE_FUSED.match(name):
        owner = "mlp" if m[1] == "mlp" else "block_sparse_moe.shared_experts"
        return f"{owner}.{_HALF_NAMES[_require_half(name, half)]}_proj.{m[2]}"
    for native, hub in _LAYER_RENAMES:
        if name.startswith(native):
            return hub + name[len(native) :]
    return name


def _require_half(name: str, half: int | None) -> int:
    if half not in (0, 1):
        raise KeyError(f"{name!r} is a fused gate_up tensor: its hub name needs half=0 (gate) or 1 (up), got {half}")
    return half


def native_slot(hub_key: str) -> Slot:
    """Hub key (VL or text layout, told apart by its prefix) -> its Slot in the native layout."""
    if hub_key.startswith(("language_model.", "vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")):
        layout: Layout = "vl"
    elif hub_key.startswith(("model.", "lm_head.")):
        layout = "text"
    else:
        raise KeyError(f"{hub_key!r} is not a MiniMax-M3 hub key (unknown prefix)")
    native_lm, hub_lm = _LM_PREFIX[layout]
    native_head, hub_head = _HEAD_PREFIX[layout]
    if hub_key.startswith(hub_head):
        return Slot(native_head + hub_key[len(hub_head) :])
    if hub_key.startswith(hub_lm):
        rest = hub_key[len(hub_lm) :]
        if m := _LAYER.match(rest):
            name, expert, half = _hub_layer_to_native(m[2])
            return Slot(f"{native_lm}layers.{m[1]}.{name}", expert, half)
        return Slot(native_lm + rest)  # embed_tokens, norm
    for native, hub in _VISION_PREFIXES:
        if hub_key.startswith(hub):
            return Slot(native + hub_key[len(hub) :])
    raise KeyError(f"{hub_key!r} is not a MiniMax-M3 hub key (unknown prefix)")


def hub_key(slot: Slot, layout: Layout = "vl") -> str:
    """Native Slot -> hub key, in the VL layout or the text (vLLM) layout. Inverse of `native_slot`."""
    native_lm, hub_lm = _LM_PREFIX[layout]
    native_head, hub_head = _HEAD_PREFIX[layout]
    key = slot.key
    if key.startswith(native_head):
        return hub_head + key[len(native_head) :]
    if layout == "vl":
        for native, hub in _VISION_PREFIXES:
            if key.startswith(native):
                return hub + key[len(native) :]
    if key.startswith(native_lm):
        rest = key[len(native_lm) :]
        if m := _LAYER.match(rest):
            return f"{hub_lm}layers.{m[1]}.{_native_layer_to_hub(m[2], slot.expert, slot.half)}"
        return hub_lm + rest
    raise KeyError(f"{key!r} is not a native MiniMax-M3 key of the {layout} layout")


def vl_to_text_key(hub_key_vl: str) -> str | None:
    """VL hub key -> text (vLLM) hub key; None for vision and projector tensors, which text drops."""
    slot = native_slot(hub_key_vl)
    native_lm_vl, _ = _LM_PREFIX["vl"]
    if slot.key.startswith(native_lm_vl):
        slot = Slot("model." + slot.key[len(native_lm_vl) :], slot.expert, slot.half)
    elif not slot.key.startswith(_HEAD_PREFIX["vl"][0]):
        return None
    return hub_key(slot, "text")


# ---------------------------------------------------------------------------------------------------
# Tensors: fuse on the way to native, split on the way to hub.


def _fuse_halves(gate: torch.Tensor, up: torch.Tensor, keys: tuple[str, str]) -> torch.Tensor:
    """gate ++ up along the output dim. A per-tensor value (scalar, or dim 0 of size 1) is shared."""
    if gate.dim() == 0 or gate.shape[0] == 1:
        if not torch.equal(gate, up):
            raise ValueError(f"cannot fuse per-tensor {keys[0]} and {keys[1]}: their values differ")
        return gate
    return torch.cat([gate, up], dim=0)


def _split_halves(fused: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    if fused.dim() == 0 or fused.shape[0] == 1:
        return fused, fused  # a per-tensor value applies to both halves
    if fused.shape[0] % 2:
        raise ValueError(f"{key}: fused gate_up dim 0 is {fused.shape[0]}, not even")
    gate, up = fused.chunk(2, dim=0)
    return gate, up


def hub_to_native(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub tensors (VL or text layout) -> native tensors: gate/up fused, experts stacked along dim 0."""
    parts: dict[str, dict[tuple[int | None, int | None], tuple[str, torch.Tensor]]] = defaultdict(dict)
    for key, tensor in tensors.items():
        slot = native_slot(key)
        parts[slot.key][(slot.expert, slot.half)] = (key, tensor)

    out: dict[str, torch.Tensor] = {}
    for native, got in parts.items():
        experts = sorted({e for e, _ in got})
        if experts == [None]:
            out[native] = _assemble(native, got, None)
            continue
        if experts != list(range(len(experts))):
            raise ValueError(f"{native}: experts {experts} are not 0..{len(experts) - 1}")
        out[native] = torch.stack([_assemble(native, got, e) for e in experts])
    return out


def _assemble(native: str, got: dict, expert: int | None) -> torch.Tensor:
    halves = {h: kt for (e, h), kt in got.items() if e == expert}
    if set(halves) == {None}:
        return halves[None][1]
    if set(halves) != {0, 1}:
        raise ValueError(f"{native} (expert {expert}): need both gate and up halves, got {sorted(halves)}")
    (k0, t0), (k1, t1) = halves[0], halves[1]
    return _fuse_halves(t0, t1, (k0, k1))


def native_to_hub(tensors: Mapping[str, torch.Tensor], layout: Layout = "vl") -> dict[str, torch.Tensor]:
    """Native tensors -> hub tensors (one per expert and per gate/up half). Outputs own their memory."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        stacked = _NATIVE_EXPERT.match(_in_layer(key)) is not None
        per_expert = list(enumerate(tensor)) if stacked else [(None, tensor)]
        for expert, t in per_expert:
            if _is_fused(key):
                gate, up = _split_halves(t, key)
                out[hub_key(Slot(key, expert, 0), layout)] = gate.clone()
                out[hub_key(Slot(key, expert, 1), layout)] = up.clone()
            else:
                out[hub_key(Slot(key, expert, None), layout)] = t.clone()
    return out


def _in_layer(native_key: str) -> str:
    """The part after `layers.N.` ('' for keys outside a layer)."""
    m = re.search(r"(?:^|\.)layers\.\d+\.(.+)$", native_key)
    return m[1] if m else ""


def _is_fused(native_key: str) -> bool:
    """True for native tensors that hold gate and up together."""
    in_layer = _in_layer(native_key)
    if m := _NATIVE_EXPERT.match(in_layer):
        return m[1] == "gate_up_proj"
    return _NATIVE_FUSED.match(in_layer) is not None


# ---------------------------------------------------------------------------------------------------
# Files.


def _shards(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, in index order when there is an index."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return shards


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of one safetensors file, in key order."""
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):
            yield key, f.get_tensor(key)


def write_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file byte-for-byte reproducibly: sorted keys, fixed metadata, contiguous data."""
    ordered = {k: tensors[k].contiguous() for k in sorted(tensors)}
    save_file(ordered, str(path), metadata=SAFETENSORS_METADATA)
    path.chmod(0o644)  # safetensors creates the file 0600; the rest of a checkpoint folder is world-readable


def _write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def text_only(src_dir: str | Path, dst_dir: str | Path, flavor: Flavor) -> Path:
    """Write the language model of a VL hub-layout checkpoint as a text-only checkpoint.

    flavor="transformers": a `minimax_m3_vl_text` checkpoint in native names, which
        `MiniMaxM3VLForCausalLM.from_pretrained` and `transformers serve` load (no torchvision needed).
        FP8 routed experts are folded to bf16 the way transformers folds them when it loads the VL model
        (see `_dequantize_experts`); every other quantized Linear stays as stored.
    flavor="vllm": config stays `minimax_m3_vl` (vLLM parses `text_config`) with
        `architectures: ["MiniMaxM3SparseForCausalLM"]`; keys `model.*` / `lm_head.*` in hub names, any
        tensor suffix, vision dropped. Shards are converted one by one, so memory stays at one shard.
    Tokenizer, chat template and generation config are copied; a `quantization_config` is carried over
    with the module names in it renamed like the keys. Weight files already in `dst_dir` are replaced, and
    config.json is written last, so a folder with a config.json is complete.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "minimax_m3_vl" or "text_config" not in config:
        raise ValueError(f"{src / 'config.json'}: expected a minimax_m3_vl config with text_config, "
                         f"got model_type={config.get('model_type')!r}")
    if flavor not in ("transformers", "vllm"):
        raise ValueError(f"flavor must be 'transformers' or 'vllm', got {flavor!r}")
    dst.mkdir(parents=True, exist_ok=True)
    for stale in [*dst.glob("*.safetensors"), dst / "model.safetensors.index.json", dst / "config.json"]:
        stale.unlink(missing_ok=True)

    if flavor == "vllm":
        out_config = dict(config, architectures=["MiniMaxM3SparseForCausalLM"])
        _convert_shards_vllm(src, dst)
    else:
        # The text config is flat: text_config's fields at the root, plus what the root carried.
        out_config = dict(config["text_config"], model_type="minimax_m3_vl_text",
                          architectures=["MiniMaxM3VLForCausalLM"])
        for field in ("tie_word_embeddings", "transformers_version", "dtype"):
            if field in config:
                out_config.setdefault(field, config[field])
        lm = {}
        for shard in _shards(src):
            for key, tensor in read_tensors(shard):
                if (new := vl_to_text_key(key)) is not None:
                    lm[new] = tensor
        write_tensors(hub_to_native(_dequantize_experts(lm)), dst / "model.safetensors")
    if (quant := config.get("quantization_config")) is not None:
        out_config["quantization_config"] = _rename_quant_modules(quant, flavor)

    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    _write_json(out_config, dst / "config.json")
    return dst


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_EXPERT_WEIGHT = re.compile(r"\.block_sparse_moe\.experts\.\d+\.w[123]\.")


def _dequantize_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold FP8 routed-expert weights with their `weight_scale` into bf16, as transformers does at load.

    transformers dequantizes compressed-tensors FP8 experts only inside the VL conversion mapping
    (`DecompressExperts`, before stacking w1/w3 into the 3D `gate_up_proj`); the text model has no mapping,
    and its 3D expert parameters are not `nn.Linear`, so nothing would read the scales. Doing the same
    arithmetic here, `(fp8.float() * scale.float()).bfloat16()`, gives the VL model's numbers.
    Dense, attention and shared-expert Linears stay FP8: transformers quantizes those modules itself.
    """
    out = {}
    for key, tensor in tensors.items():
        if not _EXPERT_WEIGHT.search(key):
            out[key] = tensor
            continue
        stem, suffix = key.rsplit(".", 1)
        if suffix == "weight" and tensor.dtype in _FP8:
            scale = tensors.get(f"{stem}.weight_scale")
            per_channel = scale is not None and scale.dim() == 2 and scale.shape[0] == tensor.shape[0]
            if not per_channel or scale.shape[1] not in (1, tensor.shape[1]):
                raise ValueError(f"{key}: FP8 expert weight {tuple(tensor.shape)} needs a per-channel or per-element "
                                 f"weight_scale, got {None if scale is None else tuple(scale.shape)}")
            out[key] = (tensor.float() * scale.float()).to(torch.bfloat16)
        elif suffix == "weight_scale" and tensors.get(f"{stem}.weight", tensor).dtype in _FP8:
            continue  # folded into its weight above
        elif suffix != "weight":
            raise ValueError(f"{key}: the transformers flavor can only fold FP8 routed experts "
                             f"(weight + weight_scale); {suffix!r} is not supported")
        else:
            out[key] = tensor
    return out


def _convert_shards_vllm(src: Path, dst: Path) -> None:
    shards = _shards(src)
    weight_map: dict[str, str] = {}
    for shard in shards:
        renamed = {}
        for key, tensor in read_tensors(shard):
            if (new := vl_to_text_key(key)) is not None:
                renamed[new] = tensor
        if renamed:
            write_tensors(renamed, dst / shard.name)
            weight_map.update(dict.fromkeys(renamed, shard.name))
    if len(set(weight_map.values())) > 1:
        total = sum((dst / name).stat().st_size for name in set(weight_map.values()))
        _write_json({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                    dst / "model.safetensors.index.json")


# Module names inside quantization_config (ignore lists, targets): plain names are renamed through the
# key mapping; regexes ("re:...") get the same renames as literal fragments, escaped or not.
_QUANT_LIST_FIELDS = ("ignore", "targets", "modules_to_not_convert", "exclude_modules", "ignored_layers")
_FRAGMENTS_VLLM = (("language_model.model.", "model."), ("language_model.lm_head", "lm_head"))
_FRAGMENTS_TRANSFORMERS = _FRAGMENTS_VLLM + (
    ("block_sparse_moe.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),
    ("self_attn.index_q_proj", "self_attn.indexer.q_proj"),
    ("self_attn.index_k_proj", "self_attn.indexer.k_proj"),
    ("self_attn.index_q_norm", "self_attn.indexer.q_norm"),
    ("self_attn.index_k_norm", "self_attn.indexer.k_norm"),
    ("block_sparse_moe.", "mlp."),
)


def _rename_module(name: str, flavor: Flavor) -> str:
    if name.startswith("re:"):
        pattern = name[3:]
        for old, new in _FRAGMENTS_VLLM if flavor == "vllm" else _FRAGMENTS_TRANSFORMERS:
            pattern = pattern.replace(old, new).replace(re.escape(old), re.escape(new))
        return "re:" + pattern
    try:
        text_key = vl_to_text_key(name + ".weight")
    except KeyError:
        return name  # a class name such as "Linear", or a module outside the known layout
    if text_key is None:
        return name  # a vision module: nothing of it is left, the entry is inert
    if flavor == "vllm":
        return text_key.removesuffix(".weight")
    native = native_slot(text_key).key
    # Stacked experts are parameters of the `experts` module; everything else is `<module>.weight`.
    return native.rsplit(".", 1)[0] if _NATIVE_EXPERT.match(_in_layer(native)) else native.removesuffix(".weight")


def _rename_quant_modules(quant: object, flavor: Flavor) -> object:
    if isinstance(quant, dict):
        return {k: ([_rename_module(v, flavor) if isinstance(v, str) else v for v in val]
                    if k in _QUANT_LIST_FIELDS and isinstance(val, list) else _rename_quant_modules(val, flavor))
                for k, val in quant.items()}
    if isinstance(quant, list):
        return [_rename_quant_modules(v, flavor) for v in quant]
    return quant
