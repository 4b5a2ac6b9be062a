"""The memory planner: parameter counts against the real checkpoint and transformers, the cards' sizes, card 002's
footprint, and how TP / EP / PP split the weights and the KV cache."""

from __future__ import annotations

from dataclasses import replace

import pytest

from m3lab import memplan

from m3lab.memplan import (
    GiB,
    MemoryPlan,
    ModelShape,
    Parallelism,
    PlanError,
    PlanInputs,
    SCHEMES,
    WeightsDoNotFit,
    kv_bytes_per_token,
    load_config,
    param_counts,
    plan_for_params,
    plan_memory,
    weight_bytes,
    weights_per_gpu_bytes,
)
from m3lab.tinymodel import TinySpec, hub_config

M3 = load_config("minimax-m3")
# The bf16 checkpoint's tensor inventory (59 safetensors files, 23,416 tensors).
CHECKPOINT_PARAMS = 427_040_140_160

# Card 002: 2x RTX PRO 6000 (~95 GiB), TP 2 + EP, text-only, eager, 0.97, bf16 KV, block 128, 40,960 tokens.
CARD_002 = PlanInputs(
    quantization="autoround",
    parallel=Parallelism(tensor_parallel_size=2, enable_expert_parallel=True),
    gpu_memory_gib=95.0,
    gpu_memory_utilization=0.97,
    max_model_len=40960,
    block_size=128,
    enforce_eager=True,
    load_vision=False,
)


def within(value: float, target: float, rel: float) -> bool:
    return abs(value - target) <= rel * target


def gpu_total(config, quant, par, **kw) -> float:
    return max(sum(stage.values()) for stage in weights_per_gpu_bytes(config, quant, par, **kw))


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts


def test_bundled_config_counts_exactly_the_checkpoints_parameters():
    counts = param_counts(M3)
    assert counts.total == CHECKPOINT_PARAMS
    assert within(counts.total, 428e9, 0.01)  # the model card's "~428B"
    assert within(counts.active, 23e9, 0.03)  # "~23B activated", embedding and lm_head not counted
    assert counts.by_part["routed_experts"] == 57 * 128 * 3 * 6144 * 3072


def test_bundled_config_has_the_real_layer_layout():
    s = ModelShape.from_config(M3)
    assert s.num_layers == 60
    assert s.moe_layers == (False,) * 3 + (True,) * 57
    assert s.sparse_layers == (False,) * 3 + (True,) * 57
    assert (s.num_experts, s.experts_per_token, s.num_kv_heads, s.index_head_dim) == (128, 4, 4, 128)


@pytest.mark.parametrize("which", ["minimax-m3", "tiny", "tiny-hopper"])
def test_param_counts_match_transformers_model(which):
    torch = pytest.importorskip("torch")
    from transformers import MiniMaxM3SparseForConditionalGeneration, MiniMaxM3VLConfig

    config = {"minimax-m3": M3, "tiny": hub_config(TinySpec(), "5.17.0"),
              "tiny-hopper": hub_config(TinySpec.hopper(), "5.17.0")}[which]
    with torch.device("meta"):  # no memory: shapes only, ~0.2 s for the 427B model
        model = MiniMaxM3SparseForConditionalGeneration._from_config(MiniMaxM3VLConfig.from_dict(config))
    n = sum(p.numel() for p in model.parameters())
    n += sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    assert param_counts(config).total == n


def test_tiny_model_config_is_planned():
    cfg = hub_config(TinySpec(), "5.17.0")
    spec = TinySpec()
    plan = plan_memory(cfg, PlanInputs(gpu_memory_gib=80, gpu_memory_utilization=0.3, max_model_len=4096))
    sparse = sum(t == "minimax_m3_sparse" for t in spec.layer_types)
    assert plan.kv_bytes_per_token == (spec.num_hidden_layers * 2 * spec.num_key_value_heads * spec.head_dim * 2
                                       + sparse * spec.index_head_dim * 2)
    assert plan.fits_max_model_len and plan.kv_cache_tokens % 128 == 0
    assert plan.weights_per_gpu_gib < 0.1


# ---------------------------------------------------------------------------------------------------------------
# The cards' sizes


def test_mxfp4_packed_element_count_is_card_001s_232b():
    # The Hub counts stored elements: U8 holds two FP4 weights, plus one U8 scale per 32 weights.
    parts = param_counts(M3).by_part
    quantized = parts["routed_experts"] + parts["shared_experts"]
    elements = CHECKPOINT_PARAMS - quantized + quantized * (1 / 2 + 1 / 32)
    assert round(elements / 1e9) == 232


def test_autoround_checkpoint_is_card_002s_176_gib():
    assert within(sum(weight_bytes(M3, "autoround").values()) / GiB, 176, 0.03)


def test_mlx_checkpoint_is_card_003s_228_gib():
    size = sum(weight_bytes(M3, "mlx_q4").values())
    assert within(size / GiB, 228, 0.03)
    assert within(size * 8 / 426.85e9, 4.59, 0.03)


