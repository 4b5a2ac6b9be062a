"""A tiny MiniMax-M3 checkpoint, built deterministically: trained weights by default, random on request.

The real model has 428B parameters; the whole workbook must also run on a 2-core CPU in minutes. So m3lab
ships an embedded default: the real `minimax_m3_vl` architecture (dense + MoE layers, full + lightning-indexer
sparse attention, partial RoPE, a vision tower) at toy sizes, a locally trained byte-level BPE tokenizer
carrying M3's special tokens, and a chat template shaped like M3's. Its weights were trained from scratch on
synthetic data (tools/tiny_m3/: train.py, synthdata.py) and ship in m3lab/assets/tiny-m3/, so the correctness and
needle stages grade a model that knows its answers; `weights="random"` gives the untrained model instead.

One spec serves CPU and GPU: head and index dims of 128 and index blocks of 128 are what vLLM's Hopper kernels
need, and the same checkpoint runs on CPU with transformers.

The folder is in the upstream hub layout (see checkpoint.py) with a config.json that carries both
transformers' field names and the hub names vLLM reads, all derived from one TinySpec. Building twice gives
byte-identical files.

    from m3lab.tinymodel import TinySpec, build_tiny_checkpoint
    build_tiny_checkpoint("build/tiny-m3")                              # the trained embedded default
    build_tiny_checkpoint("build/tiny-m3-random", weights="random")     # same spec, random weights
    build_tiny_checkpoint("build/tiny-m3-narrow", TinySpec(head_dim=32, index_head_dim=32,
                          index_block_size=64), weights="random")       # other sizes exist only untrained
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from m3lab.checkpoint import hub_to_native, native_to_hub, read_tensors, write_tensors

__all__ = ["TinySpec", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "TRAINED_DIR", "hub_config", "trained_weights",
           "build_tiny_model", "build_tiny_checkpoint"]

FULL, SPARSE = "full_attention", "minimax_m3_sparse"
DENSE, MOE = "dense", "sparse"


@dataclass(frozen=True)
class TinySpec:
    """Every size of the tiny model. The defaults are the trained embedded model, on CPU and on Hopper GPUs."""

    vocab_size: int = 2048  # the BPE tokenizer is trained to exactly this size
    hidden_size: int = 256
    layer_types: tuple[str, ...] = (FULL, SPARSE, FULL, SPARSE)  # attention per layer
    mlp_layer_types: tuple[str, ...] = (DENSE, MOE, MOE, MOE)  # MLP per layer
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # also the indexer's head count: vLLM requires them equal
    head_dim: int = 128  # 128: vLLM's Hopper attention kernels
    partial_rotary_factor: float = 0.5  # RoPE rotates the first head_dim * factor channels
    rope_theta: float = 5e6
    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    intermediate_size: int = 128  # per routed expert
    shared_intermediate_size: int = 128  # the one shared expert
    dense_intermediate_size: int = 512  # dense-MLP layers
    routed_scaling_factor: float = 2.0
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    index_head_dim: int = 128  # 128 and blocks of 128: vLLM's Hopper sparse-attention kernels
    index_block_size: int = 128  # keys pooled per block; each query keeps its top 4 blocks (the local one
    index_topk_blocks: int = 4  # included), so attention really is sparse from 5 blocks (513 tokens) on
    index_local_blocks: int = 1
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_num_hidden_layers: int = 1
    vision_num_attention_heads: int = 2
    projector_hidden_size: int = 64
    initializer_range: float = 0.02  # std of every random tensor

    def __post_init__(self) -> None:
        if len(self.layer_types) != len(self.mlp_layer_types):
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, "
                             f"mlp_layer_types {len(self.mlp_layer_types)}: one each per layer")
        if bad := set(self.layer_types) - {FULL, SPARSE}:
            raise ValueError(f"layer_types: unknown {sorted(bad)}, expected {FULL!r} or {SPARSE!r}")
        if bad := set(self.mlp_layer_types) - {DENSE, MOE}:
            raise ValueError(f"mlp_layer_types: unknown {sorted(bad)}, expected {DENSE!r} or {MOE!r}")
        if self.head_dim < 32:
            raise ValueError(f"head_dim={self.head_dim}: must be >= 32")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        rotary = self.head_dim * self.partial_rotary_factor
        if rotary != int(rotary) or int(rotary) % 8:
            raise ValueError(f"head_dim * partial_rotary_factor = {rotary}: must be a whole multiple of 8 (vLLM)")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} > "
                             f"num_local_experts={self.num_local_experts}")

    @classmethod
    def hopper(cls, **overrides) -> TinySpec:
        """Head and index dims 128 and index blocks of 128, as vLLM's Hopper kernels need (now the defaults)."""
        return replace(cls(head_dim=128, index_head_dim=128, index_block_size=128), **overrides)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


