"""Checkpoint inspection: what a checkpoint folder stores, at how many bits, and whether its shared experts are real.

The story. AutoRound card 002's checkpoint served garbage because every MoE layer's shared expert loaded as zeros,
and nothing complained. This module looks at any checkpoint folder the way a careful reader would:

1. **Config.** `moe_info(config)` finds the MoE layers from whichever fields exist (M3's `moe_layer_freq` list,
   `mlp_layer_types`, DeepSeek's int `moe_layer_freq` + `first_k_dense_replace`, Qwen's `decoder_sparse_step`),
   at the top level or under `text_config`, plus how many shared experts the model expects and their size.
2. **Headers.** Every `*.safetensors` header is parsed as JSON (never the whole file; M3 is 200-800 GB). Tensors are
   grouped by module (`...q_proj.qweight`, `.qzeros`, `.scales` are one module) and one detector per stored format
   recognises the module and computes its *logical* (out, in) shape and its stored bytes:
     dense      bf16 / fp16 / fp32 `weight`
     scaled8    `weight` F8_E4M3/F8_E5M2/I8 + `weight_scale` (compressed-tensors, Quark FP8) or `weight_scale_inv`
     gptq       `qweight` I32 [in*bits/32, out] + `qzeros` + `scales` [+ `g_idx`] (GPTQ, GPTQModel, AutoRound); bits
                from `quantization_config`, per module from AutoRound's `extra_config` or GPTQModel's `dynamic`
     awq        `qweight` I32 [in, out*bits/32] (packed along the outputs, AWQ slot order) + `qzeros` + `scales`
     quark-mx   `weight` U8 [out, in/2] (two FP4 E2M1 per byte, low nibble first) + `weight_scale` U8 E8M0 [out, in/32]
     mlx        `weight` U32 [out, in*bits/32] + `scales` + `biases` (affine), or + U8 `scales` (mxfp4/mxfp8/nvfp4
                modes); bits/group from config `quantization`, incl. per-module entries and `false`
     ct-packed  compressed-tensors `weight_packed` (int4 pack-quantized, nvfp4, mxfp4) [+ `weight_shape`]
   Bits per weight = stored bits of every weight tensor and its quantization tensors (scales, zeros, g_idx,
   biases, global scales) / logical parameters. Norms, biases and activation/KV scales are not weights.
3. **Shared experts.** `check_shared_experts(dir)` takes each MoE layer and finds its shared expert under any
   layout (`...layers.N.{mlp,block_sparse_moe}.shared_expert(s)|shared_mlp.{gate,up,down}_proj|w1/w3/w2`, fused
   `gate_up_proj`), checks the logical shape against (shared_intermediate x hidden), and dequantizes it, one module
   at a time, to see it is not all zero: GPTQ as (q - z) * s, MLX as q * s + b, FP4 through its code table. It passes
   vacuously only when the config says there are no shared experts.
4. **Report.** `inspect(dir)` returns a JSON-able dict; `format_report` renders it; `main(argv)` is `m3lab inspect
   DIR` and returns 1 when a check fails (2 when the folder cannot be read).
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["REPORT_NAME", "InspectError", "TensorInfo", "Module", "MoeInfo", "QuantConfig", "SharedExpertCheck",
           "DETECTORS", "moe_info", "moe_layers", "read_header", "load", "to_float", "unpack_bits", "group_tensors",
           "scan", "module_class", "dequantize", "check_shared_experts", "shared_expert_weights", "inspect",
           "format_report", "main"]


# m3lab's own report about a folder it wrote (m3lab.quant.core): not part of the checkpoint, not counted in its size
REPORT_NAME = "quant_report.json"


class InspectError(RuntimeError):
    """The folder cannot be inspected; the message names the path."""


# ---------------------------------------------------------------------------------------------------------------
# Config: MoE layers and shared experts

_TEXT_KEYS = ("text_config", "language_config", "llm_config")


def _text(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's fields: the top level, overridden by a nested text config."""
    merged = dict(config)
    for key in _TEXT_KEYS:
        if isinstance(config.get(key), dict):
            merged.update(config[key])
    return merged


@dataclass
class MoeInfo:
    layers: list[int]
    sources: list[str]  # the config fields the layers came from
    n_shared: int  # shared experts per MoE layer the config asks for (0: none)
    hidden_size: int | None
    shared_intermediate: int | None  # rows of the shared gate/up projections
    notes: list[str] = field(default_factory=list)


