"""Memory plan: weights per GPU and KV-cache capacity for a profile, computed from config.json alone.

`m3lab plan PARAMS` prints this before anything is downloaded or started. It is arithmetic, in the order vLLM
does it at startup:

    1. count the parameters of every part of the model        (param_counts)
    2. price each part under the quantization scheme          (QuantScheme, weight_bytes)
    3. split the parts over TP / EP / PP ranks                (weights_per_gpu_bytes)
    4. KV bytes per token per GPU: K and V of every layer, plus the lightning indexer's keys on MSA layers
    5. KV capacity = GPU memory × gpu_memory_utilization − weights − activations/runtime, in whole blocks
                                                              (plan_memory; plan_for_params for a profile)

The model config: `model_configs/minimax-m3.json` is MiniMaxAI/MiniMax-M3's config.json as published on the Hub
(hub layout: `text_config`, `vision_config`, `moe_layer_freq`, `sparse_attention_config`, ...), copied from a
model-info report of the bf16 checkpoint that also lists every tensor (59 safetensors files, 795.51 GiB,
427,040,140,160 parameters). `param_counts` reproduces that count exactly, and so does transformers 5.17's
`MiniMaxM3SparseForConditionalGeneration` built from this file on the meta device (tests check both). The config
declares `num_mtp_modules: 7`, but the checkpoint ships no MTP weights, so none are counted.

Where the four cards' sizes come from (total 427.04B parameters; 23.50B active per token, not counting the
embedding and lm_head: the convention that also fits MiniMax-M2's "10B active", ~9.8B by the same rule):

    card 003 (MLX, ~228 GiB, 4.59 bpw over "426.85 B weights"): 4-bit g64 + bf16 scale and bias = 4.5 bits,
        8-bit on embed/lm_head, vision bf16 -> 226.1 GiB here; the card's extra 8/5-bit tensors are the rest.
        Its 426.85B is 0.19B (0.04%) under the checkpoint's count; which tensors it leaves out is not stated.
    card 001 (MXFP4, HF shows "232B params"): the Hub counts stored *elements*. MXFP4 packs two 4-bit weights
        per U8 byte plus one U8 scale per 32 weights, so the 416.35B quantized expert weights (routed + shared)
        count as 416.35 × (1/2 + 1/32) = 221.19B elements; plus 10.69B unquantized -> 231.88B = "232B".
    card 002 (AutoRound "3.2-bit", ~176 GiB checkpoint): see below.
    card 000 (FP8-dynamic): no size on the card; 8-bit linears + per-channel scales -> 401.5 GiB here.

Card 002 check (2x RTX PRO 6000, TP 2 + expert parallel, text-only MiniMaxM3SparseForCausalLM, eager,
gpu_memory_utilization 0.97, bf16 KV, block 128, max_model_len 40960). The card reports 87.6 GiB per GPU and a
KV cache of 46,464 tokens.

  Weights. Experts, shared experts, dense MLPs and o_proj at 3.2 bits average with group 128 (fp16 scale + a
  packed zero per group: 3.2 + 19.2/128 = 3.35 bits); q/k/v and the indexer's q/k in bf16 (the card's loader
  de-quantizes the fused qkv+indexer projection); embed and lm_head bf16; the router in fp32 (vLLM's GateLinear).
      whole checkpoint (vision tower included, bf16)          176.9 GiB   card: ~176 GiB
      per GPU: 420.05B quantized / 2 (EP: 64 of 128 experts;
               TP: half of shared/dense/o_proj)                 81.91 GiB
               q/k/v + index_q bf16 / 2 (4 KV heads / TP 2 = 2 each, no replication)
               + index_k bf16 (one 128-wide head, replicated)    3.41 GiB
               embed + lm_head bf16, vocab split / 2              2.29 GiB
               router fp32 + norms (replicated)                   0.17 GiB
               RoPE cos/sin cache (1,048,576 × 64 × bf16)         0.13 GiB
               vision tower: not loaded (text-only architecture)  0
                                                                87.91 GiB   card: 87.6 GiB (+0.4%)

  KV per token per GPU. vLLM registers, per layer, a FullAttentionSpec for K and V with num_kv_heads =
  max(1, 4 // TP) = 2 heads of 128 in bf16, and on each of the 57 MSA layers a key-only MLAAttentionSpec of one
  128-wide bf16 vector for the indexer (MiniMaxM3IndexerCache: one index key per token, never split by TP). All
  of them are full-attention specs with one block size, so vLLM puts them in one UniformTypeKVCacheSpecs group
  whose page is the sum of every layer's page:
      60 × 2 (K,V) × 2 heads × 128 × 2 B = 61,440 B   +   57 × 128 × 2 B = 14,592 B   ->   76,032 B/token
      one block = 128 tokens × 76,032 B = 9,732,096 B (9.28 MiB)
  46,464 = 363 × 128: vLLM had room for 363 whole blocks, i.e. between 363 and 364 blocks = 3.290–3.299 GiB of KV
  cache. (Were the indexer's keys not budgeted, 46,464 tokens would be 2.66 GiB and the same 3.29 GiB would hold
  ~57,500. The card's number alone cannot tell the two apart, because the budget is not known to 0.6 GiB, see
  below; vLLM's code can: MiniMaxM3IndexerCache registers its own KV spec.)

  Budget. 95.0 GiB (the card's "~95 GiB") × 0.97 = 92.15 GiB. With the card's own 87.6 GiB of weights and
  3.29 GiB of KV, vLLM's profiled activations + non-torch memory were 92.15 − 87.6 − 3.29 = 1.26 GiB. Our
  estimate: a MoE layer at max_num_batched_tokens 8192 holds hidden, residual and output (3 × 6144) plus the
  fused-MoE workspaces (top-4 × (max(2 × 3072, 6144) + 3072)) in bf16 and fp32 router logits = 0.85 GiB, plus
  0.25 GiB of NCCL/cuBLAS (non-torch) = 1.10 GiB, no CUDA graphs (eager).
      with the card's measured weights:  92.15 − 87.60 − 1.10 = 3.45 GiB -> 380 blocks = 48,640 tokens (+4.7%)
      end to end, our weights:           92.15 − 87.91 − 1.10 = 3.15 GiB -> 347 blocks = 44,416 tokens (−4.4%)
  Both are inside 10%, but note what the KV number is: the small difference of large ones. 1% of the weights
  (0.9 GiB) is 27% of this KV cache, and the device's real size matters as much: nvidia-smi shows the card as
  97,887 MiB = 95.59 GiB, which would give up to 0.58 GiB (~8,100 tokens) more than "~95 GiB" does. So the card's
  46,464 pins its setup down only to within a few hundred MiB; what it does confirm is that 40,960 tokens fit
  once (46,464 / 40,960 = 1.13 requests at full length), and `measured_weights_gib` lets a plan use vLLM's own
  "Model loading took X GiB" instead of our weight estimate.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "GiB",
    "PARTS",
    "ModelShape",
    "Count",
    "ParamCounts",
    "Precision",
    "QuantScheme",
    "SCHEMES",
    "autoround_scheme",
    "mlx_scheme",
    "Parallelism",
    "PlanInputs",
    "MemoryPlan",
    "PlanError",
    "WeightsDoNotFit",
    "CONFIG_DIR",
    "load_config",
    "param_counts",
    "weight_bytes",
    "weights_per_gpu_bytes",
    "kv_bytes_per_token",
    "activation_peak_bytes",
    "plan_memory",
    "plan_for_params",
]

GiB = 1 << 30
CONFIG_DIR = Path(__file__).parent / "model_configs"
DATA = ("model_configs/*.json",)  # what it reads (m3lab.fingerprint)

# Every tensor of the model belongs to exactly one part; a part is priced by one precision and split one way.
PARTS = (
    "embed_tokens",  # vocab × hidden, vocab-parallel
    "lm_head",  # vocab × hidden, vocab-parallel
    "attn_q",  # q_proj: split by attention heads
    "attn_kv",  # k_proj + v_proj: split by KV heads, replicated when TP > KV heads
    "attn_o",  # o_proj: split by attention heads (row-parallel)
    "index_q",  # lightning indexer's q: as many heads as KV heads, so it shards (and replicates) like them
    "index_k",  # lightning indexer's k: one head, replicated on every TP rank
    "dense_mlp",  # the leading dense layers' gate/up/down
    "routed_experts",  # 128 experts × gate/up/down per MoE layer: split over EP ranks (or TP without EP)
    "shared_experts",  # the always-on shared expert: TP-split
    "router",  # gate weight + e_score_correction_bias, fp32, replicated
    "norms",  # every RMSNorm weight, replicated
    "vision_tower",  # ViT: patch embed, 32 encoder layers
    "projector",  # multi_modal_projector + patch_merge_mlp
)
# What a bf16 checkpoint stores and vLLM keeps (router in fp32: the checkpoint's dtype and vLLM's GateLinear).
_SOURCE_BITS = {p: 16.0 for p in PARTS} | {"router": 32.0}


class PlanError(ValueError):
    """The plan cannot be made (inconsistent parallelism, unknown scheme, unreadable config)."""


class WeightsDoNotFit(PlanError):
    """The weights alone need more memory per GPU than the profile's GPUs give vLLM."""

    def __init__(self, need_gib: float, have_gib: float, detail: str, profile: str | None = None):
        self.need_gib, self.have_gib, self.detail = need_gib, have_gib, detail
        where = f"profile {profile}: " if profile else ""
        super().__init__(f"{where}needs {need_gib:.1f} GiB per GPU, the profile's GPUs have {have_gib:.1f} GiB "
                         f"({detail})")