# ---------------------------------------------------------------------------------------------------
# Tokenizer. Ids 0..10 are fixed: the order below (BOS 1, EOS 2, pad 3, image 6, video 7, as in the tiny
# config vLLM served: shared/tools/vllm-gpu/example-config.json). Role markers follow M3's chat template:
# ']~!b[' opens the document, ']~b]' + role opens a turn, '[e~[' ends it (and is EOS).

@dataclass(frozen=True)
class _Token:
    content: str
    special: bool  # special tokens vanish from skip_special_tokens decodes; parsers need the others kept


SPECIAL_TOKENS: tuple[_Token, ...] = (
    _Token("]~b]", True),  # 0  turn begin, followed by the role: system / user / ai / tool
    _Token("]~!b[", True),  # 1  document begin (BOS)
    _Token("[e~[", True),  # 2  turn end (EOS)
    _Token("<pad>", True),  # 3
    _Token("]<]minimax[>[", False),  # 4  namespace prefix of every tool-call tag
    _Token("<mm:think>", False),  # 5
    _Token("]<]image[>[", True),  # 6  image placeholder (image_token_index)
    _Token("]<]video[>[", True),  # 7  video placeholder (video_token_index)
    _Token("</mm:think>", False),  # 8
    _Token("<tool_call>", False),  # 9
    _Token("</tool_call>", False),  # 10
)
BOS, EOS, PAD, IMAGE, VIDEO = "]~!b[", "[e~[", "<pad>", "]<]image[>[", "]<]video[>["