def moe_info(config: dict[str, Any]) -> MoeInfo:
    tc, notes = _text(config), []
    n = tc.get("num_hidden_layers")
    found: dict[str, list[int]] = {}
    freq, first_k = tc.get("moe_layer_freq"), tc.get("first_k_dense_replace")
    if isinstance(freq, list):
        found["moe_layer_freq"] = [i for i, v in enumerate(freq) if v]
        if n is not None and len(freq) != n:
            notes.append(f"moe_layer_freq has {len(freq)} entries, num_hidden_layers is {n}")
    elif isinstance(freq, int) and freq > 0 and n:  # DeepSeek: every freq-th layer from first_k_dense_replace on
        found["moe_layer_freq"] = [i for i in range(n) if i >= (first_k or 0) and i % freq == 0]
    elif isinstance(first_k, int) and n:
        found["first_k_dense_replace"] = list(range(first_k, n))
    if isinstance(tc.get("mlp_layer_types"), list):
        found["mlp_layer_types"] = [i for i, t in enumerate(tc["mlp_layer_types"])
                                    if str(t).lower() in ("sparse", "moe")]
    n_experts = next((tc[k] for k in ("num_local_experts", "n_routed_experts", "num_experts") if tc.get(k)), 0)
    if not found and n_experts and n:
        step, only = tc.get("decoder_sparse_step"), set(tc.get("mlp_only_layers") or [])
        src = "decoder_sparse_step" if step else f"{n_experts} experts, no layer pattern: every layer"
        found[src] = [i for i in range(n) if i not in only and (i + 1) % (step or 1) == 0]
    if len({tuple(v) for v in found.values()}) > 1:
        notes.append("config fields disagree on the MoE layers: " + "; ".join(f"{k}={v}" for k, v in found.items())
                     + " (checking their union)")
    layers = sorted(set().union(*found.values())) if found else []

    count = next((tc[k] for k in ("n_shared_experts", "num_shared_experts") if k in tc), None)
    size = next((tc[k] for k in ("shared_intermediate_size", "shared_expert_intermediate_size") if tc.get(k)), None)
    if count is None and size:
        count = 1
        notes.append("no n_shared_experts in config, but a shared-expert size: expecting 1 shared expert")
    count = int(count or 0)
    if size is None and count:
        per = tc.get("moe_intermediate_size") or tc.get("intermediate_size")
        size = per * count if per else None
    return MoeInfo(layers, list(found), count, tc.get("hidden_size"), size, notes)


def moe_layers(config: dict[str, Any]) -> list[int]:
    """MoE layer indices from whichever config fields exist (see `moe_info`)."""
    return moe_info(config).layers


# ---------------------------------------------------------------------------------------------------------------
# safetensors headers and raw tensors


@dataclass(frozen=True)
class TensorInfo:
    key: str
    path: Path
    dtype: str  # safetensors dtype: BF16, F8_E4M3, I32, U32, U8, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


_NP = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "F8_E4M3": "u1", "F8_E5M2": "u1", "F8_E8M0": "u1",
       "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
       "BOOL": "u1"}
_FLOAT_NAME = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64"}


def read_header(path: Path) -> dict[str, TensorInfo]:
    """key -> TensorInfo from one file's JSON header; reads no tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        out = {}
        for key, e in header.items():
            if key == "__metadata__":
                continue
            begin, end = (int(x) for x in e["data_offsets"])
            if 8 + n + end > size:
                raise ValueError(f"tensor {key!r} ends past the end of the file (truncated?)")
            out[key] = TensorInfo(key, path, str(e["dtype"]), tuple(int(s) for s in e["shape"]), 8 + n + begin,
                                  end - begin)
        return out
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise InspectError(f"{path}: unreadable safetensors header: {type(e).__name__}: {e}") from e


def load(t: TensorInfo) -> np.ndarray:
    """The stored elements as numpy (bf16 as uint16 bits, fp8/e8m0 as uint8 codes)."""
    if t.dtype not in _NP:
        raise InspectError(f"{t.path}: {t.key} has dtype {t.dtype}, which inspect cannot read")
    dt = np.dtype(_NP[t.dtype])
    return np.fromfile(t.path, dtype=dt, count=t.nbytes // dt.itemsize, offset=t.offset).reshape(t.shape)


def _minifloat_table(exp: int, man: int, bias: int) -> np.ndarray:
    """All 2**(1+exp+man) values of a sign/exponent/mantissa code, subnormals included."""
    codes = np.arange(2 ** (1 + exp + man))
    e, m = (codes >> man) & (2**exp - 1), codes & (2**man - 1)
    mag = np.where(e == 0, m / 2**man * 2.0 ** (1 - bias), (1 + m / 2**man) * 2.0 ** (e.astype(float) - bias))
    return np.where(codes >> (exp + man), -mag, mag).astype(np.float32)


_E4M3 = _minifloat_table(4, 3, 7)
_E4M3[[0x7F, 0xFF]] = np.nan  # e4m3fn: no infinities, one NaN per sign
_E5M2 = _minifloat_table(5, 2, 15)
_E5M2[0x7C:0x80], _E5M2[0xFC:] = [np.inf] + [np.nan] * 3, [-np.inf] + [np.nan] * 3
_FP4 = _minifloat_table(2, 1, 1)  # E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives
_E8M0 = np.where(np.arange(256) == 255, np.nan, 2.0 ** (np.arange(256) - 127.0)).astype(np.float32)
_CODES = {"F8_E4M3": _E4M3, "F8_E5M2": _E5M2, "F8_E8M0": _E8M0}


def to_float(t: TensorInfo, e8m0_u8: bool = False) -> np.ndarray:
    """float32 values of a stored tensor; `e8m0_u8` reads a U8 tensor as E8M0 scales (Quark, MLX mx modes)."""
    a = load(t)
    if t.dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    if t.dtype in _CODES or (e8m0_u8 and t.dtype == "U8"):
        return _CODES.get(t.dtype, _E8M0)[a]
    return a.astype(np.float32)


def unpack_bits(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Values packed as a little-endian bit stream along the last axis (GPTQ, MLX, compressed-tensors all pack
    this way, also across word boundaries at 3/5/6 bits): value k is bits [k*bits, (k+1)*bits)."""
    stream = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1, bitorder="little")
    stream = stream[..., : count * bits].reshape(*stream.shape[:-1], count, bits)
    out = np.zeros(stream.shape[:-1], dtype=np.int32)
    for j in range(bits):
        out |= stream[..., j].astype(np.int32) << j
    return out


