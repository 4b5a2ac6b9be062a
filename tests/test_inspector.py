"""m3lab.quant.inspector: the checkpoint inspector and the shared-expert check, on every stored layout.

Checkpoints are built on the fly, small, in the real formats:
  * bf16 in six key layouts (hub VL, transformers native fused/unfused, transformers save, vLLM text, MLX names);
  * compressed-tensors FP8 (F8_E4M3 `weight` + per-channel `weight_scale`, the llm-compressor FP8_DYNAMIC layout);
  * GPTQ/AutoRound packed by AutoRound's own packers (`auto_round_extension.torch.qlinear_torch[_zp]`), whose
    dequantizing forward is the oracle for our unpacking;
  * AMD Quark MXFP4 (U8 weight, two E2M1 codes per byte, low nibble first; U8 E8M0 scale per 32);
  * MLX affine (U32 weight packed by AutoRound's MLX exporter `_pack_weight_mlx`, fp16 `scales` and `biases`).
The model config is the REAL M3 config (`m3lab/model_configs/minimax-m3.json`: `moe_layer_freq`, `n_shared_experts`
under `text_config`, no `mlp_layer_types`), with sizes shrunk. Two tests run real quantizers on the embedded tiny
model: AutoRound RTN (its card-002 layout, fused GPTQ shared gate_up) and llm-compressor FP8_DYNAMIC.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import m3lab
from m3lab.quant import inspector as mi
from m3lab.tinymodel import build_tiny_checkpoint

REAL_CONFIG = Path(m3lab.__file__).parent / "model_configs" / "minimax-m3.json"
H, I_SHARED, I_EXPERT, N_EXPERTS, VOCAB = 256, 128, 128, 4, 512
MOE = [0, 0, 0, 1, 1]  # the real pattern (three dense layers, then MoE), shrunk to five layers
MOE_LAYERS = [3, 4]


def real_m3_config(**text: object) -> dict:
    """The real MiniMax-M3 config.json with its sizes shrunk; `text` overrides text_config fields."""
    cfg = json.loads(REAL_CONFIG.read_text())
    tc = cfg["text_config"]
    assert "mlp_layer_types" not in tc and tc["n_shared_experts"] == 1  # the old check's blind spot
    tc.update(hidden_size=H, shared_intermediate_size=I_SHARED, intermediate_size=I_EXPERT,
              dense_intermediate_size=2 * H, num_hidden_layers=len(MOE), num_local_experts=N_EXPERTS,
              vocab_size=VOCAB, num_attention_heads=2, num_key_value_heads=1, head_dim=128, moe_layer_freq=list(MOE))
    for key in ("sparse_disable_index_value", "sparse_attention_freq"):
        tc["sparse_attention_config"][key] = list(MOE)
    for key, value in text.items():
        if value is None:
            tc.pop(key, None)
        else:
            tc[key] = value
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Quantizers: each returns {suffix: tensor} in the format's real layout.


def q_bf16(w: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"weight": w.to(torch.bfloat16)}


def q_fp8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors float-quantized, channel strategy (llm-compressor FP8_DYNAMIC weights)."""
    scale = (w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 448).to(torch.bfloat16)
    return {"weight": (w / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn), "weight_scale": scale}


