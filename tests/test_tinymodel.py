"""The embedded tiny MiniMax-M3: build, hub layout, config, loading, text-only variants, tokenizer, template."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, MiniMaxM3SparseForConditionalGeneration, MiniMaxM3VLConfig

from m3lab.checkpoint import Slot, hub_key, hub_to_native, native_slot, native_to_hub, read_tensors, text_only
from m3lab.tinymodel import SPECIAL_TOKENS, TinySpec, build_tiny_checkpoint, build_tiny_model

SPEC = TinySpec()
DENSE_LAYERS = [i for i, t in enumerate(SPEC.mlp_layer_types) if t == "dense"]
MOE_LAYERS = [i for i, t in enumerate(SPEC.mlp_layer_types) if t == "sparse"]
SPARSE_ATTN = [i for i, t in enumerate(SPEC.layer_types) if t == "minimax_m3_sparse"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "vl")


@pytest.fixture(scope="module")
def source_model():
    return build_tiny_model()


@pytest.fixture(scope="module")
def hub_tensors(tiny) -> dict[str, torch.Tensor]:
    return dict(read_tensors(tiny / "model.safetensors"))


@pytest.fixture(scope="module")
def text_variants(tiny) -> dict[str, Path]:
    return {flavor: text_only(tiny, tiny.parent / flavor, flavor) for flavor in ("transformers", "vllm")}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_two_builds_are_byte_identical(tiny, tmp_path):
    again = build_tiny_checkpoint(tmp_path / "again")
    assert _digests(again) == _digests(tiny)
    assert set(_digests(tiny)) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                   "tokenizer_config.json", "chat_template.jinja"}


def test_weights_use_upstream_hub_names(hub_tensors):
    keys = set(hub_tensors)
    for i in DENSE_LAYERS:
        layer = f"language_model.model.layers.{i}."
        assert {f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")} <= keys
        assert not any(k.startswith(layer + "block_sparse_moe.") for k in keys)
    for i in MOE_LAYERS:
        moe = f"language_model.model.layers.{i}.block_sparse_moe."
        experts = {f"{moe}experts.{e}.{w}.weight" for e in range(SPEC.num_local_experts) for w in ("w1", "w2", "w3")}
        shared = {f"{moe}shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")}
        assert experts | shared | {f"{moe}gate.weight", f"{moe}e_score_correction_bias"} <= keys
        assert not any(k.startswith(f"language_model.model.layers.{i}.mlp.") for k in keys)
    for i in range(SPEC.num_hidden_layers):
        attn = f"language_model.model.layers.{i}.self_attn."
        index = {f"{attn}index_{n}.weight" for n in ("q_proj", "k_proj", "q_norm", "k_norm")}
        assert (index <= keys) == (i in SPARSE_ATTN)
    assert {"language_model.lm_head.weight", "language_model.model.embed_tokens.weight",
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
            "multi_modal_projector.linear_1.weight", "patch_merge_mlp.linear_2.bias"} <= keys
    assert not any("block_sparse_moe" in k for k in keys if k.startswith("vision_tower."))
    assert all(t.dtype == (torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16)
               for k, t in hub_tensors.items())


def test_config_carries_transformers_and_vllm_fields_that_agree(tiny):
    config = json.loads((tiny / "config.json").read_text())
    text = config["text_config"]
    sparse = text["sparse_attention_config"]
    assert config["architectures"] == ["MiniMaxM3SparseForConditionalGeneration"]
    assert text["hidden_act"] == "swigluoai" and text["swiglu_beta"] == 1.0 and text["use_gemma_norm"] is True
    assert text["moe_layer_freq"] == [int(t == "sparse") for t in text["mlp_layer_types"]]
    assert sparse["sparse_attention_freq"] == [int(t == "minimax_m3_sparse") for t in text["layer_types"]]
    assert (sparse["sparse_index_dim"], sparse["sparse_block_size"], sparse["sparse_topk_blocks"],
            sparse["sparse_local_block"]) == (text["index_head_dim"], text["index_block_size"],
                                              text["index_topk_blocks"], text["index_local_blocks"])
    assert sparse["sparse_num_index_heads"] == text["index_n_heads"] == text["num_key_value_heads"]
    rope = text["rope_parameters"]
    assert (rope["rope_theta"], rope["partial_rotary_factor"]) == (text["rope_theta"], text["partial_rotary_factor"])
    assert text["rotary_dim"] == text["head_dim"] * text["partial_rotary_factor"]
    # transformers reads the file into the spec's values (its __post_init__ overrides index_* from sparse_*).
    parsed = MiniMaxM3VLConfig.from_pretrained(tiny).text_config
    assert (parsed.index_n_heads, parsed.index_head_dim, parsed.index_block_size) == (
        SPEC.num_key_value_heads, SPEC.index_head_dim, SPEC.index_block_size)
    assert parsed.layer_types == list(SPEC.layer_types) and parsed.mlp_layer_types == list(SPEC.mlp_layer_types)
    assert parsed.vocab_size == SPEC.vocab_size == len(AutoTokenizer.from_pretrained(tiny))


def test_vl_checkpoint_loads_without_missing_keys_into_the_source_weights(tiny, source_model):
    model, info = MiniMaxM3SparseForConditionalGeneration.from_pretrained(tiny, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    loaded, source = model.state_dict(), source_model.state_dict()
    assert set(loaded) == set(source)
    unequal = [k for k in source if not torch.equal(loaded[k].float(), source[k].float())]
    assert unequal == []


def test_name_mapping_round_trips_any_tensor_suffix():
    for key in ["language_model.model.layers.1.block_sparse_moe.experts.3.w1.weight_scale",
                "language_model.model.layers.1.block_sparse_moe.experts.0.w2.input_scale",
                "language_model.model.layers.2.block_sparse_moe.shared_experts.up_proj.weight_packed",
                "language_model.model.layers.0.mlp.gate_proj.weight_scale",
                "language_model.model.layers.1.self_attn.index_q_proj.weight",
                "model.layers.3.block_sparse_moe.e_score_correction_bias",
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias"]:
        slot = native_slot(key)
        assert hub_key(slot, "text" if key.startswith("model.") else "vl") == key
    assert native_slot("language_model.model.layers.1.block_sparse_moe.experts.3.w3.weight_scale") == Slot(
        "model.language_model.layers.1.mlp.experts.gate_up_proj_weight_scale", expert=3, half=1)
    # Experts stack and gate/up fuse along dim 0; a per-tensor scale shared by gate and up stays one value.
    hub = {f"model.layers.1.block_sparse_moe.experts.{e}.{w}.{s}": torch.full(shape, float(e))
           for e in range(2) for w in ("w1", "w3") for s, shape in (("weight", (4, 8)), ("input_scale", ()))}
    native = hub_to_native(hub)
    assert native["model.layers.1.mlp.experts.gate_up_proj"].shape == (2, 8, 8)
    assert native["model.layers.1.mlp.experts.gate_up_proj_input_scale"].shape == (2,)
    back = native_to_hub(native, layout="text")
    assert set(back) == set(hub) and all(torch.equal(back[k], hub[k]) for k in hub)


def test_text_only_vllm_keeps_hub_names_of_the_language_model_only(text_variants, hub_tensors, tiny):
    out = text_variants["vllm"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "minimax_m3_vl" and config["architectures"] == ["MiniMaxM3SparseForCausalLM"]
    tensors = dict(read_tensors(out / "model.safetensors"))
    expected = {k.removeprefix("language_model."): t for k, t in hub_tensors.items() if k.startswith("language_model.")}
    assert set(tensors) == set(expected)
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert _digests(out)["tokenizer.json"] == _digests(tiny)["tokenizer.json"]


def test_text_only_transformers_generates_like_the_vl_language_model(text_variants, source_model):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(text_variants["transformers"], output_loading_info=True)
    assert type(model).__name__ == "MiniMaxM3VLForCausalLM"
    assert {k: v for k, v in info.items() if v} == {}
    # 330 tokens: over 5 index blocks of 64, so the sparse layers really drop blocks.
    ids = torch.randint(len(SPECIAL_TOKENS), SPEC.vocab_size, (1, 330), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source_model(ids).logits)
        short = ids[:, :12]
        assert torch.equal(model.generate(short, max_new_tokens=8, do_sample=False),
                           source_model.generate(short, max_new_tokens=8, do_sample=False))


def test_text_only_transformers_of_an_fp8_checkpoint_computes_like_transformers_vl_load(tiny, tmp_path):
    """The embedded default serves the FP8 model with transformers: the text flavor must compute what
    transformers computes for the VL checkpoint (which dequantizes routed experts while loading)."""
    from transformers import AutoModelForCausalLM

    quantize = pytest.importorskip("m3lab.quantize").quantize
    fp8 = Path(quantize(tiny, tmp_path / "fp8", "fp8_dynamic").model_dir)
    text = text_only(fp8, tmp_path / "fp8-text", "transformers")
    model, info = AutoModelForCausalLM.from_pretrained(text, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn  # dense Linears stay FP8
    vl = MiniMaxM3SparseForConditionalGeneration.from_pretrained(fp8)
    ids = torch.randint(len(SPECIAL_TOKENS), SPEC.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, vl(ids).logits)


def test_text_only_renames_modules_in_quantization_config(tiny, tmp_path):
    src = tmp_path / "quantized"
    shutil.copytree(tiny, src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors",
                                     "config_groups": {"g": {"targets": ["Linear"]}},
                                     "ignore": ["language_model.lm_head", "re:.*block_sparse_moe\\.gate$",
                                                "language_model.model.layers.0.mlp.gate_proj",
                                                "vision_tower.vision_model.encoder.layers.0.mlp.fc1"]}
    (src / "config.json").write_text(json.dumps(config))
    vllm = json.loads((text_only(src, tmp_path / "v", "vllm") / "config.json").read_text())["quantization_config"]
    assert vllm["ignore"][:3] == ["lm_head", "re:.*block_sparse_moe\\.gate$", "model.layers.0.mlp.gate_proj"]
    assert vllm["config_groups"]["g"]["targets"] == ["Linear"]
    hf = json.loads((text_only(src, tmp_path / "t", "transformers") / "config.json").read_text())["quantization_config"]
    assert hf["ignore"][:3] == ["lm_head", "re:.*mlp\\.gate$", "model.layers.0.mlp.gate_up_proj"]


def test_tokenizer_keeps_m3_markers_as_single_tokens(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.encode(token.content, add_special_tokens=False) == [i]
        assert tok.decode([i]) == token.content
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("]~!b[", "[e~[", "<pad>")
    text = "日本の首都は東京です。 12 + 35 = 47 <mm:think>plan</mm:think> 🙂"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # think and tool-call markers survive the skip_special_tokens decode that servers use; role markers don't
    ids = tok.encode("]~b]ai\n<mm:think>x</mm:think><tool_call>[e~[", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "ai\n<mm:think>x</mm:think><tool_call>"


def test_chat_template_renders_m3_roles_think_block_and_tool_call(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    ns = "]<]minimax[>["
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Tokyo?"},
        {"role": "assistant", "content": "", "reasoning_content": "Use the tool.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "]~!b[]~b]system\nBe brief.[e~[\n"
        "]~b]user\nWeather in Tokyo?[e~[\n"
        "]~b]ai\n<mm:think>Use the tool.</mm:think>"
        f"{ns}<tool_call>\n{ns}<invoke name=\"get_weather\">{ns}<city>Tokyo{ns}</city>{ns}</invoke>\n{ns}</tool_call>"
        "[e~[\n"
    )
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True, thinking_mode="enabled")
    assert prompt.endswith("[e~[\n]~b]ai\n<mm:think>")


def test_hopper_spec_builds_with_the_head_dims_vllm_kernels_need(tmp_path):
    out = build_tiny_checkpoint(tmp_path / "hopper", TinySpec.hopper())
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (text["head_dim"], text["sparse_attention_config"]["sparse_index_dim"], text["rotary_dim"],
            text["sparse_attention_config"]["sparse_block_size"]) == (128, 128, 64, 128)
    shapes = {k: t.shape for k, t in read_tensors(out / "model.safetensors")}
    assert shapes["language_model.model.layers.1.self_attn.index_q_proj.weight"] == (2 * 128, SPEC.hidden_size)
    assert shapes["language_model.model.layers.0.self_attn.q_proj.weight"] == (4 * 128, SPEC.hidden_size)