# Our own template with the shape of MiniMax-M3's chat_template.jinja: the same role markers, the reasoning
# block in <mm:think>...</mm:think> (kept only for the turn after the last user message), tool calls as
# namespaced XML with one tag per argument, tool results in one `tool` turn, and `thinking_mode`
# ("enabled" prefills <mm:think>, "disabled" prefills </mm:think>, otherwise the model decides).
# `enable_thinking` (what `transformers serve --reasoning on|off` sends) maps onto thinking_mode.
CHAT_TEMPLATE = r"""{#- m3lab tiny model: a chat template shaped like MiniMax-M3's. -#}
{%- set ns_token = ']<]minimax[>[' -%}
{%- set doc_begin = ']~!b[' -%}
{%- set turn_begin = ']~b]' -%}
{%- set turn_end = '[e~[' -%}
{%- set think_begin = '<mm:think>' -%}
{%- set think_end = '</mm:think>' -%}
{%- if thinking_mode is not defined and enable_thinking is defined -%}
{%- set thinking_mode = 'enabled' if enable_thinking else 'disabled' -%}
{%- endif -%}
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable and content is not mapping -%}
{%- for part in content -%}
{%- if part is string -%}{{ part }}
{%- elif part.type == 'text' -%}{{ part.text }}
{%- elif part.type in ('image', 'image_url') -%}]<]image[>[
{%- elif part.type in ('video', 'video_url') -%}]<]video[>[
{%- endif -%}
{%- endfor -%}
{%- elif content is not none -%}{{ content }}
{%- endif -%}
{%- endmacro -%}
{%- macro xml(value, ns) -%}
{%- if value is mapping -%}
{%- for k, v in value.items() if v is not none -%}{{ ns }}<{{ k }}>{{ xml(v, ns) }}{{ ns }}</{{ k }}>{%- endfor -%}
{%- elif value is iterable and value is not string -%}
{%- for v in value -%}{{ ns }}<item>{{ xml(v, ns) }}{{ ns }}</item>{%- endfor -%}
{%- elif value is boolean -%}{{ value | tojson }}
{%- else -%}{{ value }}
{%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0].role == 'system' -%}
{%- set system = messages[0] -%}{%- set turns = messages[1:] -%}
{%- else -%}
{%- set system = none -%}{%- set turns = messages -%}
{%- endif -%}
{%- set last = namespace(user=-1) -%}
{%- for m in turns -%}{%- if m.role == 'user' -%}{%- set last.user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{{- doc_begin ~ turn_begin ~ 'system\n' -}}
{{- text(system.content) if system else 'You are a helpful assistant.' -}}
{%- if tools -%}
{{- '\n\n# Tools\nYou may call these tools, each given by its JSON schema:\n<tools>\n' -}}
{%- for tool in tools -%}
{{- '<tool>' ~ ((tool.function if tool.function is defined else tool) | tojson) ~ '</tool>\n' -}}
{%- endfor -%}
{{- '</tools>\nTo call tools, reply with:\n' ~ ns_token ~ '<tool_call>\n' -}}
{{- ns_token ~ '<invoke name="NAME">' ~ ns_token ~ '<ARG>VALUE' ~ ns_token ~ '</ARG>' ~ ns_token ~ '</invoke>\n' -}}
{{- ns_token ~ '</tool_call>' -}}
{%- endif -%}
{{- turn_end ~ '\n' -}}
{%- for m in turns -%}
{%- if m.role == 'user' -%}
{{- turn_begin ~ 'user\n' ~ text(m.content) ~ turn_end ~ '\n' -}}
{%- elif m.role == 'assistant' -%}
{{- turn_begin ~ 'ai\n' -}}
{%- if m.reasoning_content and loop.index0 > last.user -%}
{{- think_begin ~ m.reasoning_content ~ think_end -}}
{%- endif -%}
{{- text(m.content) -}}
{%- if m.tool_calls -%}
{{- ns_token ~ '<tool_call>\n' -}}
{%- for call in m.tool_calls -%}
{%- set f = call.function if call.function is defined else call -%}
{{- ns_token ~ '<invoke name="' ~ f.name ~ '">' -}}
{{- xml(f.arguments, ns_token) if f.arguments is mapping else (f.arguments or '') -}}
{{- ns_token ~ '</invoke>\n' -}}
{%- endfor -%}
{{- ns_token ~ '</tool_call>' -}}
{%- endif -%}
{{- turn_end ~ '\n' -}}
{%- elif m.role == 'tool' -%}
{%- if loop.first or turns[loop.index0 - 1].role != 'tool' -%}{{- turn_begin ~ 'tool\n' -}}{%- endif -%}
{{- '<response>' ~ text(m.content) ~ '</response>' -}}
{{- turn_end ~ '\n' if loop.last or turns[loop.index0 + 1].role != 'tool' else '\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- turn_begin ~ 'ai\n' -}}
{%- if thinking_mode is defined and thinking_mode == 'enabled' -%}{{- think_begin -}}
{%- elif thinking_mode is defined and thinking_mode == 'disabled' -%}{{- think_end -}}
{%- endif -%}
{%- endif -%}
"""