def gptq_linear(w: torch.Tensor, bits: int, group: int, packing: str = "auto_round:auto_gptq",
                g_idx: bool = False) -> torch.nn.Module:
    """Symmetric RTN, packed by AutoRound's own QuantLinear: `_zp` (stores zero - 1, GPTQ v1) for
    auto_round:auto_gptq, plain (exact zeros) for auto_round / gptqmodel."""
    from auto_round_extension.torch import qlinear_torch, qlinear_torch_zp

    out, n_in = w.shape
    zero = 2 ** (bits - 1)
    groups = w.reshape(out, n_in // group, group)
    scale = (groups.abs().amax(-1).clamp(min=1e-4) / (zero - 1 if bits > 1 else 1)).half().float()  # [out, G]
    cls = qlinear_torch_zp.QuantLinear if "auto_gptq" in packing else qlinear_torch.QuantLinear
    ql = cls(bits, group, n_in, out, bias=False, g_idx=g_idx)
    ql.device = torch.device("cpu")  # qlinear_torch's 2/4/8-bit pack reads it; AutoRound's exporter sets it
    linear = torch.nn.Linear(n_in, out, bias=False)
    linear.weight.data = w.float().clone()
    ql.pack(linear, scale, torch.full_like(scale, zero))
    return ql


def q_gptq(w: torch.Tensor, bits: int, group: int, packing: str = "auto_round:auto_gptq",
           g_idx: bool = False) -> dict[str, torch.Tensor]:
    ql = gptq_linear(w, bits, group, packing, g_idx)
    parts = {"qweight": ql.qweight, "qzeros": ql.qzeros, "scales": ql.scales}
    return parts | ({"g_idx": ql.g_idx} if g_idx else {})


def awq_linear(w: torch.Tensor, group: int = 128) -> torch.nn.Module:
    """4-bit asymmetric RTN packed by AutoRound's AWQ exporter (`WQLinear_GEMM.from_linear`)."""
    from auto_round.export.export_to_awq.utils import WQLinear_GEMM

    out, n_in = w.shape
    g = w.float().reshape(out, n_in // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-4).half().float()
    zero = torch.round(-lo / scale).clamp(0, 15)
    linear = torch.nn.Linear(n_in, out, bias=False)
    linear.weight.data = w.float().clone()
    return WQLinear_GEMM.from_linear(linear, 4, group, scales=scale.t().contiguous(), zeros=zero.t().contiguous())


def q_awq(w: torch.Tensor) -> dict[str, torch.Tensor]:
    ql = awq_linear(w)
    return {"qweight": ql.qweight, "qzeros": ql.qzeros, "scales": ql.scales}


FP4_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def q_mxfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """OCP MXFP4 as AMD Quark exports it for vLLM: per 32 values one E8M0 exponent, E2M1 codes two per byte."""
    out, n_in = w.shape
    g = w.float().reshape(out, n_in // 32, 32)
    exp = torch.floor(torch.log2(g.abs().amax(-1).clamp(min=2.0**-100))) - 2  # E2M1's top exponent is 2
    x = (g / 2.0 ** exp[..., None]).clamp(-6, 6)
    mag = (x.abs()[..., None] - FP4_VALUES).abs().argmin(-1)
    codes = (mag | ((x < 0) & (mag > 0)).long() << 3).reshape(out, n_in)
    return {"weight": (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8),
            "weight_scale": (exp + 127).to(torch.uint8)}


def mxfp4_reference(parts: dict[str, torch.Tensor]) -> np.ndarray:
    b = parts["weight"].long()
    codes = torch.stack([b & 15, b >> 4], dim=-1).reshape(b.shape[0], -1)
    values = FP4_VALUES[codes & 7] * torch.where(codes & 8 > 0, -1.0, 1.0)
    return (values * 2.0 ** (parts["weight_scale"].float() - 127).repeat_interleave(32, dim=-1)).numpy()


def q_mlx(w: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor]:
    """MLX affine: per group w = scale * q + bias, q packed into uint32 by AutoRound's MLX exporter."""
    from auto_round.export.export_to_mlx.export import _pack_weight_mlx

    shape = w.shape
    g = w.float().reshape(-1, shape[-1] // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-4).half()
    bias = lo.half()
    q = torch.round((g - bias.float()[..., None]) / scale.float()[..., None]).clamp(0, 2**bits - 1).to(torch.int32)
    packed = _pack_weight_mlx(q.reshape(-1, shape[-1]), bits)
    return {"weight": packed.reshape(*shape[:-1], -1), "scales": scale.reshape(*shape[:-1], -1),
            "biases": bias.reshape(*shape[:-1], -1), "_q": q}


@dataclass
class Fmt:
    name: str
    pack: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]  # (module name, weight) -> stored parts
    config: dict  # merged into config.json

    def parts(self, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.pack(name, w).items() if not k.startswith("_")}


IGNORE = [r"re:.*lm_head$", r"re:.*embed_tokens$", r"re:.*(block_sparse_moe|mlp)\.gate$"]


def fmt_autoround(bits: int = 3, group: int = 128, overrides: dict[str, int] | None = None,
                  packing: str = "auto_round:auto_gptq") -> Fmt:
    overrides = overrides or {}
    cache: dict[tuple, dict[str, torch.Tensor]] = {}  # AutoRound's 3-bit packer is a Python loop: pack each shape once

    def pack(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        b = next((b for rx, b in overrides.items() if re.search(rx, name)), bits)
        key = (tuple(w.shape), b, bool(w.any()))
        if key not in cache:
            cache[key] = q_gptq(w, b, group, packing)
        return cache[key]

    qc = {"quant_method": "auto-round", "packing_format": packing, "bits": bits, "group_size": group, "sym": True,
          "data_type": "int", "extra_config": {rx: {"bits": b} for rx, b in overrides.items()}}
    return Fmt(f"autoround{bits}", pack, {"quantization_config": qc})


FORMATS = {
    "bf16": Fmt("bf16", lambda n, w: q_bf16(w), {}),
    "fp8": Fmt("fp8", lambda n, w: q_fp8(w), {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": IGNORE,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}}),
    "autoround3": fmt_autoround(3),
    "autoround-mixed": fmt_autoround(4, overrides={r".*shared_experts\.down_proj": 8, r".*experts\.\d+\.w[13]": 2}),
    "awq": Fmt("awq", lambda n, w: q_awq(w), {"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}}),
    "mxfp4": Fmt("mxfp4", lambda n, w: q_mxfp4(w), {"quantization_config": {
        "quant_method": "quark", "exclude": ["*lm_head", "*block_sparse_moe.gate", "*embed_tokens"],
        "global_quant_config": {
            "weight": {"dtype": "fp4", "qscheme": "per_group", "group_size": 32, "scale_format": "e8m0",
                       "is_dynamic": False, "ch_axis": -1},
            "input_tensors": {"dtype": "fp4", "qscheme": "per_group", "group_size": 32, "scale_format": "e8m0",
                              "is_dynamic": True}},
        "export": {"weight_format": "real_quantized", "pack_method": "reorder"}}}),
    "mlx4": Fmt("mlx4", lambda n, w: q_mlx(w, 4, 64), {"quantization": {"group_size": 64, "bits": 4}}),
    "mlx-mixed": Fmt("mlx-mixed", lambda n, w: q_mlx(w, 8 if "shared_experts" in n else 3, 64),
                     {"quantization": {"group_size": 64, "bits": 3} | {
                         f"language_model.model.layers.{i}.mlp.shared_experts.{p}": {"group_size": 64, "bits": 8}
                         for i in MOE_LAYERS for p in ("gate_proj", "up_proj", "down_proj")}}),
}
NATURAL_LAYOUT = {"bf16": "hub", "fp8": "hub", "autoround3": "native_unfused", "autoround-mixed": "hub",
                  "awq": "vllm", "mxfp4": "hub", "mlx4": "mlx", "mlx-mixed": "mlx"}

# ---------------------------------------------------------------------------------------------------------------
# Layouts: where each module of the model lives.

LAYOUTS = {  # layers prefix, MoE block, dense block, fused shared gate_up, routed experts, lm_head, embeddings
    "hub": ("language_model.model.layers", "block_sparse_moe", "mlp", False, "w", "language_model.lm_head",
            "language_model.model.embed_tokens"),
    "native": ("model.language_model.layers", "mlp", "mlp", True, "stacked", "lm_head",
               "model.language_model.embed_tokens"),
    "native_unfused": ("model.language_model.layers", "mlp", "mlp", False, "proj", "lm_head",
                       "model.language_model.embed_tokens"),
    "saved": ("model.language_model.layers", "block_sparse_moe", "block_sparse_moe", False, "proj", "lm_head",
              "model.language_model.embed_tokens"),
    "vllm": ("model.layers", "block_sparse_moe", "mlp", False, "w", "lm_head", "model.embed_tokens"),
    "mlx": ("language_model.model.layers", "mlp", "mlp", False, "switch", "language_model.lm_head",
            "language_model.model.embed_tokens"),
}


def model_modules(layout: str) -> dict[str, tuple[int, ...]]:
    """module name -> logical weight shape ((experts,) out, in) of the shrunk M3 text model."""
    layers, moe_block, dense_block, fused, experts, head, embed = LAYOUTS[layout]
    mods: dict[str, tuple[int, ...]] = {embed: (VOCAB, H), head: (VOCAB, H)}
    for i, moe in enumerate(MOE):
        p = f"{layers}.{i}."
        mods |= {p + "self_attn.q_proj": (256, H), p + "self_attn.k_proj": (128, H), p + "self_attn.v_proj": (128, H),
                 p + "self_attn.o_proj": (H, 256)}
        if not moe:
            b = f"{p}{dense_block}."
            mods |= {b + "gate_proj": (2 * H, H), b + "up_proj": (2 * H, H), b + "down_proj": (H, 2 * H)}
            continue
        b = f"{p}{moe_block}."
        mods[b + "gate"] = (N_EXPERTS, H)
        s = b + "shared_experts."
        mods |= {s + "gate_up_proj": (2 * I_SHARED, H)} if fused else {
            s + "gate_proj": (I_SHARED, H), s + "up_proj": (I_SHARED, H)}
        mods[s + "down_proj"] = (H, I_SHARED)
        names = {"w": ("w1", "w3", "w2"), "proj": ("gate_proj", "up_proj", "down_proj")}.get(experts)
        if names:
            for e in range(N_EXPERTS):
                mods |= {f"{b}experts.{e}.{names[0]}": (I_EXPERT, H), f"{b}experts.{e}.{names[1]}": (I_EXPERT, H),
                         f"{b}experts.{e}.{names[2]}": (H, I_EXPERT)}
        elif experts == "stacked":  # transformers' 3D parameters: keys without a `.weight` suffix
            mods |= {b + "experts.gate_up_proj": (N_EXPERTS, 2 * I_EXPERT, H),
                     b + "experts.down_proj": (N_EXPERTS, H, I_EXPERT)}
        else:  # MLX SwitchGLU
            mods |= {b + "switch_mlp.gate_proj": (N_EXPERTS, I_EXPERT, H),
                     b + "switch_mlp.up_proj": (N_EXPERTS, I_EXPERT, H),
                     b + "switch_mlp.down_proj": (N_EXPERTS, H, I_EXPERT)}
    return mods


def _shared_layer(name: str) -> int | None:
    m = re.search(r"layers\.(\d+)\..*shared_experts", name)
    return int(m[1]) if m else None


def _high_precision(name: str) -> bool:
    return bool(re.search(r"(lm_head|embed_tokens|\.gate)$", name))


def write_checkpoint(path: Path, fmt: str = "bf16", layout: str | None = None, config: dict | None = None,
                     drop: tuple[int, ...] = (), zero: tuple[int, ...] = (), seed: int = 0) -> Path:
    """A tiny M3 checkpoint. `drop`: layers whose shared expert is left out; `zero`: layers whose shared expert is
    a zero matrix, stored the way the format stores zeros (GPTQ codes equal to the zero point, and so on)."""
    f, layout = FORMATS[fmt], layout or NATURAL_LAYOUT[fmt]
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in model_modules(layout).items():
        layer = _shared_layer(name)
        if layer in drop:
            continue
        w = torch.zeros(shape) if layer in zero else 0.02 * torch.randn(shape, generator=gen)
        parts = q_bf16(w) if _high_precision(name) else f.parts(name, w)
        stacked = layout == "native" and name.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        for suffix, t in parts.items():
            tensors[name if stacked else f"{name}.{suffix}"] = t.clone()
    layers = LAYOUTS[layout][0]
    for i, moe in enumerate(MOE):
        tensors[f"{layers}.{i}.input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        if moe:
            tensors[f"{layers}.{i}.{LAYOUTS[layout][1]}.e_score_correction_bias"] = torch.zeros(N_EXPERTS)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps((config or real_m3_config()) | f.config, indent=1))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Config: MoE layers and shared experts


def test_moe_info_reads_the_real_m3_config() -> None:
    info = mi.moe_info(json.loads(REAL_CONFIG.read_text()))
    assert info.layers == list(range(3, 60)) and info.sources == ["moe_layer_freq"]
    assert (info.n_shared, info.hidden_size, info.shared_intermediate) == (1, 6144, 3072)


@pytest.mark.parametrize("config, layers, source", [
    ({"mlp_layer_types": ["dense", "sparse", "sparse"]}, [1, 2], "mlp_layer_types"),
    ({"text_config": {"moe_layer_freq": [0, 1, 0, 1]}}, [1, 3], "moe_layer_freq"),
    ({"num_hidden_layers": 6, "moe_layer_freq": 1, "first_k_dense_replace": 2}, [2, 3, 4, 5], "moe_layer_freq"),
    ({"num_hidden_layers": 6, "moe_layer_freq": 2, "first_k_dense_replace": 1}, [2, 4], "moe_layer_freq"),
    ({"num_hidden_layers": 4, "first_k_dense_replace": 1}, [1, 2, 3], "first_k_dense_replace"),
    ({"num_hidden_layers": 4, "num_experts": 8, "decoder_sparse_step": 2}, [1, 3], "decoder_sparse_step"),
    ({"num_hidden_layers": 3, "num_local_experts": 8}, [0, 1, 2], "8 experts, no layer pattern: every layer"),
    ({"num_hidden_layers": 3}, [], None),
])
def test_moe_layers_from_each_config_field(config: dict, layers: list[int], source: str | None) -> None:
    assert mi.moe_layers(config) == layers
    assert mi.moe_info(config).sources == ([source] if source else [])


def test_moe_info_conflicting_fields_are_united_and_noted() -> None:
    info = mi.moe_info({"text_config": {"moe_layer_freq": [0, 1, 1], "mlp_layer_types": ["dense", "dense", "sparse"]}})
    assert info.layers == [1, 2] and "disagree" in info.notes[0]


@pytest.mark.parametrize("fields, n_shared, size", [
    ({"n_shared_experts": 1, "shared_intermediate_size": 96, "hidden_size": 8}, 1, 96),
    ({"text_config": {"num_shared_experts": 2, "moe_intermediate_size": 48}}, 2, 96),  # DeepSeek: per expert x n
    ({"shared_expert_intermediate_size": 64}, 1, 64),  # Qwen2-MoE: no count, one shared expert of that size
    ({"n_shared_experts": 0, "shared_intermediate_size": 96}, 0, 96),
    ({"hidden_size": 8}, 0, None),
])
def test_shared_expert_count_and_size(fields: dict, n_shared: int, size: int | None) -> None:
    info = mi.moe_info(fields)
    assert (info.n_shared, info.shared_intermediate) == (n_shared, size)


# ---------------------------------------------------------------------------------------------------------------
# The shared-expert check on the real config's field names


def test_real_config_intact_passes(tmp_path: Path) -> None:
    check = mi.check_shared_experts(write_checkpoint(tmp_path / "ok"))
    assert check.passed and check.moe_layers == MOE_LAYERS and check.sources == ["moe_layer_freq"]
    assert check.expected == {"gate": [I_SHARED, H], "up": [I_SHARED, H], "down": [H, I_SHARED]}
    assert all(check.layers[layer]["ok"] for layer in MOE_LAYERS)


def test_real_config_shared_experts_removed_fails_naming_the_layers(tmp_path: Path) -> None:
    check = mi.check_shared_experts(write_checkpoint(tmp_path / "removed", drop=(3, 4)))
    assert not check.passed and check.failing_layers == [3, 4]
    assert any("layer 3: shared expert gate projection missing" in f for f in check.failures)
    assert any("layer 4: shared expert down projection missing" in f for f in check.failures)


def test_real_config_shared_experts_zeroed_fails_naming_the_layers(tmp_path: Path) -> None:
    check = mi.check_shared_experts(write_checkpoint(tmp_path / "zeroed", zero=(4,)))
    assert not check.passed and check.failing_layers == [4] and check.layers[3]["ok"]
    assert len(check.failures) == 3 and all("layer 4" in f and "all zero" in f for f in check.failures)


def test_wrong_shape_fails(tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / "t")
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["shared_intermediate_size"] = 2 * I_SHARED  # the weights no longer fit the config
    (d / "config.json").write_text(json.dumps(cfg))
    check = mi.check_shared_experts(d)
    assert check.failing_layers == MOE_LAYERS
    assert f"has logical shape [{I_SHARED}, {H}], expected [{2 * I_SHARED}, {H}]" in check.failures[0]


def test_shared_experts_expected_but_no_moe_layers_in_config_fails(tmp_path: Path) -> None:
    cfg = real_m3_config(moe_layer_freq=None, num_local_experts=None)
    check = mi.check_shared_experts(write_checkpoint(tmp_path / "t", config=cfg))
    assert not check.passed and check.moe_layers == []
    assert "no MoE layers found in config" in check.failures[0]


def test_passes_vacuously_only_when_config_declares_no_shared_experts(tmp_path: Path) -> None:
    cfg = real_m3_config(n_shared_experts=0, shared_intermediate_size=None)
    check = mi.check_shared_experts(write_checkpoint(tmp_path / "t", config=cfg, drop=(3, 4)))
    assert check.passed and check.layers == {} and "declares no shared experts" in check.notes[0]
    stored = mi.check_shared_experts(write_checkpoint(tmp_path / "s", config=cfg, zero=(3,)))
    assert stored.passed and "layers [3, 4] store shared-expert tensors" in stored.notes[0]  # card 002's trap


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_key_layout(tmp_path: Path, layout: str) -> None:
    assert mi.check_shared_experts(write_checkpoint(tmp_path / "ok", layout=layout)).passed
    bad = mi.check_shared_experts(write_checkpoint(tmp_path / "bad", layout=layout, zero=(3,)))
    assert bad.failing_layers == [3]
    removed = mi.check_shared_experts(write_checkpoint(tmp_path / "removed", layout=layout, drop=(4,)))
    assert removed.failing_layers == [4]


def test_fused_gate_up_with_only_the_up_half_zeroed_fails(tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / "t", layout="native")
    from safetensors.torch import load_file
    tensors = load_file(str(d / "model.safetensors"))
    key = "model.language_model.layers.4.mlp.shared_experts.gate_up_proj.weight"
    tensors[key][I_SHARED:] = 0
    save_file(tensors, str(d / "model.safetensors"))
    check = mi.check_shared_experts(d)
    assert check.failing_layers == [4] and len(check.failures) == 1 and "shared expert up " in check.failures[0]
    assert check.layers[3]["tensors"]["gate"]["shape"] == [2 * I_SHARED, H]


def test_vision_and_mtp_shared_experts_are_not_language_layers(tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / "t")
    from safetensors.torch import load_file
    tensors = load_file(str(d / "model.safetensors"))
    tensors["mtp.layers.3.block_sparse_moe.shared_experts.gate_proj.weight"] = torch.zeros(I_SHARED, H).bfloat16()
    tensors["vision_tower.encoder.layers.4.mlp.shared_experts.up_proj.weight"] = torch.zeros(I_SHARED, H).bfloat16()
    save_file(tensors, str(d / "model.safetensors"))
    assert mi.check_shared_experts(d).passed


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "bf16"])
def test_every_format_intact_zeroed_removed(tmp_path: Path, fmt: str) -> None:
    ok = mi.check_shared_experts(write_checkpoint(tmp_path / "ok", fmt))
    assert ok.passed, ok.failures
    assert all(t["format"] != "bf16" for t in ok.layers[3]["tensors"].values())
    zeroed = mi.check_shared_experts(write_checkpoint(tmp_path / "zeroed", fmt, zero=(3, 4)))
    assert zeroed.failing_layers == MOE_LAYERS and all("all zero (dequantized)" in f for f in zeroed.failures)
    removed = mi.check_shared_experts(write_checkpoint(tmp_path / "removed", fmt, drop=(4,)))
    assert removed.failing_layers == [4] and all("missing" in f for f in removed.failures)


def _rewrite(d: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    from safetensors.torch import load_file
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))
    return d


def test_gptq_qweight_of_zero_bytes_is_not_a_zero_weight(tmp_path: Path) -> None:
    """Packed codes 0 with zero point 4 (3-bit symmetric, stored as 3 in GPTQ v1) decode to -4 * scale."""
    def zero_qweight(t: dict[str, torch.Tensor]) -> None:
        for k in t:
            if "layers.3." in k and "shared_experts" in k and k.endswith("qweight"):
                t[k] = torch.zeros_like(t[k])

    assert mi.check_shared_experts(_rewrite(write_checkpoint(tmp_path / "t", "autoround3"), zero_qweight)).passed

    def zero_scales(t: dict[str, torch.Tensor]) -> None:
        for k in t:
            if "layers.3." in k and "shared_experts.down_proj" in k and k.endswith("scales"):
                t[k] = torch.zeros_like(t[k])

    check = mi.check_shared_experts(_rewrite(write_checkpoint(tmp_path / "s", "autoround3"), zero_scales))
    assert check.failing_layers == [3] and "down" in check.failures[0]


def test_mlx_zero_codes_with_biases_are_not_zero(tmp_path: Path) -> None:
    def zero_codes(t: dict[str, torch.Tensor]) -> None:
        for k in [k for k in t if "layers.4." in k and "shared_experts.up_proj" in k]:
            if k.endswith(".weight"):
                t[k] = torch.zeros_like(t[k])
            if k.endswith(".biases"):
                t[k] = torch.full_like(t[k], 0.01)

    assert mi.check_shared_experts(_rewrite(write_checkpoint(tmp_path / "t", "mlx4"), zero_codes)).passed


def test_fp8_negative_zero_bytes_are_zero(tmp_path: Path) -> None:
    def neg_zero(t: dict[str, torch.Tensor]) -> None:
        k = "language_model.model.layers.3.block_sparse_moe.shared_experts.gate_proj.weight"
        t[k] = torch.full(t[k].shape, 0x80, dtype=torch.uint8).view(torch.float8_e4m3fn)

    check = mi.check_shared_experts(_rewrite(write_checkpoint(tmp_path / "t", "fp8"), neg_zero))
    assert check.failing_layers == [3] and "gate" in check.failures[0]


def test_nan_scales_fail(tmp_path: Path) -> None:
    def nan_scale(t: dict[str, torch.Tensor]) -> None:
        t["language_model.model.layers.4.block_sparse_moe.shared_experts.up_proj.weight_scale"][0] = 255  # E8M0 NaN

    check = mi.check_shared_experts(_rewrite(write_checkpoint(tmp_path / "t", "mxfp4"), nan_scale))
    assert check.failing_layers == [4] and "NaN" in check.failures[0]


# ---------------------------------------------------------------------------------------------------------------
# Detectors: each fires on its format and on no other


def _sample_dir(tmp_path: Path) -> Path:
    w = 0.02 * torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    samples = {"dense": q_bf16(w), "scaled8": q_fp8(w), "gptq": q_gptq(w, 4, 128, g_idx=True), "awq": q_awq(w),
               "quark-mx": q_mxfp4(w), "mlx": {k: v for k, v in q_mlx(w, 4, 64).items() if k != "_q"},
               "ct-packed": {"weight_packed": q_mxfp4(w)["weight"], "weight_global_scale": torch.ones(1),
                             "weight_scale": torch.ones(128, 16).to(torch.float8_e4m3fn),
                             "weight_shape": torch.tensor([128, 256])}}
    tensors = {f"model.layers.0.{fam}.{s}": t for fam, parts in samples.items() for s, t in parts.items()}
    tensors["model.layers.0.norm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    tensors["model.layers.0.mlp.e_score_correction_bias"] = torch.zeros(4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = {"quantization_config": {"quant_method": "auto-round", "bits": 4, "group_size": 128},
              "quantization": {"bits": 4, "group_size": 64}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("detector", list(mi.DETECTORS))
def test_each_detector_fires_on_its_format_only(tmp_path: Path, detector: str) -> None:
    config, mods, _ = mi.scan(_sample_dir(tmp_path))
    assert sorted(mods) == sorted(f"model.layers.0.{fam}" for fam in mi.DETECTORS)  # norms and buffers: no module
    groups = mi.group_tensors(mi.read_header(tmp_path / "model.safetensors"))
    q = mi.QuantConfig(config)
    for fam in mi.DETECTORS:
        got = mi.DETECTORS[detector](f"model.layers.0.{fam}", groups[f"model.layers.0.{fam}"], q)
        assert (got is not None) == (fam == detector), (detector, fam)
        if got is not None:
            assert got.shape == (128, 256) and got.problem is None and got.family == detector


def test_unknown_format_is_a_problem(tmp_path: Path) -> None:
    save_file({"model.layers.0.mlp.down_proj.qweight": torch.zeros(16, 64, dtype=torch.int32)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    report = mi.inspect(tmp_path)
    assert not report["passed"] and "unrecognised format" in report["problems"][0]


# ---------------------------------------------------------------------------------------------------------------
# Dequantization against the formats' own code


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("packing, g_idx", [("auto_round:auto_gptq", False), ("auto_round", True),
                                            ("auto_round:gptqmodel", True)])
def test_gptq_dequantize_matches_autoround_kernel(tmp_path: Path, bits: int, packing: str, g_idx: bool) -> None:
    w = 0.02 * torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))
    ql = gptq_linear(w, bits, 128, packing, g_idx)
    parts = {"qweight": ql.qweight, "qzeros": ql.qzeros, "scales": ql.scales} | ({"g_idx": ql.g_idx} if g_idx else {})
    save_file({f"m.proj.{k}": v for k, v in parts.items()}, str(tmp_path / "model.safetensors"))
    qc = {"quant_method": "auto-round", "packing_format": packing, "bits": bits, "group_size": 128}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    m = mi.scan(tmp_path)[1]["m.proj"]
    assert m.shape == (64, 256) and m.bits == bits and m.zero_offset == (1 if "auto_gptq" in packing else 0)
    with torch.no_grad():
        oracle = ql.float()(torch.eye(256)).T.numpy()  # the kernel's own dequantized weight
    np.testing.assert_allclose(mi.dequantize(m), oracle, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(mi.dequantize(m), w.numpy(), atol=float(ql.scales.float().max()) / 2 + 1e-6)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_mlx_dequantize_matches_affine_reference(tmp_path: Path, bits: int) -> None:
    w = 0.02 * torch.randn(2, 64, 256, generator=torch.Generator().manual_seed(bits))  # stacked, as switch_mlp
    parts = q_mlx(w, bits, 64)
    q = parts.pop("_q").reshape(2, 64, 4, 64).float()
    save_file({f"m.switch_mlp.up_proj.{k}": v for k, v in parts.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization": {"bits": bits, "group_size": 64}}))
    m = mi.scan(tmp_path)[1]["m.switch_mlp.up_proj"]
    assert m.shape == (2, 64, 256) and m.label == f"mlx int{bits} g64"
    ref = q * parts["scales"].float()[..., None] + parts["biases"].float()[..., None]
    np.testing.assert_allclose(mi.dequantize(m), ref.reshape(2, 64, 256).numpy(), rtol=1e-6, atol=1e-7)


def test_awq_dequantize_matches_autoround_reference(tmp_path: Path) -> None:
    from auto_round.export.export_to_awq.utils import dequantize_gemm

    w = 0.02 * torch.randn(64, 256, generator=torch.Generator().manual_seed(5))
    ql = awq_linear(w)
    save_file({f"m.o_proj.{k}": getattr(ql, k) for k in ("qweight", "qzeros", "scales")},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    m = mi.scan(tmp_path)[1]["m.o_proj"]
    assert (m.family, m.shape, m.label) == ("awq", (64, 256), "awq int4 g128")
    oracle = dequantize_gemm(ql.qweight, ql.qzeros, ql.scales, 4, 128).float().T.numpy()
    np.testing.assert_allclose(mi.dequantize(m), oracle, rtol=1e-3, atol=1e-6)


def test_mxfp4_and_fp8_dequantize(tmp_path: Path) -> None:
    w = 0.02 * torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    mx, f8 = q_mxfp4(w), q_fp8(w)
    save_file({f"a.{k}": v for k, v in mx.items()} | {f"b.{k}": v for k, v in f8.items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    mods = mi.scan(tmp_path)[1]
    np.testing.assert_array_equal(mi.dequantize(mods["a"]), mxfp4_reference(mx))
    np.testing.assert_allclose(mi.dequantize(mods["a"]), w.numpy(), atol=0.3 * float(w.abs().max()))
    ref = (f8["weight"].float() * f8["weight_scale"].float()).numpy()
    np.testing.assert_array_equal(mi.dequantize(mods["b"]), ref)


# ---------------------------------------------------------------------------------------------------------------
# Bits per weight: known answers


def _single(tmp_path: Path, parts: dict[str, dict[str, torch.Tensor]], config: dict) -> dict:
    save_file({f"{m}.{s}": t for m, p in parts.items() for s, t in p.items() if not s.startswith("_")},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return mi.inspect(tmp_path)


def test_bpw_gptq_3bit_group128(tmp_path: Path) -> None:
    w = 0.02 * torch.randn(256, 256)
    r = _single(tmp_path, {"model.layers.0.self_attn.q_proj": q_gptq(w, 3, 128, g_idx=True)},
                {"quantization_config": {"quant_method": "gptq", "bits": 3, "group_size": 128}})
    # per weight: 3 bits of qweight, a 3-bit zero and an fp16 scale per 128 inputs, an int32 g_idx per input
    # column shared by the 256 outputs: 3 + 3/128 + 16/128 + 32/256 = 3.2734375
    assert r["bits_per_weight"] == 3 + 3 / 128 + 16 / 128 + 32 / 256 == 3.2734375
    assert r["formats"] == {"gptq int3 g128": {"modules": 1, "bits_per_weight": 3.2734375}}
    assert r["weight_params"] == 256 * 256  # qweight, qzeros, scales, g_idx:
    assert r["weight_stored_bytes"] == 24 * 256 * 4 + 2 * 24 * 4 + 2 * 256 * 2 + 256 * 4


def test_bpw_gptq_mixed_2_4_8(tmp_path: Path) -> None:
    w = 0.02 * torch.randn(128, 256)
    names = {b: f"model.layers.{i}.mlp.down_proj" for i, b in enumerate((2, 4, 8))}
    qc = {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", "bits": 4, "group_size": 128,
          "extra_config": {names[2]: {"bits": 2}, r".*layers\.2\..*": {"bits": 8}}}
    r = _single(tmp_path, {n: q_gptq(w, b, 128) for b, n in names.items()}, {"quantization_config": qc})
    per = {b: b + (b + 16) / 128 for b in (2, 4, 8)}  # codes, plus a b-bit zero and an fp16 scale per group of 128
    assert r["formats"] == {f"autoround int{b} g128": {"modules": 1, "bits_per_weight": per[b]}
                            for b in (2, 4, 8)}
    assert r["bits_per_weight"] == pytest.approx(sum(per.values()) / 3, abs=1e-6)


def test_bpw_mxfp4_mlx_fp8_bf16(tmp_path: Path) -> None:
    w = 0.02 * torch.randn(128, 256)
    cases = [({"m.a": q_mxfp4(w)}, {}, 4 + 8 / 32),  # E2M1 codes + one E8M0 byte per 32
             ({"m.a": q_mlx(w, 4, 64)}, {"quantization": {"bits": 4, "group_size": 64}}, 4 + 32 / 64),  # fp16 s, b
             ({"m.a": q_mlx(w, 3, 64)}, {"quantization": {"bits": 3, "group_size": 64}}, 3 + 32 / 64),
             ({"m.a": q_fp8(w)}, {}, 8 + 16 / 256),  # one bf16 scale per output row of 256 inputs
             ({"m.a": q_bf16(w), "m.b": q_bf16(w)}, {}, 16.0)]
    for i, (parts, cfg, want) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        assert _single(d, parts, cfg)["bits_per_weight"] == want


def test_report_on_a_quantized_checkpoint(tmp_path: Path) -> None:
    r = mi.inspect(write_checkpoint(tmp_path / "t", "autoround-mixed"))
    json.dumps(r)  # JSON-able
    assert r["passed"] and r["quantized"] and r["quant_method"] == "auto-round"
    c = r["classes"]
    assert c["shared experts"]["formats"] == {"autoround int4 g128": 4, "autoround int8 g128": 2}
    assert c["routed experts"]["formats"] == {"autoround int2 g128": 16, "autoround int4 g128": 8}
    assert c["attention"]["formats"] == {"autoround int4 g128": 20}
    assert c["lm_head"]["formats"] == c["embeddings"]["formats"] == {"bf16": 1}
    assert c["router"]["formats"] == {"bf16": 2} and r["excluded"]["by_class"] == {
        "embeddings": 1, "lm_head": 1, "router": 2}
    assert c["attention"]["bits_per_weight"] == 4 + 20 / 128
    assert r["shared_expert_check"]["layers"]["3"]["tensors"]["down"]["format"] == "autoround int8 g128"
    text = mi.format_report(r)
    assert "result: PASS" in text and "layer 4: ok" in text and "routed experts" in text


def test_activations_and_m3labs_own_report_file(tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / "fp8", "fp8")
    r = mi.inspect(d)
    assert r["quant_method"] == "compressed-tensors" and r["activations"] == "dynamic"
    assert "quantization: compressed-tensors (dynamic activations)" in mi.format_report(r)
    assert mi.inspect(write_checkpoint(tmp_path / "gptq", "autoround3"))["activations"] is None
    (d / mi.REPORT_NAME).write_text("{}")  # what the quantize stage writes next to the weights: not the checkpoint
    again = mi.inspect(d)
    assert (again["size_bytes"], again["files"]) == (r["size_bytes"], r["files"])


# ---------------------------------------------------------------------------------------------------------------
# Errors, CLI, and the embedded tiny model


def test_clear_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(mi.InspectError, match=re.escape(str(tmp_path / "config.json"))):
        mi.inspect(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(mi.InspectError, match=f"no \\*.safetensors files in {re.escape(str(tmp_path))}"):
        mi.inspect(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(mi.InspectError, match="model.safetensors: unreadable safetensors header"):
        mi.inspect(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(mi.InspectError, match="exceeds the file size"):
        mi.inspect(tmp_path)
    header = json.dumps({"x.weight": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(mi.InspectError, match="ends past the end of the file"):
        mi.inspect(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shard-2.safetensors"}}))
    with pytest.raises(mi.InspectError, match="shard-2.safetensors"):
        mi.inspect(tmp_path)


def test_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert mi.main([str(write_checkpoint(tmp_path / "ok", "mxfp4"))]) == 0
    assert "shared-expert check: PASS" in capsys.readouterr().out
    assert mi.main([str(write_checkpoint(tmp_path / "bad", "mxfp4", zero=(3,))), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["shared_expert_check"]["failing_layers"] == [3]
    assert mi.main([str(tmp_path / "nothing")]) == 2
    assert "nothing is not a folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("embedded") / "vl")


def test_embedded_tiny_model_passes(embedded: Path) -> None:
    r = mi.inspect(embedded)
    assert r["passed"] and r["bits_per_weight"] == 16.0 and not r["quantized"] and r["excluded"]["count"] == 0
    assert r["shared_expert_check"]["moe_layers"] == [1, 2, 3]
    assert set(r["classes"]) == {"attention", "dense mlp", "embeddings", "indexer", "lm_head", "routed experts",
                                 "router", "shared experts", "vision"}


def test_embedded_tiny_model_with_a_zeroed_shared_expert_fails(embedded: Path, tmp_path: Path) -> None:
    d = tmp_path / "zeroed"
    shutil.copytree(embedded, d)

    def zero(t: dict[str, torch.Tensor]) -> None:
        k = "language_model.model.layers.2.block_sparse_moe.shared_experts.up_proj.weight"
        t[k] = torch.zeros_like(t[k])

    r = mi.inspect(_rewrite(d, zero))
    check = r["shared_expert_check"]
    assert not r["passed"] and check["failing_layers"] == [2] and "shared expert up" in check["failures"][0]
    assert "layer 2: FAIL" in mi.format_report(r)


# ---------------------------------------------------------------------------------------------------------------
# Real quantizers on the embedded model


def test_real_autoround_checkpoint(embedded: Path, tmp_path: Path) -> None:
    """AutoRound RTN (iters=0), 3-bit group 128 with the shared down_proj at 8 bits, exported as auto_round
    (auto_round:auto_gptq packing, fused shared gate_up as in card 002's checkpoint)."""
    pytest.importorskip("auto_round")
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from m3lab.checkpoint import text_only

    text = text_only(embedded, tmp_path / "text", "transformers")
    model = AutoModelForCausalLM.from_pretrained(text, dtype="auto")
    ar = AutoRound(model, AutoTokenizer.from_pretrained(text), bits=3, group_size=128, sym=True, iters=0,
                   disable_opt_rtn=True, layer_config={"model.layers.1.mlp.shared_experts.down_proj": {"bits": 8}})
    ar.quantize_and_save(str(tmp_path / "ar"), format="auto_round")
    (out,) = [p.parent for p in (tmp_path / "ar").rglob("config.json")]
    r = mi.inspect(out)
    assert r["passed"], r["problems"] + r["shared_expert_check"]["failures"]
    tensors = r["shared_expert_check"]["layers"]["1"]["tensors"]
    assert tensors["gate"]["module"].endswith("shared_experts.gate_up_proj")
    assert tensors["down"]["format"] == "autoround int8 g128" and tensors["up"]["format"] == "autoround int3 g128"
    assert r["classes"]["routed experts"]["bits_per_weight"] == pytest.approx(3 + 19 / 128)

    def zero_scales(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.2.mlp.shared_experts.down_proj.scales"].zero_()

    check = mi.check_shared_experts(_rewrite(out, zero_scales))
    assert check.failing_layers == [2] and "down" in check.failures[0]


def test_real_llmcompressor_fp8_checkpoint(embedded: Path, tmp_path: Path) -> None:
    pytest.importorskip("llmcompressor")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import MiniMaxM3SparseForConditionalGeneration

    model = MiniMaxM3SparseForConditionalGeneration.from_pretrained(embedded, dtype="auto")
    ignore = [r"re:.*lm_head$", r"re:.*vision_tower.*", r"re:.*multi_modal_projector.*", r"re:.*patch_merge_mlp.*",
              r"re:.*(block_sparse_moe|mlp)\.gate$", r"re:.*self_attn\.index(_|er\.).*"]
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore))
    model.save_pretrained(tmp_path / "fp8")
    r = mi.inspect(tmp_path / "fp8")
    assert r["passed"] and r["quant_method"] == "compressed-tensors"
    assert r["classes"]["shared experts"]["formats"] == {"fp8_e4m3 channel": 9}
    scale_bits = 16 * (6 * 128 + 3 * 256)  # one bf16 scale per output row: 6 gate/up of 128 rows, 3 down of 256
    assert r["classes"]["shared experts"]["bits_per_weight"] == pytest.approx(8 + scale_bits / (9 * 32768))
    assert set(r["excluded"]["by_class"]) == {"embeddings", "indexer", "lm_head", "router", "vision"}


def test_gptqmodel_dynamic_and_mlx_per_module_overrides(tmp_path: Path) -> None:
    w = 0.02 * torch.randn(128, 256)
    qc = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 128,
          "dynamic": {r"+:.*\.down_proj": {"bits": 8}, r"-:.*lm_head": {}}}
    (tmp_path / "gptq").mkdir()
    r = _single(tmp_path / "gptq", {"l.mlp.up_proj": q_gptq(w, 4, 128), "l.mlp.down_proj": q_gptq(w, 8, 128),
                                    "lm_head": q_bf16(w)}, {"quantization_config": qc})
    assert r["classes"]["dense mlp"]["formats"] == {"gptq int4 g128": 1, "gptq int8 g128": 1}
    assert r["declared_exclusions"] == [r"-:.*lm_head"] and r["excluded"]["modules"] == ["lm_head"]
    mlx = {"bits": 4, "group_size": 64, "l.mlp.down_proj": {"bits": 8, "group_size": 32}, "lm_head": False}
    (tmp_path / "mlx").mkdir()
    r = _single(tmp_path / "mlx", {"l.mlp.up_proj": q_mlx(w, 4, 64), "l.mlp.down_proj": q_mlx(w, 8, 32),
                                   "lm_head": q_bf16(w)}, {"quantization": mlx})
    assert r["classes"]["dense mlp"]["formats"] == {"mlx int4 g64": 1, "mlx int8 g32": 1}
    assert r["quant_method"] == "mlx" and r["declared_exclusions"] == ["lm_head"]
    assert r["excluded"]["modules"] == ["lm_head"] and r["passed"]