def test_schemes_order_by_bits():
    sizes = {name: sum(weight_bytes(M3, name).values()) for name in SCHEMES}
    assert sizes["autoround"] < sizes["mxfp4"] < sizes["fp8_dynamic"] < sizes["none"]
    assert within(sizes["none"] / GiB, 795.51, 0.001)  # the bf16 checkpoint's files


# ---------------------------------------------------------------------------------------------------------------
# Card 002: 87.6 GiB per GPU, KV cache 46,464 tokens


def test_card_002_weights_per_gpu():
    plan = plan_memory(M3, CARD_002)
    assert within(plan.weights_per_gpu_gib, 87.6, 0.10)
    assert within(plan.weights_per_gpu_gib, 87.6, 0.02)  # in fact much closer
    assert "vision_tower" not in plan.weights_by_part_gib  # text-only serving


def test_card_002_kv_cache_tokens():
    plan = plan_memory(M3, CARD_002)
    assert plan.kv_bytes_per_token == 60 * 2 * 2 * 128 * 2 + 57 * 128 * 2 == 76_032
    assert within(plan.kv_cache_tokens, 46_464, 0.10)
    assert plan.kv_cache_tokens % 128 == 0
    assert plan.fits_max_model_len and plan.max_concurrency > 1


def test_card_002_kv_cache_from_measured_weights():
    plan = plan_memory(M3, replace(CARD_002, measured_weights_gib=87.6))
    assert plan.weights_source == "measured"
    assert within(plan.kv_cache_tokens, 46_464, 0.10)


# ---------------------------------------------------------------------------------------------------------------
# Splitting


def test_weights_per_gpu_fall_as_tensor_parallel_grows():
    per_gpu = [gpu_total(M3, "fp8_dynamic", Parallelism(tp)) for tp in (1, 2, 4, 8)]
    assert per_gpu == sorted(per_gpu, reverse=True)
    assert per_gpu[-1] < per_gpu[0] / 7  # almost everything splits


def test_expert_parallel_splits_experts_like_tensor_parallel():
    tp = gpu_total(M3, "mxfp4", Parallelism(4))
    ep = gpu_total(M3, "mxfp4", Parallelism(4, enable_expert_parallel=True))
    assert within(ep, tp, 0.01)
    stage = weights_per_gpu_bytes(M3, "mxfp4", Parallelism(4, enable_expert_parallel=True))[0]
    assert within(stage["routed_experts"], weight_bytes(M3, "mxfp4")["routed_experts"] / 4, 1e-9)


def test_kv_heads_replicate_when_tensor_parallel_exceeds_them():
    # 4 KV heads: TP 8 keeps one head per rank, as TP 4 does, for weights and cache alike.
    tp4, tp8 = (weights_per_gpu_bytes(M3, "none", Parallelism(tp))[0] for tp in (4, 8))
    assert tp8["attn_kv"] == tp4["attn_kv"]
    assert tp8["attn_q"] == tp4["attn_q"] / 2
    assert kv_bytes_per_token(M3, Parallelism(8)) == kv_bytes_per_token(M3, Parallelism(4))
    plan = plan_memory(M3, PlanInputs("mxfp4", Parallelism(8), gpu_memory_gib=80, max_model_len=8192))
    assert any("replica" in n for n in plan.notes)


def test_indexer_cache_is_not_split_by_tensor_parallel():
    idx = 57 * 128 * 2
    assert kv_bytes_per_token(M3, Parallelism(1)) == [60 * 2 * 4 * 128 * 2 + idx]
    assert kv_bytes_per_token(M3, Parallelism(4)) == [60 * 2 * 1 * 128 * 2 + idx]
    assert kv_bytes_per_token(M3, Parallelism(4), kv_cache_dtype="fp8") == [60 * 2 * 1 * 128 + idx]


def test_pipeline_parallel_splits_layers_and_the_cache():
    one, two = (weights_per_gpu_bytes(M3, "mxfp4", Parallelism(pipeline_parallel_size=pp)) for pp in (1, 2))
    assert len(two) == 2 and "embed_tokens" in two[0] and "lm_head" in two[1] and "lm_head" not in two[0]
    assert within(sum(map(sum, (s.values() for s in two))), sum(one[0].values()), 0.001)  # rope cache twice
    assert max(sum(s.values()) for s in two) < 0.55 * sum(one[0].values())
    assert sum(kv_bytes_per_token(M3, Parallelism(pipeline_parallel_size=2))) == kv_bytes_per_token(M3)[0]


def test_more_gpus_more_kv_cache():
    base = PlanInputs("mxfp4", Parallelism(4), gpu_memory_gib=139, max_model_len=65536)
    plans = [plan_memory(M3, replace(base, parallel=Parallelism(tp))) for tp in (4, 8)]
    assert plans[1].kv_cache_tokens > plans[0].kv_cache_tokens


# ---------------------------------------------------------------------------------------------------------------
# Errors and limits


def test_weights_that_cannot_fit_raise_a_clear_error():
    with pytest.raises(WeightsDoNotFit, match=r"needs 7\d\d\.\d GiB per GPU, the profile's GPUs have 72\.0 GiB"):
        plan_memory(M3, PlanInputs("none", Parallelism(1), gpu_memory_gib=80, gpu_memory_utilization=0.9))