# ---------------------------------------------------------------------------------------------------------------
# 1. The model's shape, read once from config.json (hub layout, or transformers' names as the tiny model has).


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    moe_layers: tuple[bool, ...]  # per layer: routed experts (True) or a dense MLP
    sparse_layers: tuple[bool, ...]  # per layer: MSA with a lightning indexer (True) or full attention
    num_experts: int
    experts_per_token: int
    expert_intermediate: int
    shared_intermediate: int  # 0: no shared expert
    dense_intermediate: int
    index_heads: int
    index_head_dim: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    rotary_dim: int
    # vision tower + projector; None for a text-only config
    vision_hidden: int | None = None
    vision_intermediate: int = 0
    vision_layers: int = 0
    vision_patch_elems: int = 0  # channels × temporal patch × patch²: the patch embedding's input width
    spatial_merge_size: int = 2
    projector_hidden: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Read a MiniMax-M3 config.json: the VL layout (`text_config` + `vision_config`) or a bare text config."""
        t = config.get("text_config", config)
        try:
            n = t["num_hidden_layers"]
            H, heads = t["hidden_size"], t["num_attention_heads"]
            # vLLM reads the hub names (moe_layer_freq, sparse_attention_config); transformers' own names
            # (mlp_layer_types, layer_types, index_*) are the fallback, so both kinds of config.json work.
            if "moe_layer_freq" in t:
                moe = tuple(bool(f) for f in t["moe_layer_freq"])
            else:
                moe = tuple(m == "sparse" for m in t.get("mlp_layer_types") or ["sparse"] * n)
            sparse_cfg = t.get("sparse_attention_config") or {}
            if "sparse_attention_freq" in sparse_cfg and sparse_cfg.get("use_sparse_attention", True):
                sparse = tuple(bool(f) for f in sparse_cfg["sparse_attention_freq"])
            elif sparse_cfg and not sparse_cfg.get("use_sparse_attention", True):
                sparse = (False,) * n
            else:
                sparse = tuple(lt == "minimax_m3_sparse" for lt in t.get("layer_types") or ["full_attention"] * n)
            if len(moe) != n or len(sparse) != n:
                raise PlanError(f"config: moe_layer_freq has {len(moe)} entries and sparse_attention_freq "
                                f"{len(sparse)}, num_hidden_layers is {n}")
            n_shared = t.get("n_shared_experts", 1)
            expert_inter = t["intermediate_size"]
            shared = t.get("shared_intermediate_size", expert_inter) * n_shared if n_shared else 0
            rope = t.get("rope_parameters") or {}
            head_dim = t.get("head_dim") or H // heads
            rotary = t.get("rotary_dim") or int(head_dim * t.get("partial_rotary_factor",
                                                                 rope.get("partial_rotary_factor", 1.0)))
            kw: dict[str, Any] = dict(
                vocab_size=t["vocab_size"], hidden_size=H, num_attention_heads=heads,
                num_kv_heads=t.get("num_key_value_heads", heads), head_dim=head_dim,
                moe_layers=moe, sparse_layers=sparse,
                num_experts=t["num_local_experts"], experts_per_token=t["num_experts_per_tok"],
                expert_intermediate=expert_inter, shared_intermediate=shared,
                dense_intermediate=t.get("dense_intermediate_size", expert_inter),
                index_heads=sparse_cfg.get("sparse_num_index_heads", t.get("index_n_heads", 0)),
                index_head_dim=sparse_cfg.get("sparse_index_dim", t.get("index_head_dim", 0)),
                tie_word_embeddings=bool(t.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
                max_position_embeddings=t.get("max_position_embeddings", 0), rotary_dim=rotary,
            )
            v = config.get("vision_config") if "text_config" in config else None
            if v:
                comp = v.get("img_token_compression_config") or config.get("img_token_compression_config") or {}
                temporal = comp.get("temporal_patch_size", v.get("temporal_patch_size", 2))
                kw.update(
                    vision_hidden=v["hidden_size"], vision_intermediate=v["intermediate_size"],
                    vision_layers=v["num_hidden_layers"],
                    vision_patch_elems=v.get("num_channels", 3) * temporal * v["patch_size"] ** 2,
                    spatial_merge_size=comp.get("spatial_merge_size", v.get("spatial_merge_size", 2)),
                    projector_hidden=config.get("projector_hidden_size") or v.get("projection_dim") or H,
                )
        except KeyError as e:
            raise PlanError(f"config: missing {e.args[0]!r} (text_config of a MiniMax-M3 config.json)") from None
        return cls(**kw)


def load_config(name_or_path: str | Path) -> dict[str, Any]:
    """A config.json: a bundled name ("minimax-m3"), a config.json path, or a checkpoint folder holding one."""
    p = Path(name_or_path)
    if not p.exists() and (CONFIG_DIR / f"{name_or_path}.json").exists():
        p = CONFIG_DIR / f"{name_or_path}.json"
    if p.is_dir():
        p = p / "config.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        known = sorted(f.stem for f in CONFIG_DIR.glob("*.json"))
        raise PlanError(f"config {str(name_or_path)!r}: {e} (bundled configs: {known})") from None


def _shape(config: Mapping[str, Any] | ModelShape) -> ModelShape:
    return config if isinstance(config, ModelShape) else ModelShape.from_config(config)


# ---------------------------------------------------------------------------------------------------------------
# 2. Parameter counts by part. `rows` (output channels) is kept because per-channel scales cost one per row.


@dataclass(frozen=True)
class Count:
    params: int = 0
    rows: int = 0  # output channels summed over the part's matrices

    def __add__(self, other: Count) -> Count:
        return Count(self.params + other.params, self.rows + other.rows)


def _add(into: dict[str, Count], part: str, c: Count) -> None:
    into[part] = into.get(part, Count()) + c


def _layer_parts(s: ModelShape, i: int) -> dict[str, Count]:
    """One decoder layer, tensor by tensor as in the checkpoint (bias-free linears)."""
    H, hd = s.hidden_size, s.head_dim
    q, kv = s.num_attention_heads * hd, s.num_kv_heads * hd
    parts = {
        "attn_q": Count(H * q, q),
        "attn_kv": Count(2 * H * kv, 2 * kv),
        "attn_o": Count(q * H, H),
        "norms": Count(2 * H + 2 * hd),  # input/post-attention norms, per-head q/k norms
    }
    if s.sparse_layers[i]:
        iq = s.index_heads * s.index_head_dim
        parts["index_q"] = Count(H * iq, iq)
        parts["index_k"] = Count(H * s.index_head_dim, s.index_head_dim)
        _add(parts, "norms", Count(2 * s.index_head_dim))
    if s.moe_layers[i]:
        E, I = s.num_experts, s.expert_intermediate
        parts["routed_experts"] = Count(E * 3 * H * I, E * (2 * I + H))  # w1, w3: I × H; w2: H × I
        if s.shared_intermediate:
            Is = s.shared_intermediate
            parts["shared_experts"] = Count(3 * H * Is, 2 * Is + H)
        parts["router"] = Count(E * H + E, E)  # gate weight + e_score_correction_bias
    else:
        D = s.dense_intermediate
        parts["dense_mlp"] = Count(3 * H * D, 2 * D + H)
    return parts


def _global_parts(s: ModelShape) -> dict[str, dict[str, Count]]:
    """Parts outside the decoder layers, keyed by where pipeline parallelism puts them: first or last stage."""
    V, H = s.vocab_size, s.hidden_size
    first: dict[str, Count] = {"embed_tokens": Count(V * H, V)}
    last: dict[str, Count] = {"norms": Count(H)}
    if not s.tie_word_embeddings:
        last["lm_head"] = Count(V * H, V)
    if s.vision_hidden:
        Hv, Iv, P = s.vision_hidden, s.vision_intermediate, s.projector_hidden
        layer = 4 * (Hv * Hv + Hv) + (Hv * Iv + Iv) + (Iv * Hv + Hv) + 4 * Hv  # q/k/v/out, fc1, fc2, 2 LayerNorms
        first["vision_tower"] = Count(s.vision_layers * layer + Hv * s.vision_patch_elems + 2 * Hv,
                                      s.vision_layers * (4 * Hv + Iv + Hv) + Hv)
        merged = H * s.spatial_merge_size**2  # spatial_merge_size² projected patches side by side
        first["projector"] = Count(Hv * P + P + P * H + H + merged * P + P + P * H + H, 2 * P + 2 * H)
    return {"first": first, "last": last}


@dataclass(frozen=True)
class ParamCounts:
    by_part: dict[str, int]
    total: int
    active: int  # per text token, without embedding and lm_head (MiniMax's "23B active" convention)
    active_with_lm_head: int

    def as_dict(self) -> dict[str, Any]:
        return {"by_part": self.by_part, "total": self.total, "active": self.active,
                "active_with_lm_head": self.active_with_lm_head}


def _all_parts(s: ModelShape) -> dict[str, Count]:
    out: dict[str, Count] = {}
    for i in range(s.num_layers):
        for part, c in _layer_parts(s, i).items():
            _add(out, part, c)
    for where in _global_parts(s).values():
        for part, c in where.items():
            _add(out, part, c)
    return out


def param_counts(config: Mapping[str, Any] | ModelShape) -> ParamCounts:
    s = _shape(config)
    parts = _all_parts(s)
    by_part = {p: parts[p].params for p in PARTS if p in parts}
    total = sum(by_part.values())
    routed = by_part.get("routed_experts", 0)
    active = (total - routed - by_part["embed_tokens"] - by_part.get("lm_head", 0)
              - by_part.get("vision_tower", 0) - by_part.get("projector", 0)
              + routed * s.experts_per_token // s.num_experts)
    return ParamCounts(by_part, total, active, active + by_part.get("lm_head", by_part["embed_tokens"]))


# ---------------------------------------------------------------------------------------------------------------
# 3. Quantization schemes: a precision per part. Bytes = params × bits/8 + the scales that come with them.


@dataclass(frozen=True)
class Precision:
    bits: float  # per stored weight (an average for mixed-bit schemes)
    group_size: int | None = None  # weights sharing one scale; None with scale_bits > 0: one scale per row
    scale_bits: float = 0.0  # per group (or row): scale + zero point / bias

    def nbytes(self, c: Count) -> float:
        per_group = c.params / self.group_size if self.group_size else c.rows
        return (c.params * self.bits + per_group * self.scale_bits) / 8

    @property
    def bits_per_weight(self) -> float:
        return self.bits + (self.scale_bits / self.group_size if self.group_size else 0.0)


BF16, FP32 = Precision(16), Precision(32)
_LINEARS = ("attn_q", "attn_kv", "attn_o", "index_q", "index_k", "dense_mlp", "routed_experts", "shared_experts")


@dataclass(frozen=True)
class QuantScheme:
    name: str
    parts: Mapping[str, Precision]  # parts not named keep the bf16 checkpoint's dtype (router fp32)
    note: str = ""

    def precision(self, part: str) -> Precision:
        return self.parts.get(part) or Precision(_SOURCE_BITS[part])


def autoround_scheme(average_bits: float = 3.2, group_size: int = 128) -> QuantScheme:
    """Card 002: AutoRound/GPTQ mixed 2/3/4/8-bit, one group size, fp16 scale + packed zero per group.

    Served by vLLM's official M3 model through the card's loader, which de-quantizes the fused q/k/v + indexer
    projection to bf16; everything else that is a Linear inside the decoder stays quantized.
    """
    p = Precision(average_bits, group_size, 16 + average_bits)
    return QuantScheme(f"autoround-{average_bits:g}bit-g{group_size}",
                       {k: p for k in ("attn_o", "dense_mlp", "routed_experts", "shared_experts")},
                       "qkv + indexer bf16 (loader de-quantizes them), embed/lm_head bf16, router fp32")


def mlx_scheme(bits: int = 4, group_size: int = 64, high_bits: int = 8) -> QuantScheme:
    """Card 003: MLX affine quantization (bf16 scale + bf16 bias per group), embed/lm_head at high_bits.

    The card's oQ4 also lifts "a few attention layers" to 8 bits and a small fraction to 5 bits, which it does not
    list; those are not modelled (about 2 GiB of its 228).
    """
    low, high = Precision(bits, group_size, 32), Precision(high_bits, group_size, 32)
    return QuantScheme(f"mlx-q{bits}-g{group_size}", {k: low for k in _LINEARS} | {
        "embed_tokens": high, "lm_head": high, "router": BF16}, "vision tower and projector kept bf16")


# Keyed like params.Quantize.recipe; the defaults are the cards' own values.
SCHEMES: dict[str, QuantScheme] = {
    "none": QuantScheme("bf16", {}, "the bf16 checkpoint (router fp32)"),
    # Card 000 (llm-compressor FP8_DYNAMIC): 8-bit weights, one fp32 scale per output channel; lm_head, vision,
    # projector, router gates and the indexer stay bf16 (m3lab's ignore list for this recipe).
    "fp8_dynamic": QuantScheme("fp8-dynamic", {k: Precision(8, None, 32) for k in (
        "attn_q", "attn_kv", "attn_o", "dense_mlp", "routed_experts", "shared_experts")},
        "lm_head, vision, projector, gates, indexer bf16"),
    # Card 001 (AMD Quark OCP MXFP4): 4-bit E2M1 + one 8-bit E8M0 scale per 32, on the MoE experts only; its
    # exclude list keeps lm_head, vision, projector, patch_merge_mlp, gates, all of self_attn and the dense MLPs.
    "mxfp4": QuantScheme("mxfp4", {k: Precision(4, 32, 8) for k in ("routed_experts", "shared_experts")},
                         "experts only; attention, dense MLPs, lm_head, vision bf16"),
    "autoround": autoround_scheme(),
    "mlx_q4": mlx_scheme(),
}


def _scheme(quant: str | QuantScheme) -> QuantScheme:
    if isinstance(quant, QuantScheme):
        return quant
    try:
        return SCHEMES[quant]
    except KeyError:
        raise PlanError(f"quantization {quant!r}: unknown, known: {sorted(SCHEMES)}") from None


def weight_bytes(config: Mapping[str, Any] | ModelShape, quant: str | QuantScheme = "none") -> dict[str, float]:
    """The whole checkpoint's weight bytes by part under a scheme (what a download weighs, metadata aside)."""
    scheme = _scheme(quant)
    return {p: scheme.precision(p).nbytes(c) for p, c in _all_parts(_shape(config)).items()}