def _expand(s: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Broadcast a per-tensor / per-channel / per-group / per-block scale to the weight's shape."""
    s = s.reshape(s.shape or (1,))
    s = s.reshape((1,) * (len(shape) - s.ndim) + s.shape)
    for ax, size in enumerate(shape):
        if s.shape[ax] != size:
            s = np.repeat(s, -(-size // s.shape[ax]), axis=ax).take(range(size), axis=ax)
    return s


# ---------------------------------------------------------------------------------------------------------------
# Modules and format detectors

_WEIGHT = ("weight", "qweight", "weight_packed")
_QUANT = ("qzeros", "scales", "biases", "g_idx", "weight_scale", "weight_scale_inv", "weight_zero_point",
          "weight_global_scale", "weight_g_idx", "weight_shape")
_NOT_WEIGHT = ("bias", "input_scale", "input_global_scale", "input_zero_point", "output_scale", "k_scale", "v_scale")


@dataclass
class Module:
    name: str
    family: str  # dense | scaled8 | gptq | awq | quark-mx | mlx | ct-packed | unknown
    label: str  # e.g. "bf16", "fp8_e4m3 channel", "autoround int3 g128", "mlx int4 g64"
    shape: tuple[int, ...]  # logical, before packing: (out, in), or (experts, out, in)
    stored_bytes: int  # the weight and its quantization tensors
    quantized: bool
    parts: dict[str, TensorInfo]
    bits: int | None = None
    group: int | None = None
    zero_offset: int = 0  # GPTQ v1 stores zero - 1
    problem: str | None = None

    @property
    def params(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 0


class QuantConfig:
    """The quantization settings of config.json, per module."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.qc = config.get("quantization_config") or {}
        self.method = str(self.qc.get("quant_method", "")).lower()
        mlx = config.get("quantization")
        self.mlx = mlx if isinstance(mlx, dict) else (self.qc if "quant_method" not in self.qc else {})

    def gptq(self, name: str) -> tuple[int | None, int | None, int]:
        """(bits, group_size, zero offset) for a GPTQ-packed module."""
        cfg = dict(self.qc)
        extra = self.qc.get("extra_config") or {}  # AutoRound: exact names, then regexes (re.search)
        hit = extra.get(name) or next((v for k, v in extra.items() if set(k) & set("*+?^$()[]|\\")
                                       and re.search(k, name)), None)
        for pattern, over in (self.qc.get("dynamic") or {}).items():  # GPTQModel: "+:re" / "-:re", re.match
            if not pattern.startswith("-:") and re.match(pattern.removeprefix("+:"), name):
                hit = hit or over
        cfg.update(hit or {})
        fmt = str(self.qc.get("packing_format") or self.qc.get("checkpoint_format") or "").lower()
        exact = fmt == "gptq_v2" or "gptqmodel" in fmt or (self.method.startswith("auto") and fmt == "auto_round")
        return cfg.get("bits"), cfg.get("group_size"), 0 if exact else 1

    def mlx_params(self, name: str) -> tuple[str, int | None, int | None]:
        cfg = dict(self.mlx)
        if isinstance(self.mlx.get(name), dict):
            cfg.update(self.mlx[name])
        return str(cfg.get("mode", "affine")), cfg.get("bits"), cfg.get("group_size")

    def activations(self) -> str | None:
        """How the config says activations are quantized: "dynamic" (per token at run time, e.g. FP8_DYNAMIC),
        "static" (calibrated scales), "weight only" (a compressed-tensors scheme without input activations), or
        None when the config does not say (not compressed-tensors)."""
        groups = [g for g in (self.qc.get("config_groups") or {}).values() if isinstance(g, dict)]
        if not groups:
            return None
        acts = [g.get("input_activations") for g in groups]
        if any(a and a.get("dynamic") for a in acts):
            return "dynamic"
        return "static" if any(acts) else "weight only"

    def declared_exclusions(self) -> list[str]:
        out = [str(x) for k in ("ignore", "exclude", "modules_to_not_convert", "exclude_modules", "ignored_layers")
               for x in (self.qc.get(k) or [])]
        out += [k for k in (self.qc.get("dynamic") or {}) if k.startswith("-:")]
        out += [k for k, v in (self.qc.get("extra_config") or {}).items() if (v or {}).get("bits", 0) >= 16]
        return out + [k for k, v in self.mlx.items() if v is False]


def _mod(name: str, parts: dict[str, TensorInfo], family: str, label: str, shape: tuple[int, ...],
         quantized: bool = True, **kw: Any) -> Module:
    stored = sum(t.nbytes for s, t in parts.items() if s not in _NOT_WEIGHT)
    return Module(name, family, label, tuple(int(x) for x in shape), stored, quantized, parts, **kw)


def detect_dense(name: str, parts: dict[str, TensorInfo], q: QuantConfig) -> Module | None:
    w = parts.get("weight")
    if w is None or w.dtype not in _FLOAT_NAME or len(w.shape) < 2 or set(parts) & set(_QUANT):
        return None
    return _mod(name, parts, "dense", _FLOAT_NAME[w.dtype], w.shape, quantized=False, bits=_bits(w))


def detect_scaled8(name: str, parts: dict[str, TensorInfo], q: QuantConfig) -> Module | None:
    w = parts.get("weight")
    s = parts.get("weight_scale") or parts.get("weight_scale_inv")
    if w is None or w.dtype not in ("F8_E4M3", "F8_E5M2", "I8") or (s is None and w.dtype == "I8"):
        return None
    dtype = {"F8_E4M3": "fp8_e4m3", "F8_E5M2": "fp8_e5m2", "I8": "int8"}[w.dtype]
    return _mod(name, parts, "scaled8", f"{dtype} {_granularity(w.shape, s)}", w.shape, bits=8)


def _granularity(shape: tuple[int, ...], s: TensorInfo | None) -> str:
    if s is None:
        return "no scale"
    if int(np.prod(s.shape)) == 1:
        return "tensor"
    if s.shape[-1] == 1 or s.shape == shape[-2:-1]:
        return "channel"
    if len(s.shape) >= 2 and s.shape[-2] == shape[-2]:
        return f"group{shape[-1] // s.shape[-1]}"
    return f"block{-(-shape[-2] // s.shape[-2])}x{-(-shape[-1] // s.shape[-1])}"


def detect_gptq(name: str, parts: dict[str, TensorInfo], q: QuantConfig) -> Module | None:
    qw, sc = parts.get("qweight"), parts.get("scales")
    if qw is None or sc is None or qw.dtype != "I32" or len(qw.shape) != 2 or sc.shape[-1] != qw.shape[-1]:
        return None
    rows, out = qw.shape
    bits, group, zero_offset = q.gptq(name)
    problem = None
    if "g_idx" in parts:  # g_idx has one entry per input channel: the bits follow from it
        n_in = parts["g_idx"].shape[0]
        stored_bits = rows * 32 / n_in
        if bits is not None and stored_bits != bits:
            problem = f"config says {bits} bits, qweight {list(qw.shape)} with {n_in} inputs holds {stored_bits:g}"
        bits = int(stored_bits) if stored_bits == int(stored_bits) else bits
    elif bits is None and group and group > 0:
        bits, n_in = rows * 32 // (sc.shape[0] * group), sc.shape[0] * group
    else:
        n_in = rows * 32 // bits if bits else 0
    if not bits or not n_in:
        return _mod(name, parts, "gptq", "gptq ? bits", (out, 0), bits=None,
                    problem="qweight found but no bits in quantization_config (nor g_idx) to unpack it")
    group = n_in if group in (None, -1) else group
    if problem is None and sc.shape != (-(-n_in // group), out):
        problem = f"scales {list(sc.shape)} do not fit {bits}-bit qweight {list(qw.shape)} with group {group}"
    family = "autoround" if "auto-round" in q.method or "auto_round" in q.method else "gptq"
    return _mod(name, parts, "gptq", f"{family} int{bits} g{group}", (out, n_in), bits=bits, group=group,
                zero_offset=zero_offset, problem=problem)


def detect_awq(name: str, parts: dict[str, TensorInfo], q: QuantConfig) -> Module | None:
    """AWQ GEMM (AutoAWQ, AutoRound auto_awq): qweight [in, out*bits/32] packed along the outputs."""
    qw, sc = parts.get("qweight"), parts.get("scales")
    if qw is None or sc is None or qw.dtype != "I32" or len(qw.shape) != 2 or sc.shape[-1] % qw.shape[-1] or \
            sc.shape[-1] == qw.shape[-1]:
        return None
    n_in, out = qw.shape[0], sc.shape[-1]
    bits, group = 32 * qw.shape[-1] // out, n_in // sc.shape[0]
    problem = None if bits == 4 else f"AWQ packing is defined for 4 bits; qweight {list(qw.shape)} holds {bits}"
    return _mod(name, parts, "awq", f"awq int{bits} g{group}", (out, n_in), bits=bits, group=group, problem=problem)


def detect_quark_mx(name: str, parts: dict[str, TensorInfo], q: QuantConfig) -> Module | None:
    w, s = parts.get("weight"), parts.get("weight_scale")
    if w is None or s is None or w.dtype != "U8" or s.dtype not in ("U8", "F8_E8M0") or set(parts) & {"scales"}:
        return None
    cols, groups = w.shape[-1], s.shape[-1]
    if cols == 16 * groups:  # two FP4 values per byte, 32 values per scale
        return _mod(name, parts, "quark-mx", "mxfp4 g32", (*w.shape[:-1], cols * 2), bits=4, group=32)
    if cols == 24 * groups:  # FP6: four values in three bytes
        return _mod(name, parts, "quark-mx", "mxfp6 g32", (*w.shape[:-1], cols * 4 // 3), bits=6, group=32)
    return _mod(name, parts, "quark-mx", "mx ?", w.shape, bits=None,
                problem=f"U8 weight {list(w.shape)} and scale {list(s.shape)} fit neither MXFP4 nor MXFP6")


_MLX_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}


def detect_mlx(name: str, parts: dict[str, TensorInfo], q: QuantConfig) -> Module | None:
    w, s = parts.get("weight"), parts.get("scales")
    if w is None or s is None or w.dtype != "U32":
        return None
    mode, bits, group = q.mlx_params(name)
    if "biases" not in parts and mode == "affine":
        mode = "mxfp4" if s.dtype == "U8" else mode
    if mode in _MLX_MODES:
        bits, group = _MLX_MODES[mode]
    if not bits or not group:
        return _mod(name, parts, "mlx", "mlx ?", w.shape, bits=None,
                    problem="U32 weight with scales, but config.json has no quantization bits/group_size")
    n_in = w.shape[-1] * 32 // bits
    problem = None if s.shape[-1] * group == n_in else (
        f"scales {list(s.shape)} do not fit {bits}-bit weight {list(w.shape)} with group {group}")
    label = f"mlx int{bits} g{group}" if mode == "affine" else f"mlx {mode} g{group}"
    return _mod(name, parts, "mlx", label, (*w.shape[:-1], n_in), bits=bits, group=group, problem=problem)


def detect_ct_packed(name: str, parts: dict[str, TensorInfo], q: QuantConfig) -> Module | None:
    wp, s = parts.get("weight_packed"), parts.get("weight_scale")
    if wp is None or s is None:
        return None
    if "weight_shape" in parts:
        shape = tuple(int(x) for x in load(parts["weight_shape"]).reshape(-1))
    elif wp.dtype == "U8":
        shape = (*wp.shape[:-1], wp.shape[-1] * 2)
    else:
        return _mod(name, parts, "ct-packed", "ct ?", wp.shape, problem="weight_packed without weight_shape")
    bits = wp.shape[-1] * (32 if wp.dtype == "I32" else 8) // shape[-1]
    group = shape[-1] // s.shape[-1] if s.shape[-1] > 1 else shape[-1]
    kind = f"int{bits}" if wp.dtype == "I32" else ("nvfp4" if s.dtype == "F8_E4M3" else "mxfp4")
    return _mod(name, parts, "ct-packed", f"ct {kind} g{group}", shape, bits=bits, group=group)


DETECTORS: dict[str, Callable[[str, dict[str, TensorInfo], QuantConfig], Module | None]] = {
    "dense": detect_dense, "scaled8": detect_scaled8, "gptq": detect_gptq, "awq": detect_awq,
    "quark-mx": detect_quark_mx, "mlx": detect_mlx, "ct-packed": detect_ct_packed}


def _bits(t: TensorInfo) -> int:
    return 8 * t.nbytes // max(1, int(np.prod(t.shape)))


def group_tensors(tensors: dict[str, TensorInfo]) -> dict[str, dict[str, TensorInfo]]:
    """module name -> {suffix: tensor}. A tensor without a known suffix (a stacked 3D expert parameter such as
    `mlp.experts.gate_up_proj`) is a module of its own, stored under "weight"."""
    mods: dict[str, dict[str, TensorInfo]] = {}
    for key, t in tensors.items():
        mod, _, suffix = key.rpartition(".")
        if suffix not in _WEIGHT + _QUANT + _NOT_WEIGHT or not mod:
            mod, suffix = key, "weight"
        mods.setdefault(mod, {})[suffix] = t
    return mods


def _detect(name: str, parts: dict[str, TensorInfo], q: QuantConfig) -> Module | None:
    """The module's format; None for what is not a weight (norms, 1-D biases, buffers)."""
    for detector in DETECTORS.values():
        if (m := detector(name, parts, q)) is not None:
            return m
    weight = next((parts[s] for s in _WEIGHT if s in parts), None)
    if weight is None or (len(weight.shape) < 2 and not set(parts) & set(_QUANT)):
        return None
    kinds = ", ".join(f"{s} {t.dtype} {list(t.shape)}" for s, t in sorted(parts.items()))
    return _mod(name, parts, "unknown", f"unknown ({weight.dtype})", (), problem=f"unrecognised format: {kinds}")


# ---------------------------------------------------------------------------------------------------------------
# Folder scan

_CLASSES = (
    ("vision", r"vision|visual|multi_modal_projector|patch_merge|merge_linear|mm_projector"),
    ("lm_head", r"(^|\.)lm_head$"),
    ("embeddings", r"embed_tokens|(^|\.)wte$|(^|\.)embeddings?\b"),
    ("indexer", r"\.index_[qk]_proj|\.indexer\."),
    ("shared experts", r"\.shared_(experts?|mlp)\."),
    ("routed experts", r"\.experts\.|\.experts$|switch_mlp"),
    ("router", r"\.(gate|router)$"),
    ("attention", r"(self_attn|attention|attn)\."),
    ("dense mlp", r"(mlp|block_sparse_moe|feed_forward|ffn)\."),
)


def module_class(name: str) -> str:
    """attention, routed/shared experts, dense mlp, router, embeddings, lm_head, vision, indexer, or other."""
    return next((c for c, rx in _CLASSES if re.search(rx, name)), "other")


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise InspectError(f"{path} not found: {model_dir} is not a checkpoint folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InspectError(f"{path}: not valid JSON: {e}") from e


def _shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise InspectError(f"{index}: unreadable index: {e}") from e
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise InspectError(f"{index} names shards that are not in {model_dir}: {missing[:5]}")
        return [model_dir / n for n in names]
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise InspectError(f"no *.safetensors files in {model_dir}")
    return shards


def scan(model_dir: str | Path) -> tuple[dict[str, Any], dict[str, Module], list[Path]]:
    """(config, module name -> Module, shards) from config.json and the safetensors headers alone."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InspectError(f"{model_dir} is not a folder")
    config = _read_config(model_dir)
    tensors: dict[str, TensorInfo] = {}
    shards = _shards(model_dir)
    for shard in shards:
        for key, t in read_header(shard).items():
            if key in tensors:
                raise InspectError(f"{shard}: tensor {key!r} is also in {tensors[key].path}")
            tensors[key] = t
    q = QuantConfig(config)
    mods = {name: m for name, parts in sorted(group_tensors(tensors).items()) if (m := _detect(name, parts, q))}
    return config, mods, shards


# ---------------------------------------------------------------------------------------------------------------
# Dequantization (one module at a time, for the zero check)


def dequantize(m: Module) -> np.ndarray:
    """The module's weight in float32, in its logical shape."""
    p = m.parts
    if m.family == "dense":
        return to_float(p["weight"])
    if m.family == "scaled8":
        w, s = to_float(p["weight"]), p.get("weight_scale") or p.get("weight_scale_inv")
        if s is None:
            return w
        scale = to_float(s)
        return w * _expand(scale[:, None] if scale.ndim == 1 and scale.size > 1 else scale, w.shape)
    if m.family == "gptq":
        n_out, n_in = m.shape
        qv = unpack_bits(load(p["qweight"]).T, m.bits, n_in)  # [out, in]
        s = to_float(p["scales"])  # [groups, out]
        z = unpack_bits(load(p["qzeros"]), m.bits, n_out) + m.zero_offset if "qzeros" in p else 2 ** (m.bits - 1)
        z = np.broadcast_to(z, s.shape)
        g = load(p["g_idx"]).astype(np.int64) if "g_idx" in p else np.arange(n_in) // m.group
        return (qv - z[g].T).astype(np.float32) * s[g].T
    if m.family == "awq":  # packed slot order within each 8 values: 0 4 1 5 2 6 3 7 (AutoAWQ's GEMM layout)
        n_out, n_in = m.shape
        order = np.arange(n_out).reshape(-1, 32 // m.bits)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
        qv = unpack_bits(load(p["qweight"]), m.bits, n_out)[:, order]  # [in, out]
        z = unpack_bits(load(p["qzeros"]), m.bits, n_out)[:, order]
        g = np.arange(n_in) // m.group
        return ((qv - z[g]).astype(np.float32) * to_float(p["scales"])[g]).T
    if m.family == "quark-mx" and m.bits == 4:
        b = load(p["weight"])
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(m.shape)  # low nibble is the even element
        return _FP4[codes] * _expand(to_float(p["weight_scale"], e8m0_u8=True), m.shape)
    if m.family == "mlx":
        codes = unpack_bits(load(p["weight"]), m.bits, m.shape[-1])
        scales = _expand(to_float(p["scales"], e8m0_u8=True), m.shape)
        if "biases" in p:
            return codes.astype(np.float32) * scales + _expand(to_float(p["biases"]), m.shape)
        return (_FP4 if m.bits == 4 else _E4M3)[codes] * scales
    if m.family == "ct-packed" and "weight_zero_point" not in p:
        packed, s = load(p["weight_packed"]), p["weight_scale"]
        if packed.dtype == np.uint8:
            codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(m.shape)
            values = _FP4[codes]
        else:
            values = (unpack_bits(packed, m.bits, m.shape[-1]) - 2 ** (m.bits - 1)).astype(np.float32)
        return values * _expand(to_float(s, e8m0_u8=True), m.shape)
    raise NotImplementedError(f"{m.name}: cannot dequantize {m.label}")


def _value_problem(m: Module, rows: slice = slice(None)) -> str | None:
    """What is wrong with the stored values (all zero, NaN/inf), or None. Dequantizes the module; a format that
    cannot be dequantized is judged by its raw packed bytes (all-zero bytes decode to zero in every format here)."""
    try:
        w = dequantize(m)[..., rows, :]
    except NotImplementedError:
        weight = next(m.parts[s] for s in _WEIGHT if s in m.parts)
        return "is all zero (raw bytes)" if not np.any(load(weight)) else None
    except (ValueError, IndexError) as e:
        return f"could not be dequantized: {e}"
    if not np.isfinite(w).all():
        return "has NaN/inf values (dequantized)"
    return None if np.any(w) else "is all zero (dequantized)"


# ---------------------------------------------------------------------------------------------------------------
# The shared-expert check

_SHARED_RE = re.compile(r"^(?P<prefix>(?:[A-Za-z_]+\.)*)layers\.(?P<layer>\d+)\.(?:[A-Za-z_]+\.)?"
                        r"(?:shared_experts?|shared_mlp)\.(?P<proj>gate_up_proj|gate_proj|up_proj|down_proj|w[123])$")
_TEXT_PREFIX = {"model", "language_model", "text_model", "llm", "transformer", "decoder"}
_PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down",
         "gate_up_proj": "gate_up"}


@dataclass
class SharedExpertCheck:
    passed: bool
    n_shared: int
    moe_layers: list[int]
    sources: list[str]
    expected: dict[str, list[int]]  # logical shapes: gate, up, down
    failing_layers: list[int]
    failures: list[str]
    layers: dict[int, dict[str, Any]]  # layer -> {"ok", "problems", "tensors": {proj: {module, format, shape}}}
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = {str(k): v for k, v in self.layers.items()}
        return d


def _shared_modules(mods: dict[str, Module]) -> dict[int, dict[str, list[Module]]]:
    found: dict[int, dict[str, list[Module]]] = {}
    for name, m in mods.items():
        hit = _SHARED_RE.match(name)
        if hit and set(hit["prefix"].rstrip(".").split(".")) <= _TEXT_PREFIX | {""}:
            found.setdefault(int(hit["layer"]), {}).setdefault(_PROJ[hit["proj"]], []).append(m)
    return found


def _check_layer(layer: int, found: dict[str, list[Module]], expected: dict[str, list[int]]) -> dict[str, Any]:
    problems, tensors = [], {}
    for fused in found.pop("gate_up", []):  # fused: gate rows first, then up rows
        found.setdefault("gate", []).append(fused)
        found.setdefault("up", []).append(fused)
    for proj in ("gate", "up", "down"):
        cands = found.get(proj, [])
        if not cands:
            problems.append(f"layer {layer}: shared expert {proj} projection missing")
            continue
        if len(cands) > 1:
            problems.append(f"layer {layer}: shared expert {proj} stored twice: {[c.name for c in cands]}")
        m = cands[0]
        fused = m.name.endswith("gate_up_proj")
        tensors[proj] = {"module": m.name, "format": m.label, "shape": list(m.shape)}
        want = list(expected.get(proj) or [])
        if fused and want:
            want = [2 * want[0], want[1]]
        if m.problem:
            problems.append(f"layer {layer}: {m.name}: {m.problem}")
            continue
        if want and list(m.shape) != want:
            problems.append(f"layer {layer}: {m.name} has logical shape {list(m.shape)}, expected {want}")
            continue
        rows = slice(None)
        if fused:
            half = m.shape[-2] // 2
            rows = slice(0, half) if proj == "gate" else slice(half, None)
        if bad := _value_problem(m, rows):
            problems.append(f"layer {layer}: shared expert {proj} ({m.name}, {m.label}) {bad}")
    return {"ok": not problems, "problems": problems, "tensors": tensors}


def _check(config: dict[str, Any], mods: dict[str, Module]) -> SharedExpertCheck:
    info = moe_info(config)
    h, i = info.hidden_size, info.shared_intermediate
    expected = {"gate": [i, h], "up": [i, h], "down": [h, i]} if h and i else {}
    notes = list(info.notes) + ([] if expected or not info.n_shared else
                                ["hidden_size or shared intermediate size missing from config: shapes not checked"])
    found = _shared_modules(mods)
    stray = sorted(set(found) - set(info.layers))
    if stray and info.n_shared:
        notes.append(f"shared-expert tensors in layers the config does not call MoE: {stray}")
    if not info.n_shared:
        notes.append("config declares no shared experts: nothing to check" + (
            f"; but layers {sorted(found)} store shared-expert tensors, which a loader that follows this config "
            "will not build" if found else ""))
        return SharedExpertCheck(True, 0, info.layers, info.sources, expected, [], [], {}, notes)
    if not info.layers:
        failure = (f"config declares {info.n_shared} shared expert(s) but no MoE layers found in config "
                   "(no moe_layer_freq, mlp_layer_types or similar field)")
        return SharedExpertCheck(False, info.n_shared, [], info.sources, expected, [], [failure], {}, notes)
    layers = {layer: _check_layer(layer, dict(found.get(layer, {})), expected) for layer in info.layers}
    failing = [layer for layer, r in layers.items() if not r["ok"]]
    failures = [p for layer in failing for p in layers[layer]["problems"]]
    return SharedExpertCheck(not failing, info.n_shared, info.layers, info.sources, expected, failing, failures,
                             layers, notes)


def check_shared_experts(model_dir: str | Path) -> SharedExpertCheck:
    """Every MoE layer's shared expert is stored, of the expected logical shape, and not all zero."""
    config, mods, _ = scan(model_dir)
    return _check(config, mods)


def shared_expert_weights(mods: dict[str, Module], tensors: dict[str, dict[str, Any]]) -> dict[str, np.ndarray | None]:
    """The stored shared expert of one layer, dequantized to float32: projection ("gate", "up", "down") -> its
    logical weight, rows split out of a fused `gate_up_proj` (gate rows first). `tensors` is a layer's
    `SharedExpertCheck.layers[N]["tensors"]`. A projection that is not stored is absent; one whose format cannot be
    dequantized (or whose module has a problem) maps to None. For comparing with what a loader built."""
    out: dict[str, np.ndarray | None] = {}
    cache: dict[str, np.ndarray | None] = {}
    for proj, t in tensors.items():
        name = t["module"]
        m = mods.get(name)
        if name not in cache:
            try:
                cache[name] = dequantize(m) if m is not None and not m.problem else None
            except (NotImplementedError, ValueError, IndexError):
                cache[name] = None
        w = cache[name]
        if w is not None and name.endswith("gate_up_proj"):
            half = w.shape[-2] // 2
            w = w[..., :half, :] if proj == "gate" else w[..., half:, :]
        out[proj] = w
    return out


# ---------------------------------------------------------------------------------------------------------------
# The report


def _bpw(mods: list[Module]) -> float:
    params = sum(m.params for m in mods)
    return 8 * sum(m.stored_bytes for m in mods) / params if params else 0.0


def inspect(model_dir: str | Path) -> dict[str, Any]:
    """A JSON-able report of the checkpoint folder (see the module docstring)."""
    model_dir = Path(model_dir)
    config, mods, shards = scan(model_dir)
    files = [p for p in model_dir.rglob("*") if p.is_file() and p.name != REPORT_NAME
             and not any(part.startswith(".") for part in p.relative_to(model_dir).parts)]  # .cache/, m3lab's marks
    sized = [m for m in mods.values() if m.params]
    quantized = any(m.quantized for m in sized)
    classes: dict[str, dict[str, Any]] = {}
    for c in sorted({module_class(m.name) for m in sized}):
        ms = [m for m in sized if module_class(m.name) == c]
        formats = sorted({m.label for m in ms})
        classes[c] = {"modules": len(ms), "params": sum(m.params for m in ms), "bits_per_weight": _bpw(ms),
                      "stored_bytes": sum(m.stored_bytes for m in ms),
                      "formats": {f: sum(m.label == f for m in ms) for f in formats}}
    excluded = sorted(m.name for m in sized if quantized and not m.quantized)
    check = _check(config, mods)
    problems = [f"{m.name}: {m.problem}" for m in mods.values() if m.problem]
    q = QuantConfig(config)
    return {
        "model_dir": str(model_dir),
        "passed": check.passed and not problems,
        "quant_method": q.method or ("mlx" if q.mlx else None),
        "activations": q.activations(),
        "size_bytes": sum(p.stat().st_size for p in files),
        "safetensors_bytes": sum(p.stat().st_size for p in shards),
        "files": len(files),
        "shards": len(shards),
        "weight_params": sum(m.params for m in sized),
        "weight_stored_bytes": sum(m.stored_bytes for m in sized),
        "bits_per_weight": _bpw(sized),
        "quantized": quantized,
        "formats": {f: {"modules": len(ms), "bits_per_weight": _bpw(ms)}
                    for f in sorted({m.label for m in sized}) for ms in [[m for m in sized if m.label == f]]},
        "classes": classes,
        "excluded": {"count": len(excluded), "modules": excluded,
                     "by_class": {c: sum(module_class(n) == c for n in excluded)
                                  for c in sorted({module_class(n) for n in excluded})}},
        "declared_exclusions": q.declared_exclusions(),
        "problems": problems,
        "shared_expert_check": check.to_dict(),
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def _activations_text(act: str | None) -> str:
    return "" if not act else " (weight only)" if act == "weight only" else f" ({act} activations)"


def format_report(report: dict[str, Any]) -> str:
    r, check = report, report["shared_expert_check"]
    lines = [f"checkpoint {r['model_dir']}",
             f"  size on disk {_size(r['size_bytes'])} in {r['files']} files "
             f"(safetensors {_size(r['safetensors_bytes'])} in {r['shards']} shard{'s' * (r['shards'] != 1)})",
             f"  quantization: {r['quant_method'] or 'none'}{_activations_text(r.get('activations'))}",
             f"  bits per weight: {r['bits_per_weight']:.4f} over {r['weight_params']:,} weights", "",
             f"  {'module class':<16}{'modules':>8}{'params':>16}{'bpw':>9}  formats"]
    for c, v in r["classes"].items():
        fmts = ", ".join(f"{f} x{n}" for f, n in v["formats"].items())
        lines.append(f"  {c:<16}{v['modules']:>8}{v['params']:>16,}{v['bits_per_weight']:>9.4f}  {fmts}")
    ex = r["excluded"]
    if ex["count"]:
        by = ", ".join(f"{c} {n}" for c, n in ex["by_class"].items())
        lines += ["", f"  excluded (high precision while others are quantized): {ex['count']} modules ({by}), "
                      f"e.g. {', '.join(ex['modules'][:3])}"]
    if r["declared_exclusions"]:
        d = r["declared_exclusions"]
        lines.append(f"  declared in quantization config: {len(d)} exclusions, e.g. {', '.join(map(str, d[:4]))}")
    verdict = "PASS" if check["passed"] else "FAIL"
    lines += ["", f"  shared-expert check: {verdict} ({check['n_shared']} shared expert(s) per MoE layer; MoE layers "
                  f"{check['moe_layers']} from {', '.join(check['sources']) or 'no config field'}; expected shapes "
                  f"{check['expected'] or 'unknown'})"]
    for layer, v in check["layers"].items():
        if v["ok"]:
            by_module: dict[str, list[str]] = {}
            for proj, t in v["tensors"].items():  # a fused gate_up module serves two projections
                by_module.setdefault(t["module"], []).append(proj)
            fmts = ", ".join(f"{'+'.join(ps)} {v['tensors'][ps[0]]['format']} {v['tensors'][ps[0]]['shape']}"
                             for ps in by_module.values())
            lines.append(f"    layer {layer}: ok ({fmts})")
        else:
            lines += [f"    layer {layer}: FAIL"] + [f"      {p.split(': ', 1)[1]}" for p in v["problems"]]
    lines += [f"    {f}" for f in check["failures"] if not check["layers"]]
    lines += [f"    note: {n}" for n in check["notes"]]
    lines += [f"  problem: {p}" for p in r["problems"]]
    lines += ["", f"  result: {'PASS' if r['passed'] else 'FAIL'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`m3lab inspect DIR [--json]`: 0 when every check passes, 1 when one fails, 2 when DIR cannot be read."""
    ap = argparse.ArgumentParser(prog="m3lab inspect", description="Inspect a checkpoint folder: bits per weight, "
                                 "formats per module class, exclusions, and the shared-expert check.")
    ap.add_argument("model_dir")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    try:
        report = inspect(args.model_dir)
    except InspectError as e:
        print(f"m3lab inspect: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