def test_max_model_len_that_does_not_fit_is_reported():
    plan = plan_memory(M3, replace(CARD_002, max_model_len=131072))
    assert not plan.fits_max_model_len
    assert any("131072 does not fit" in n for n in plan.notes)


def test_inconsistent_parallelism_and_names_are_plan_errors():
    with pytest.raises(PlanError, match="attention heads"):
        plan_memory(M3, PlanInputs("mxfp4", Parallelism(3), gpu_memory_gib=139))
    with pytest.raises(PlanError, match="unknown"):
        plan_memory(M3, PlanInputs("int3", Parallelism(8), gpu_memory_gib=139))
    with pytest.raises(PlanError, match="bundled configs"):
        load_config("no-such-model")


def test_inputs_from_vllm_flags():
    inputs = PlanInputs.from_vllm_args(
        {"--tensor-parallel-size": 2, "--enable-expert-parallel": True, "--gpu-memory-utilization": 0.97,
         "--block-size": 128, "--max-model-len": 40960, "--enforce-eager": True, "--trust-remote-code": True},
        quantization="autoround", gpu_memory_gib=95.0, load_vision=False)
    assert inputs == CARD_002
    assert isinstance(plan_memory(M3, inputs), MemoryPlan)


# ---------------------------------------------------------------------------------------------------------------
# From params profiles (what `m3lab plan` calls)


def test_card_002_profile_plans_like_the_card():
    from m3lab.params import load_params

    p = load_params("rtxpro6000x2-autoround")
    p = p.model_copy(update={"serve": p.serve.model_copy(update={"text_only": True})})  # the card serves text
    plan = plan_for_params(p)
    assert plan["parallel"] == "TP 2, EP 2" and plan["inputs"]["gpu_memory_utilization"] == 0.97
    assert within(plan["weights_per_gpu_gib"], 87.6, 0.10)
    assert within(plan["kv_cache_tokens"], 46_464, 0.10)


def test_embedded_profile_plans_the_tiny_model():
    from m3lab.params import load_params

    plan = plan_for_params(load_params("h200-tiny-bf16"))
    assert plan["total_params"] < 10**8 and plan["fits_max_model_len"]


def test_profile_whose_weights_cannot_fit_names_the_profile():
    from m3lab.params import load_params

    p = load_params("h100x8-fp8")
    p = p.model_copy(update={"hardware": p.hardware.model_copy(update={"gpu_memory_gib": 24})})
    with pytest.raises(WeightsDoNotFit, match=r"profile h100x8-fp8: needs \d+\.\d GiB per GPU"):
        plan_for_params(p)


# ---------------------------------------------------------------------------------------------------------------
# Roofline: the single-stream decode bound, checked against the figures the benchmark issue states


def test_decode_bound_of_card_003s_m3_ultra_and_card_002s_two_rtx_pro_6000():
    from m3lab.params import load_params

    ultra = memplan.decode_bound_for_params(load_params("m3ultra-mlx-q4"), bits_per_weight=4.59)
    assert ultra["status"] == "ok" and 55 <= ultra["decode_bound_tok_s"] <= 62  # 819 GB/s at 4.59 bpw
    assert 35 <= 100 * 21.7 / ultra["decode_bound_tok_s"] <= 40  # card 003's decode is 35–40% of it
    scheme = memplan.decode_bound_for_params(load_params("m3ultra-mlx-q4"))  # the mlx scheme's own precisions
    assert 55 <= scheme["decode_bound_tok_s"] <= 62
    rtx = memplan.decode_bound_for_params(load_params("rtxpro6000x2-autoround"))
    assert rtx["gpus"] == 2 and rtx["bandwidth_gb_s"] == 1792
    assert 100 * 13 / rtx["decode_bound_tok_s"] < 10  # card 002's 13 tok/s: a few percent of its bound


def test_the_bound_is_bandwidth_over_bytes_and_needs_a_bandwidth():
    from m3lab.params import load_params

    cfg = memplan.load_config("minimax-m3")
    one = memplan.decode_bound(cfg, 1000.0, 1, "none")
    assert one["decode_bound_tok_s"] == pytest.approx(1000e9 / one["bytes_per_token"])
    assert memplan.decode_bound(cfg, 1000.0, 2, "none")["decode_bound_tok_s"] == pytest.approx(
        2 * one["decode_bound_tok_s"])
    longer = memplan.decode_bound(cfg, 1000.0, 1, "none", context_tokens=100_000)
    assert longer["decode_bound_tok_s"] < one["decode_bound_tok_s"]  # the KV cache is read too
    # bf16 reads ~2 bytes per active parameter: 23.5B active (+ lm_head) → 47–50 GB a token
    assert 45e9 < one["weight_bytes_per_token"] < 52e9
    cpu = memplan.decode_bound_for_params(load_params("cpu-tiny"))
    assert cpu["status"] == "not run" and "memory_bandwidth_gb_s" in cpu["reason"]