def _corpus(seed: int) -> list[str]:
    """Training text for the tokenizer: English prose, arithmetic, Japanese, code and tool-call markup.

    Generated from word lists with a seeded RNG, so the tokenizer (and its ids) never change.
    """
    rng = random.Random(seed)
    names = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory",
             "Oscar", "Peggy", "Trent", "Victor", "Walter", "Yuki", "Haruto", "Sakura", "Kenji"]
    places = ["Tokyo", "Paris", "London", "Berlin", "Kyoto", "Osaka", "Madrid", "Rome", "Cairo", "Lima",
              "Oslo", "Seoul", "Sydney", "Toronto", "Boston", "the library", "the market", "the station",
              "the harbor", "the museum", "the garden", "the office", "the kitchen", "the mountains"]
    nouns = ["book", "letter", "river", "city", "model", "number", "answer", "question", "table", "window",
             "garden", "computer", "program", "story", "journey", "message", "record", "memory", "signal",
             "weather", "forecast", "server", "request", "token", "matrix", "vector", "layer", "expert",
             "report", "result", "benchmark", "needle", "haystack", "secret", "password", "key", "door",
             "house", "road", "bridge", "train", "ship", "engine", "machine", "theory", "experiment"]
    adjectives = ["small", "large", "quiet", "bright", "old", "new", "quick", "slow", "careful", "simple",
                  "strange", "famous", "hidden", "warm", "cold", "green", "blue", "red", "heavy", "light",
                  "clever", "patient", "busy", "empty", "full", "early", "late", "long", "short", "sparse"]
    verbs = ["reads", "writes", "finds", "opens", "closes", "builds", "measures", "carries", "remembers",
             "answers", "checks", "counts", "sends", "receives", "studies", "explains", "visits", "watches",
             "repairs", "compares", "computes", "serves", "loads", "saves", "quantizes", "predicts"]
    adverbs = ["slowly", "quickly", "carefully", "quietly", "again", "today", "yesterday", "every morning",
               "at night", "before lunch", "after work", "without a word", "with great care", "once more"]
    japanese = ["日本の首都は東京です。", "富士山は日本で一番高い山です。", "今日はいい天気ですね。",
                "私は毎朝コーヒーを飲みます。", "京都には古いお寺がたくさんあります。", "この本はとても面白いです。",
                "駅まで歩いて十分かかります。", "猫が窓の近くで寝ています。", "明日は雨が降るでしょう。",
                "大阪は食べ物がおいしい町です。", "ありがとうございます。", "すみません、質問があります。",
                "電車は九時に出発します。", "私の名前は田中です。", "答えは四十二です。", "秘密の番号は七です。"]
    code = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n",
            "import json\nresult = json.loads(text)\n", "if x > 0:\n    y = x\nelse:\n    y = -x\n",
            "class Model:\n    def __init__(self, size):\n        self.size = size\n",
            '{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "celsius"}}',
            '{"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}']
    tools = ["get_weather", "search", "calculator", "read_file", "send_email", "lookup"]
    args = ["city", "query", "expression", "path", "to", "subject", "unit", "limit", "days", "location"]

    lines: list[str] = []
    for _ in range(4000):
        s = (f"{rng.choice(names)} {rng.choice(verbs)} the {rng.choice(adjectives)} {rng.choice(nouns)} "
             f"in {rng.choice(places)} {rng.choice(adverbs)}.")
        lines.append(s if rng.random() < 0.8 else s.upper() if rng.random() < 0.1 else s.lower())
    for _ in range(1500):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(rng.choice([f"{a} {op} {b} = {value}", f"What is {a} {op} {b}? The answer is {value}.",
                                 f"The secret number is {rng.randint(0, 99999)}.", f"{a}.{b} {rng.random():.4f}"]))
    for _ in range(1500):
        lines.append(rng.choice(japanese) + rng.choice(japanese))
    for _ in range(400):
        lines.append(rng.choice(code))
        tool, arg = rng.choice(tools), rng.choice(args)
        lines.append(f'<invoke name="{tool}"><{arg}>{rng.choice(places + nouns)}</{arg}></invoke>')
        lines.append(f"system\nYou are a helpful assistant.\nuser\n{rng.choice(names)} asks a question.\nai\n"
                     f"<response>{rng.choice(nouns)}</response>")
    return lines