# ---------------------------------------------------------------------------------------------------------------
# 4. Parallelism: the share of each part one GPU holds.


@dataclass(frozen=True)
class Parallelism:
    """vLLM's names. With expert parallel, experts are spread over TP × DP ranks; attention stays TP-split."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False

    @property
    def expert_parallel_size(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size if self.enable_expert_parallel else 1

    @property
    def num_gpus(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    def describe(self) -> str:
        s = f"TP {self.tensor_parallel_size}"
        if self.pipeline_parallel_size > 1:
            s += f" × PP {self.pipeline_parallel_size}"
        if self.data_parallel_size > 1:
            s += f" × DP {self.data_parallel_size}"
        return s + (f", EP {self.expert_parallel_size}" if self.enable_expert_parallel else "")


def _shares(s: ModelShape, par: Parallelism, mm_encoder_tp_mode: str) -> dict[str, float]:
    """Fraction of each part that one GPU of a stage holds (vLLM's sharding of M3)."""
    tp = par.tensor_parallel_size
    if s.num_attention_heads % tp:
        raise PlanError(f"tensor_parallel_size {tp} does not divide {s.num_attention_heads} attention heads")
    kv = s.num_kv_heads
    if kv % tp and tp % kv:
        raise PlanError(f"tensor_parallel_size {tp} and {kv} KV heads: one must divide the other")
    # KV heads (and the indexer's q heads, as many as KV heads) replicate when TP > KV heads: each rank keeps one.
    kv_share = max(1, kv // tp) / kv
    # Vocab-parallel embeddings: the vocab is padded to a multiple of 64, then split evenly.
    padded = -(-s.vocab_size // 64) * 64
    vocab_share = -(-padded // tp) / s.vocab_size
    ep = par.expert_parallel_size
    if par.enable_expert_parallel and ep > s.num_experts:
        raise PlanError(f"expert parallel size {ep} > {s.num_experts} experts")
    experts_share = -(-s.num_experts // ep) / s.num_experts if ep > 1 else 1 / tp
    vision_share = 1.0 if mm_encoder_tp_mode == "data" else 1 / tp
    return {
        "embed_tokens": vocab_share, "lm_head": vocab_share,
        "attn_q": 1 / tp, "attn_o": 1 / tp, "attn_kv": kv_share, "index_q": kv_share, "index_k": 1.0,
        "dense_mlp": 1 / tp, "shared_experts": 1 / tp, "routed_experts": experts_share,
        "router": 1.0, "norms": 1.0, "vision_tower": vision_share, "projector": vision_share,
    }


def _pp_layers(num_layers: int, pp: int) -> list[range]:
    """vLLM's get_pp_indices: even split, the remainder going to the stages just before the last."""
    if pp > num_layers:
        raise PlanError(f"pipeline_parallel_size {pp} > {num_layers} layers")
    sizes = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        sizes[-i] += 1
    starts = [sum(sizes[:i]) for i in range(pp)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


def _stage_parts(s: ModelShape, layers: range, first: bool, last: bool, load_vision: bool) -> dict[str, Count]:
    out: dict[str, Count] = {}
    for i in layers:
        for part, c in _layer_parts(s, i).items():
            _add(out, part, c)
    g = _global_parts(s)
    for where, on in (("first", first), ("last", last)):
        for part, c in g[where].items():
            if on and (load_vision or part not in ("vision_tower", "projector")):
                _add(out, part, c)
    return out


def _rope_cache_bytes(s: ModelShape, dtype_bytes: int = 2) -> int:
    # vLLM's RotaryEmbedding keeps a cos/sin table for every position up to max_position_embeddings (one module
    # shared by all layers: get_rope caches instances). It is allocated at load, so vLLM counts it as model memory.
    return s.max_position_embeddings * s.rotary_dim * dtype_bytes


def weights_per_gpu_bytes(config: Mapping[str, Any] | ModelShape, quant: str | QuantScheme = "none",
                          parallel: Parallelism = Parallelism(), *, load_vision: bool = True,
                          mm_encoder_tp_mode: str = "weights") -> list[dict[str, float]]:
    """Per pipeline stage, the bytes one GPU of that stage holds, by part (plus "rope_cache")."""
    s, scheme = _shape(config), _scheme(quant)
    shares = _shares(s, parallel, mm_encoder_tp_mode)
    stages = _pp_layers(s.num_layers, parallel.pipeline_parallel_size)
    out = []
    for k, layers in enumerate(stages):
        parts = _stage_parts(s, layers, k == 0, k == len(stages) - 1, load_vision)
        gpu = {p: scheme.precision(p).nbytes(c) * shares[p] for p, c in parts.items()}
        gpu["rope_cache"] = float(_rope_cache_bytes(s))
        out.append(gpu)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 5. KV cache and the memory left for it.

_DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "half": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
                "fp8_inc": 1}


def _dtype_bytes(name: str) -> int:
    try:
        return _DTYPE_BYTES[name]
    except KeyError:
        raise PlanError(f"kv cache dtype {name!r}: unknown, known: {sorted(_DTYPE_BYTES)}") from None


def kv_bytes_per_token(config: Mapping[str, Any] | ModelShape, parallel: Parallelism = Parallelism(),
                       kv_cache_dtype: str = "auto", index_cache_dtype: str = "auto") -> list[int]:
    """Per pipeline stage, KV-cache bytes one GPU stores per token.

    Every layer: K and V for its share of KV heads (at least one head: replicated when TP > KV heads).
    MSA layers also keep the lightning indexer's key, one index_head_dim vector per token that every TP rank
    holds whole (vLLM's MiniMaxM3IndexerCache, a key-only MLAAttentionSpec).
    """
    s = _shape(config)
    kv_heads = max(1, s.num_kv_heads // parallel.tensor_parallel_size)
    kv, idx = _dtype_bytes(kv_cache_dtype), _dtype_bytes(index_cache_dtype)
    out = []
    for layers in _pp_layers(s.num_layers, parallel.pipeline_parallel_size):
        n_sparse = sum(s.sparse_layers[i] for i in layers)
        out.append(len(layers) * 2 * kv_heads * s.head_dim * kv + n_sparse * s.index_head_dim * idx)
    return out


def activation_peak_bytes(config: Mapping[str, Any] | ModelShape, parallel: Parallelism = Parallelism(),
                          max_num_batched_tokens: int = 8192, max_num_seqs: int = 256, dtype_bytes: int = 2) -> int:
    """Estimate of vLLM's profiled peak: the larger of one forward pass at max_num_batched_tokens and the
    sampler's dummy run at max_num_seqs. The widest point of the forward pass is a MoE layer: hidden states,
    residual and output (3 × hidden) stay live while the fused-MoE kernel holds its workspaces, top_k rows of
    max(2 × intermediate, hidden) and of intermediate per token, plus fp32 router logits."""
    s = _shape(config)
    T, H, tp = max_num_batched_tokens, s.hidden_size, parallel.tensor_parallel_size
    inter = s.expert_intermediate if parallel.expert_parallel_size > 1 else -(-s.expert_intermediate // tp)
    moe = T * ((3 * H + s.experts_per_token * (max(2 * inter, H) + inter)) * dtype_bytes + 4 * s.num_experts)
    dense = T * (3 * H + 3 * -(-s.dense_intermediate // tp)) * dtype_bytes
    sampler = max_num_seqs * s.vocab_size * 4 * 2  # fp32 logits over the whole vocab, and their softmax
    return max(moe if any(s.moe_layers) else 0, dense if not all(s.moe_layers) else 0, sampler)


@dataclass(frozen=True)
class PlanInputs:
    """A profile's serving setup, in vLLM's terms."""

    quantization: str | QuantScheme = "none"
    parallel: Parallelism = Parallelism()
    gpu_memory_gib: float = 80.0  # per GPU, as the device reports it (torch / vLLM), not the marketing size
    gpu_memory_utilization: float = 0.9
    max_model_len: int = 4096
    block_size: int = 128  # M3's MSA needs vLLM block size == sparse_block_size (128)
    kv_cache_dtype: str = "auto"  # auto = the model dtype (bf16)
    index_cache_dtype: str = "auto"  # the indexer's key cache: bf16 on the Triton path (sm_120, ROCm)
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    enforce_eager: bool = False
    load_vision: bool = True  # False for text-only serving (MiniMaxM3SparseForCausalLM): no vision tower
    mm_encoder_tp_mode: str = "weights"  # vLLM --mm-encoder-tp-mode: "weights" shards the ViT, "data" replicates
    # Non-torch memory vLLM counts against the budget: NCCL buffers, cuBLAS workspaces. 0.1–0.5 GiB in practice.
    non_torch_gib: float = 0.25
    # CUDA graphs, when not eager: vLLM ≥ 0.21 profiles their memory and subtracts it. A rough figure.
    cudagraph_gib: float = 1.0
    # vLLM's "Model loading took X GiB" from a real run, to plan KV capacity from the measured weights.
    measured_weights_gib: float | None = None

    @classmethod
    def from_vllm_args(cls, args: Mapping[str, Any], **kw: Any) -> PlanInputs:
        """From `vllm serve` flags as params files write them ({"--tensor-parallel-size": 2, ...}); `kw` adds
        what flags do not say (gpu_memory_gib, quantization, load_vision) and overrides the rest."""
        a = {k.lstrip("-").replace("-", "_"): v for k, v in args.items()}
        par = Parallelism(
            tensor_parallel_size=int(a.get("tensor_parallel_size") or 1),
            pipeline_parallel_size=int(a.get("pipeline_parallel_size") or 1),
            data_parallel_size=int(a.get("data_parallel_size") or 1),
            enable_expert_parallel=bool(a.get("enable_expert_parallel", False)),
        )
        fields_: dict[str, Any] = {"parallel": par}
        for name, conv in (("gpu_memory_utilization", float), ("max_model_len", int), ("block_size", int),
                           ("kv_cache_dtype", str), ("max_num_batched_tokens", int), ("max_num_seqs", int),
                           ("enforce_eager", bool), ("mm_encoder_tp_mode", str)):
            if a.get(name) is not None:
                fields_[name] = conv(a[name])
        return cls(**(fields_ | kw))


@dataclass(frozen=True)
class MemoryPlan:
    scheme: str
    parallel: str
    num_gpus: int
    total_params: int
    active_params: int
    checkpoint_gib: float  # the whole model under the scheme (vision included)
    weights_per_gpu_gib: float  # the fullest GPU
    weights_by_part_gib: dict[str, float]  # on that GPU
    weights_source: str  # "estimate" or "measured"
    budget_gib: float  # gpu_memory_gib × gpu_memory_utilization
    activation_gib: float
    non_torch_gib: float
    cudagraph_gib: float
    kv_cache_gib: float  # what is left for KV on the tightest GPU
    kv_bytes_per_token: int  # on that GPU
    block_size: int
    kv_cache_blocks: int
    kv_cache_tokens: int
    max_model_len: int
    fits_max_model_len: bool
    max_concurrency: float  # requests of max_model_len tokens the cache holds at once
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def plan_memory(config: Mapping[str, Any] | ModelShape, inputs: PlanInputs) -> MemoryPlan:
    """The memory plan; raises WeightsDoNotFit when the weights alone exceed what vLLM may use per GPU."""
    s, scheme, par = _shape(config), _scheme(inputs.quantization), inputs.parallel
    if not 0 < inputs.gpu_memory_utilization <= 1:
        raise PlanError(f"gpu_memory_utilization {inputs.gpu_memory_utilization}: must be in (0, 1]")
    counts = param_counts(s)
    stages = weights_per_gpu_bytes(s, scheme, par, load_vision=inputs.load_vision,
                                   mm_encoder_tp_mode=inputs.mm_encoder_tp_mode)
    kv_tok = kv_bytes_per_token(s, par, inputs.kv_cache_dtype, inputs.index_cache_dtype)
    budget = inputs.gpu_memory_gib * inputs.gpu_memory_utilization * GiB
    act = activation_peak_bytes(s, par, inputs.max_num_batched_tokens, inputs.max_num_seqs)
    non_torch = inputs.non_torch_gib * GiB
    graphs = 0.0 if inputs.enforce_eager else inputs.cudagraph_gib * GiB

    worst = max(range(len(stages)), key=lambda k: sum(stages[k].values()))
    weights = [sum(st.values()) for st in stages]
    source = "estimate"
    if inputs.measured_weights_gib is not None:
        weights, source = [inputs.measured_weights_gib * GiB] * len(stages), "measured"
    if weights[worst] > budget:
        raise WeightsDoNotFit(weights[worst] / GiB, budget / GiB,
                              f"{inputs.gpu_memory_gib:g} GiB × gpu_memory_utilization "
                              f"{inputs.gpu_memory_utilization:g}; {scheme.name} weights over {par.describe()}")

    # vLLM sizes the cache per worker, then every worker takes the smallest block count.
    block_bytes = [t * inputs.block_size for t in kv_tok]
    free = [budget - w - act - non_torch - graphs for w in weights]
    blocks_per_stage = [max(0, int(f // b)) for f, b in zip(free, block_bytes)]
    tight = min(range(len(stages)), key=lambda k: blocks_per_stage[k])
    blocks = blocks_per_stage[tight]
    tokens = blocks * inputs.block_size

    notes = []
    if tokens < inputs.max_model_len:
        notes.append(f"max_model_len {inputs.max_model_len} does not fit: the KV cache holds {tokens} tokens")
    if s.max_position_embeddings and inputs.max_model_len > s.max_position_embeddings:
        notes.append(f"max_model_len {inputs.max_model_len} > max_position_embeddings {s.max_position_embeddings}")
    if s.num_kv_heads < par.tensor_parallel_size:
        notes.append(f"TP {par.tensor_parallel_size} > {s.num_kv_heads} KV heads: each rank keeps a replica "
                     "of one KV head (weights and cache)")
    by_part = {p: b / GiB for p, b in stages[worst].items() if b}
    return MemoryPlan(
        scheme=scheme.name, parallel=par.describe(), num_gpus=par.num_gpus,
        total_params=counts.total, active_params=counts.active,
        checkpoint_gib=sum(weight_bytes(s, scheme).values()) / GiB,
        weights_per_gpu_gib=weights[worst] / GiB, weights_by_part_gib=by_part, weights_source=source,
        budget_gib=budget / GiB, activation_gib=act / GiB, non_torch_gib=non_torch / GiB,
        cudagraph_gib=graphs / GiB, kv_cache_gib=max(0.0, free[tight]) / GiB, kv_bytes_per_token=kv_tok[tight],
        block_size=inputs.block_size, kv_cache_blocks=blocks, kv_cache_tokens=tokens,
        max_model_len=inputs.max_model_len, fits_max_model_len=tokens >= inputs.max_model_len,
        max_concurrency=tokens / inputs.max_model_len, notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------------------------
# 6. From a params profile (what `m3lab plan` calls).


def _profile_scheme(p: Any) -> QuantScheme:
    q = p.quantize
    if q.recipe == "autoround" and q.autoround:
        return autoround_scheme(q.autoround.average_bits, q.autoround.group_size)
    if q.recipe == "mlx_q4" and q.mlx:
        return mlx_scheme(q.mlx.bits, q.mlx.group_size, q.mlx.high_bits)
    if q.recipe == "none" and str(p.serve.args.get("--quantization", "")).startswith("fp8"):
        return replace(SCHEMES["fp8_dynamic"], name="fp8 (vLLM online)")  # vLLM quantizes the bf16 load itself
    return _scheme(q.recipe)


def _profile_config(p: Any) -> dict[str, Any]:
    if p.model.source == "embedded":
        from m3lab.tinymodel import TinySpec, hub_config

        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in p.model.embedded.items()}
        return hub_config(TinySpec(**overrides), "plan")
    return load_config("minimax-m3")  # every hub profile serves MiniMaxAI/MiniMax-M3 or a quantization of it


def plan_for_params(p: Any) -> dict[str, Any]:
    """The memory plan of an `m3lab.params.Params` profile, as a JSON-ready dict (inputs included).

    Raises WeightsDoNotFit (naming the profile) when the weights alone exceed the GPUs' usable memory.
    """
    if not p.hardware.gpu_memory_gib:
        raise PlanError(f"profile {p.profile}: hardware.gpu_memory_gib is not set")
    args = p.serve.args if p.serve.engine == "vllm" else {}
    inputs = PlanInputs.from_vllm_args(args, quantization=_profile_scheme(p),
                                       gpu_memory_gib=p.hardware.gpu_memory_gib,
                                       max_model_len=int(args.get("--max-model-len") or p.model.max_model_len),
                                       load_vision=not p.serve.text_only)
    try:
        plan = plan_memory(_profile_config(p), inputs)
    except WeightsDoNotFit as e:
        raise WeightsDoNotFit(e.need_gib, e.have_gib, e.detail, p.profile) from None
    out = plan.as_dict()
    out["inputs"] = {k: v for k, v in dataclasses.asdict(inputs).items() if k not in ("quantization", "parallel")}
    return out


# ---------------------------------------------------------------------------------------------------------------
# 7. Roofline: how fast one decode stream could go if it were memory-bound.

# Parts a decode step does not read in full: the vision tower and projector (text tokens), and the embedding
# (one row per token). Routed experts are read for the experts_per_token of num_experts a token picks.
_NOT_READ = ("vision_tower", "projector", "embed_tokens")


def active_bytes_per_token(config: Mapping[str, Any] | ModelShape, quant: str | QuantScheme = "none") -> float:
    """Weight bytes one decode step reads for one token under a scheme, per part's own precision."""
    s, scheme = _shape(config), _scheme(quant)
    total = 0.0
    for part, c in _all_parts(s).items():
        if part in _NOT_READ:
            continue
        b = scheme.precision(part).nbytes(c)
        total += b * (s.experts_per_token / s.num_experts if part == "routed_experts" else 1.0)
    return total


def decode_bound(config: Mapping[str, Any] | ModelShape, bandwidth_gb_s: float, gpus: int = 1,
                 quant: str | QuantScheme = "none", context_tokens: int = 0,
                 bits_per_weight: float | None = None) -> dict[str, Any]:
    """Single-stream decode tok/s if memory bandwidth were the only limit: the GPUs' summed bandwidth (tensor
    parallel: each reads its share at once) over the bytes one token reads, the active weights plus the KV cache
    at `context_tokens`. `bits_per_weight` (a quant report's measured figure) replaces the scheme's per-part
    precisions with one average."""
    s = _shape(config)
    if bits_per_weight is not None:
        counts = param_counts(s)
        weights = counts.active_with_lm_head * bits_per_weight / 8
        how = f"active parameters × {bits_per_weight:.3f} bits/weight (measured)"
    else:
        weights = active_bytes_per_token(s, quant)
        how = f"active parameters at the {_scheme(quant).name} scheme's precisions"
    kv = kv_bytes_per_token(s)[0] * context_tokens
    bound = bandwidth_gb_s * 1e9 * gpus / (weights + kv)
    return {"decode_bound_tok_s": bound, "bytes_per_token": weights + kv, "weight_bytes_per_token": weights,
            "kv_bytes_per_token_read": kv, "context_tokens": context_tokens, "bandwidth_gb_s": bandwidth_gb_s,
            "gpus": gpus, "weights": how}


def decode_bound_for_params(p: Any, bits_per_weight: float | None = None) -> dict[str, Any]:
    """The profile's decode bound at its benchmark's mean context (input_len + output_len / 2), or `not run` and
    why (no bandwidth in its hardware file)."""
    hw = p.hardware
    if not hw.memory_bandwidth_gb_s:
        return {"status": "not run", "reason": f"hardware {hw.name!r} states no memory_bandwidth_gb_s "
                                                f"(params/hardware/)"}
    gpus = int(p.serve.args.get("--tensor-parallel-size") or 1) if p.serve.engine == "vllm" else max(hw.gpus, 1)
    ctx = p.benchmark.input_len + p.benchmark.output_len // 2
    out = decode_bound(_profile_config(p), hw.memory_bandwidth_gb_s, gpus, _profile_scheme(p), ctx, bits_per_weight)
    return {"status": "ok", **out, "bandwidth_source": hw.memory_bandwidth_source}