def _train_tokenizer(vocab_size: int, seed: int):
    """Byte-level BPE (any text encodes) with SPECIAL_TOKENS at ids 0..10."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[t.content for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"tokenizer reached {tok.get_vocab_size()} tokens, not vocab_size={vocab_size}: "
                         f"the generated corpus has too few distinct merges for this size")
    # The trainer marks all of its special_tokens special; M3 keeps think/tool markers visible in decodes.
    spec = json.loads(tok.to_str())
    flags = {t.content: t.special for t in SPECIAL_TOKENS}
    for added in spec["added_tokens"]:
        added["special"] = flags[added["content"]]
        added["normalized"] = False
    return spec


def hub_config(spec: TinySpec, transformers_version: str) -> dict:
    """config.json for the VL checkpoint: transformers' fields and vLLM's hub names, from one TinySpec."""
    ids = {t.content: i for i, t in enumerate(SPECIAL_TOKENS)}
    sparse_layers = [int(t == SPARSE) for t in spec.layer_types]
    text = {
        # transformers (MiniMaxM3VLTextConfig)
        "model_type": "minimax_m3_vl_text",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "layer_types": list(spec.layer_types),
        "mlp_layer_types": list(spec.mlp_layer_types),
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta,
                            "partial_rotary_factor": spec.partial_rotary_factor},
        "rotary_dim": spec.rotary_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "intermediate_size": spec.intermediate_size,
        "dense_intermediate_size": spec.dense_intermediate_size,
        "shared_intermediate_size": spec.shared_intermediate_size,
        "num_local_experts": spec.num_local_experts,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "routed_scaling_factor": spec.routed_scaling_factor,
        "swiglu_alpha": spec.swiglu_alpha,
        "swiglu_limit": spec.swiglu_limit,
        "index_n_heads": spec.num_key_value_heads,
        "index_head_dim": spec.index_head_dim,
        "index_block_size": spec.index_block_size,
        "index_topk_blocks": spec.index_topk_blocks,
        "index_local_blocks": spec.index_local_blocks,
        "attention_dropout": 0.0,
        "initializer_range": spec.initializer_range,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
        "dtype": "bfloat16",
        # hub names that vLLM reads (vllm/transformers_utils/configs/minimax_m3.py) and transformers ignores
        "hidden_act": "swigluoai",  # transformers reads it as silu and computes SwiGLU-OAI from swiglu_*
        "swiglu_beta": 1.0,  # transformers' (up + 1) * glu
        "use_gemma_norm": True,  # RMSNorm scales by (1 + weight)
        "attention_output_gate": False,
        "use_qk_norm": True,
        "qk_norm_type": "per_head",
        "n_shared_experts": 1,  # transformers' M3 has exactly one shared expert
        "scoring_func": "sigmoid",
        "use_routing_bias": True,  # e_score_correction_bias
        "rope_theta": spec.rope_theta,
        "partial_rotary_factor": spec.partial_rotary_factor,
        "num_mtp_modules": 0,
        "moe_layer_freq": [int(t == MOE) for t in spec.mlp_layer_types],
        "sparse_attention_config": {
            "use_sparse_attention": True,
            "sparse_attention_freq": sparse_layers,
            "sparse_num_index_heads": spec.num_key_value_heads,
            "sparse_index_dim": spec.index_head_dim,
            "sparse_block_size": spec.index_block_size,
            "sparse_topk_blocks": spec.index_topk_blocks,
            "sparse_local_block": spec.index_local_blocks,
            "sparse_init_block": 0,
            "sparse_score_type": "max",
            "sparse_disable_index_value": sparse_layers,  # no index-value path, as upstream
        },
    }
    merge = 2  # spatial_merge_size
    vision = {
        "model_type": "minimax_m3_vl_vision",
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size,
        "num_hidden_layers": spec.vision_num_hidden_layers,
        "num_attention_heads": spec.vision_num_attention_heads,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": merge,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": spec.initializer_range,
        "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        "img_token_compression_config": {"spatial_merge_size": merge, "temporal_patch_size": 2},
        "projector_hidden_act": "gelu",
    }
    return {
        "architectures": ["MiniMaxM3SparseForConditionalGeneration"],
        "model_type": "minimax_m3_vl",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": ids[IMAGE],
        "video_token_index": ids[VIDEO],
        "projector_hidden_size": spec.projector_hidden_size,
        "merged_hidden_size": spec.hidden_size * merge**2,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "transformers_version": transformers_version,
    }


def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    """Draw every parameter and the router bias from one seeded generator, in sorted-name order.

    Our own init rather than transformers' `_init_weights`: its order and rules may change between
    versions, and it leaves norms at zero and the router bias at zero, which would hide swapped tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    layer_norms = {name for name, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)}
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            module, kind = name.rsplit(".", 1)
            # nn.LayerNorm scales by weight (vision tower): centre it on 1. M3's RMSNorm scales by 1 + weight.
            centre = 1.0 if module in layer_norms and kind == "weight" else 0.0
            t.copy_(centre + std * torch.randn(t.shape, generator=gen, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------
# Weights: trained (m3lab/assets/tiny-m3/, see tools/tiny_m3/train.py), random, or a hub-layout safetensors file.

TRAINED_DIR = Path(__file__).resolve().parent / "assets" / "tiny-m3"
DATA = ("assets/tiny-m3/model.safetensors", "assets/tiny-m3/spec.json")  # what it reads (m3lab.fingerprint)


def trained_weights(spec: TinySpec, seed: int) -> Path:
    """The committed trained weights, after checking they were trained for this spec and tokenizer seed."""
    path, meta = TRAINED_DIR / "model.safetensors", TRAINED_DIR / "spec.json"
    if not path.is_file() or not meta.is_file():
        raise FileNotFoundError(f"no trained tiny M3 in {TRAINED_DIR} (retrain from the repository root: python -m "
                                f"tools.tiny_m3.train train ..., then install); weights='random' builds without it")
    trained = json.loads(meta.read_text())
    mine = json.loads(json.dumps({"seed": seed, "spec": asdict(spec)}))  # tuples → lists, as stored
    if trained != mine:
        diff = sorted(k for k in mine["spec"] if mine["spec"][k] != trained["spec"].get(k))
        raise ValueError(f"the trained tiny M3 was trained for seed={trained['seed']} and the default TinySpec; "
                         f"asked for seed={seed}" + (f" with other {diff}" if diff else "")
                         + ": use weights='random' for other sizes or tokenizer seeds")
    return path


def _weights_file(weights: str | Path, spec: TinySpec, seed: int) -> Path | None:
    """None for random weights, else the hub-layout safetensors file to use."""
    if weights == "random":
        return None
    if weights == "trained":
        return trained_weights(spec, seed)
    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights={str(weights)!r}: expected 'trained', 'random' or a safetensors file")
    return Path(weights)


def build_tiny_model(spec: TinySpec = TinySpec(), seed: int = 0, weights: str | Path = "trained"):
    """The model in memory (bf16): exactly what `build_tiny_checkpoint` writes.

    weights: "trained" (the committed weights; default spec and seed only), "random" (seeded init), or the
    path of a hub-layout model.safetensors for this spec.
    """
    import transformers
    from transformers import MiniMaxM3SparseForConditionalGeneration, MiniMaxM3VLConfig

    config = MiniMaxM3VLConfig.from_dict(hub_config(spec, transformers.__version__))
    # Built the way from_pretrained builds it: bf16 parameters, but RoPE's inv_freq kept in float32
    # (a plain .to(bfloat16) would round it and shift every logit of the in-memory model).
    model = MiniMaxM3SparseForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    path = _weights_file(weights, spec, seed)
    if path is None:
        _randomize(model, seed, spec.initializer_range)
    else:
        model.load_state_dict(hub_to_native(dict(read_tensors(path))), strict=True)
    return model.eval()


def build_tiny_checkpoint(out_dir: str | Path, spec: TinySpec = TinySpec(), seed: int = 0,
                          weights: str | Path = "trained") -> Path:
    """Write a MiniMax-M3 VL checkpoint (hub layout, bf16) with tokenizer and chat template.

    weights: as in `build_tiny_model`; "trained" and file weights are copied byte for byte."""
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = _weights_file(weights, spec, seed)  # fail before writing anything

    (out / "tokenizer.json").write_text(json.dumps(_train_tokenizer(spec.vocab_size, seed), ensure_ascii=False,
                                                   indent=2, sort_keys=True) + "\n")
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,  # the chat template writes ]~!b[ itself; raw completions get no BOS
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
        "extra_special_tokens": {"image_token": IMAGE, "video_token": VIDEO},
    })
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    _write_json(out / "config.json", hub_config(spec, transformers.__version__))
    ids = {t.content: i for i, t in enumerate(SPECIAL_TOKENS)}
    _write_json(out / "generation_config.json",
                {"bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD]})

    if path is not None:
        shutil.copyfile(path, out / "model.safetensors")
        (out / "model.safetensors").chmod(0o644)
        return out
    tensors = native_to_hub(build_tiny_model(spec, seed, weights="random").state_dict(), layout="vl")
    for key in tensors:
        if key.endswith("e_score_correction_bias"):
            tensors[key] = tensors[key].float()  # the hub stores the routing bias in float32
    write_tensors(tensors, out / "model.safetensors")
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
