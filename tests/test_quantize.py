"""Quantize stage on the tiny M3: real llm-compressor FP8_DYNAMIC on CPU, real transformers reloads. The report's
on-disk numbers come from the checkpoint inspector (m3lab.quant.inspector), so published checkpoints in other
formats (GPTQ/AutoRound, MLX, Quark MXFP4) are measured by the same code as `m3lab inspect`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from m3lab.quant import core as q
from m3lab.quant import fp8_dynamic
from m3lab.quant import inspector as mi
from m3lab.tinymodel import build_tiny_checkpoint
from test_inspector import MOE_LAYERS as REAL_MOE_LAYERS
from test_inspector import write_checkpoint

BITS = {"BF16": 16, "F32": 32, "F8_E4M3": 8}
MOE_LAYERS = [1, 2, 3]  # TinySpec: mlp_layer_types = dense, sparse, sparse, sparse
QUANT_SUFFIX = re.compile(r"\.weight_(scale|zero_point|global_scale|g_idx|shape|packed)$")


def _dtypes(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                out[k] = (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape()))
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-m3")


@pytest.fixture(scope="module")
def fp8(src: Path) -> q.QuantResult:
    return q.quantize(src, src.parent / "tiny-m3-fp8", q.QuantRecipe.from_params("fp8_dynamic"))


def _copy(model_dir: str, dst: Path) -> Path:
    shutil.copytree(model_dir, dst)
    return dst


def test_fp8_reloads_and_generates_on_cpu(fp8: q.QuantResult) -> None:
    from transformers import MiniMaxM3SparseForConditionalGeneration

    # the default path (what `transformers serve` does): weights stay FP8 until the first forward
    model = MiniMaxM3SparseForConditionalGeneration.from_pretrained(fp8.model_dir)
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    ids = torch.tensor([[1, 11, 12, 13]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and 4 < out.shape[1] <= 7 and int(out.max()) < 2048  # the trained model may stop at EOS
    assert fp8.report.reload["ok"] and len(fp8.report.reload["generated_ids"]) == 4


def test_ignored_modules_stay_bf16_and_linear_targets_are_fp8(fp8: q.QuantResult) -> None:
    st = _dtypes(Path(fp8.model_dir))
    lm = "language_model.model.layers"
    bf16 = ["language_model.lm_head", "language_model.model.embed_tokens", f"{lm}.1.block_sparse_moe.gate",
            f"{lm}.1.self_attn.index_q_proj", f"{lm}.3.self_attn.index_k_proj", "multi_modal_projector.linear_1",
            "patch_merge_mlp.linear_2", "vision_tower.vision_model.encoder.layers.0.mlp.fc1",
            "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"]
    fp8_mods = [f"{lm}.0.self_attn.q_proj", f"{lm}.2.self_attn.o_proj", f"{lm}.0.mlp.gate_proj",
                f"{lm}.1.block_sparse_moe.shared_experts.up_proj", f"{lm}.3.block_sparse_moe.experts.0.w1",
                f"{lm}.3.block_sparse_moe.experts.3.w2"]
    for mod in bf16:
        assert st[f"{mod}.weight"][0] == "BF16", mod
        assert f"{mod}.weight_scale" not in st, mod
    for mod in fp8_mods:
        assert st[f"{mod}.weight"][0] == "F8_E4M3", mod
        assert st[f"{mod}.weight_scale"] == ("BF16", [st[f"{mod}.weight"][1][0], 1]), mod  # one scale per row
    # every routed expert projection is FP8: llm-compressor linearized the 3D experts
    experts = [k for k in st if re.search(r"\.experts\.\d+\.w[123]\.weight$", k)]
    assert len(experts) == 3 * 4 * 3 and all(st[k][0] == "F8_E4M3" for k in experts)
    assert fp8.report.routed_expert_formats == {"fp8_e4m3 channel": 36}
    assert fp8.report.quant_method == "compressed-tensors" and fp8.report.activations == "dynamic"
    # the routing bias keeps the download's float32
    assert st[f"{lm}.1.block_sparse_moe.e_score_correction_bias"][0] == "F32"
    cfg = json.loads((Path(fp8.model_dir) / "config.json").read_text())
    assert cfg["quantization_config"]["ignore"] == q.DEFAULT_IGNORE
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"


def test_output_is_in_hub_layout(src: Path, fp8: q.QuantResult) -> None:
    out, orig = _dtypes(Path(fp8.model_dir)), _dtypes(src)
    quant = {k for k in out if QUANT_SUFFIX.search(k)}
    assert set(out) - quant == set(orig)
    assert all(QUANT_SUFFIX.sub(".weight", k) in out for k in quant)  # scales travel with their weights
    assert "language_model.model.layers.0.mlp.down_proj.weight" in out
    assert not [k for k in out if "vision" in k and "block_sparse_moe" in k]
    src_cfg = json.loads((src / "config.json").read_text())
    out_cfg = json.loads((Path(fp8.model_dir) / "config.json").read_text())
    assert {k: v for k, v in out_cfg.items() if k != "quantization_config"} == src_cfg
    assert (Path(fp8.model_dir) / "tokenizer.json").is_file()


def test_report_numbers_match_the_files(fp8: q.QuantResult) -> None:
    d = Path(fp8.model_dir)
    r = fp8.report
    assert r.size_bytes == sum(p.stat().st_size for p in d.iterdir() if p.name != q.REPORT_NAME)
    st = _dtypes(d)
    weights = {k: v for k, v in st.items() if k.endswith(".weight") and len(v[1]) >= 2}
    params = sum(torch.Size(shape).numel() for _, shape in weights.values())
    bits = sum(torch.Size(s).numel() * BITS[t] for k, (t, s) in st.items()
               if k in weights or (QUANT_SUFFIX.search(k) and QUANT_SUFFIX.sub(".weight", k) in weights))
    assert (r.weight_params, 8 * r.weight_stored_bytes) == (params, bits)
    assert 8 < r.bits_per_weight < 16 and r.bits_per_weight == pytest.approx(bits / params, abs=1e-12)
    assert sum(r.formats.values()) == len(weights) and set(r.formats) == {"bf16", "fp8_e4m3 channel"}
    assert "language_model.lm_head" in r.excluded_modules
    assert not [m for m in r.excluded_modules if m.endswith("q_proj") and "index" not in m and "vision" not in m]
    on_disk = json.loads((d / q.REPORT_NAME).read_text())
    assert on_disk == json.loads(json.dumps(r.file_dict()))
    # the file holds no wall-clock time: the same inputs re-make the shared, content-addressed folder byte for byte
    assert "seconds" not in on_disk and "load_generate_s" not in on_disk["reload"] and r.seconds["total"] > 0


def test_report_is_the_inspectors(fp8: q.QuantResult) -> None:
    # one implementation: the report's on-disk numbers are `m3lab inspect`'s, for the folder as it is now
    ins = mi.inspect(fp8.model_dir)
    assert json.loads(json.dumps(fp8.inspect)) == json.loads(json.dumps(ins))  # the stage result carries it all
    r = fp8.report
    assert (r.size_bytes, r.bits_per_weight, r.weight_params) == (ins["size_bytes"], ins["bits_per_weight"],
                                                                   ins["weight_params"])
    assert r.formats == {f: v["modules"] for f, v in ins["formats"].items()}
    assert r.excluded_modules == ins["excluded"]["modules"]
    assert r.shared_expert_check.moe_layers == ins["shared_expert_check"]["moe_layers"] == MOE_LAYERS


def test_shared_expert_check_passes_on_the_real_output(fp8: q.QuantResult) -> None:
    check = fp8.report.shared_expert_check
    assert check.passed and check.reloaded and check.moe_layers == MOE_LAYERS and not check.failures


def test_shared_expert_check_fails_on_zeroed_shared_experts(fp8: q.QuantResult, tmp_path: Path) -> None:
    d = _copy(fp8.model_dir, tmp_path / "zeroed")
    tensors = load_file(d / "model.safetensors")
    for layer in (1, 3):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            key = f"language_model.model.layers.{layer}.block_sparse_moe.shared_experts.{proj}.weight"
            tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    check = q.check_shared_experts(d)
    assert not check.passed and not check.checkpoint_passed and check.failing_layers == [1, 3]
    assert any(f.startswith("layer 1: shared expert gate") and "is all zero" in f for f in check.failures)
    assert any(f.startswith("layer 3:") and "loaded as zeros" in f for f in check.failures)
    with pytest.raises(q.QuantizeError, match=r"shared-expert check failed .*\(MoE layers \[1, 3\] of \[1, 2, 3\]\)"
                                              r".*layer 1: shared expert gate .* is all zero"):
        q.quantize(d, tmp_path / "out", "none")
    assert not (tmp_path / "out").exists()


def test_shared_expert_check_fails_on_deleted_shared_experts(fp8: q.QuantResult, tmp_path: Path) -> None:
    d = _copy(fp8.model_dir, tmp_path / "deleted")
    tensors = load_file(d / "model.safetensors")
    prefix = "language_model.model.layers.2.block_sparse_moe.shared_experts."
    tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    check = q.check_shared_experts(d)
    assert not check.passed and check.failing_layers == [2]
    assert "layer 2: shared expert gate projection missing" in check.failures
    # transformers 5.17 cannot initialize the missing FP8 tensors: the reload itself fails, and says so
    assert any(f.startswith("reload in transformers failed") for f in check.failures)
    with pytest.raises(q.QuantizeError, match=r"\(MoE layers \[2\] of \[1, 2, 3\]\).*layer 2: shared expert "
                                              r"gate projection missing.*reload in transformers failed"):
        q.quantize(d, tmp_path / "out", "none")


def test_quantize_stage_fails_on_bf16_shared_experts_zeroed_or_missing(src: Path, tmp_path: Path) -> None:
    # the bf16 download through the pass-through recipe: checkpoint half and reload half both name the layer
    zeroed = _copy(src, tmp_path / "zeroed")
    tensors = load_file(zeroed / "model.safetensors")
    key = "language_model.model.layers.2.block_sparse_moe.shared_experts.down_proj.weight"
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, zeroed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(q.QuantizeError, match=r"\(MoE layers \[2\] of \[1, 2, 3\]\): layer 2: shared expert down "
                                              r".* is all zero.*layer 2: shared_experts.down_proj loaded as zeros"):
        q.quantize(zeroed, tmp_path / "out", "none")
    missing = _copy(src, tmp_path / "missing")
    tensors = {k: v for k, v in load_file(missing / "model.safetensors").items()
               if ".layers.1.block_sparse_moe.shared_experts.up_proj" not in k}
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(q.QuantizeError, match=r"\(MoE layers \[1\] of \[1, 2, 3\]\): layer 1: shared expert up "
                                              r"projection missing"):
        q.quantize(missing, tmp_path / "out", q.QuantRecipe.from_params({"recipe": "none", "verify": False}))
    assert not (tmp_path / "out").exists()


def test_shared_expert_check_fails_when_loaded_as_zeros(fp8: q.QuantResult) -> None:
    # the AutoRound card's failure: the checkpoint is fine, the loaded model has zeros
    model, info = q.load_for_check(fp8.model_dir)
    assert not any(info.values())
    with torch.no_grad():
        model.model.language_model.layers[3].mlp.shared_experts.gate_up_proj.weight.zero_()
    check = q.check_shared_experts(fp8.model_dir, model=model)
    assert check.checkpoint_passed and check.reloaded and check.failing_layers == [3]
    assert check.failures == ["layer 3: shared_experts.gate_up_proj loaded as zeros"]


def test_sharded_output_keeps_its_index_in_hub_layout(src: Path, tmp_path: Path) -> None:
    res = q.quantize(src, tmp_path / "sharded", q.QuantRecipe.from_params("fp8_dynamic", max_shard_size="600KB"))
    d = Path(res.model_dir)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    st = _dtypes(d)
    assert len(list(d.glob("*.safetensors"))) > 1 and set(index["weight_map"]) == set(st)
    assert index["metadata"]["total_size"] == sum(torch.Size(s).numel() * BITS[t] // 8 for t, s in st.values())
    assert res.report.shared_expert_check.passed and res.report.reload["ok"]


def test_remaking_the_same_output_writes_the_same_bytes(src: Path, tmp_path: Path) -> None:
    # two profiles with the same download, recipe and code share one content-addressed folder: re-making it (the
    # second profile's first run) must not change what the first profile's runs recorded, or their reuse breaks
    from m3lab.digest import folder_manifest

    out = tmp_path / "fp8"
    q.quantize(src, out, "fp8_dynamic")
    before = folder_manifest(out)
    q.quantize(src, out, "fp8_dynamic")
    assert folder_manifest(out) == before


def test_ignore_pattern_matching_only_hub_names_is_rejected(src: Path, tmp_path: Path) -> None:
    # the card's spelling alone: llm-compressor sees `self_attn.indexer.q_proj` and quantizes it
    ignore = [p for p in q.DEFAULT_IGNORE if "index" not in p] + [r"re:.*self_attn\.index_.*"]
    with pytest.raises(q.QuantizeError, match=r"layers\.1\.self_attn\.index_k_proj matches ignore but was quantized"):
        q.quantize(src, tmp_path / "out", q.QuantRecipe.from_params({"recipe": "fp8_dynamic", "ignore": ignore}))
    assert list(tmp_path.iterdir()) == []


def test_unknown_recipe_is_a_clear_error(src: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"quantize\.recipe: unknown recipe 'int3'; registered: none, fp8_dynamic"):
        q.quantize(src, tmp_path / "out", "int3")
    with pytest.raises(ValueError, match=r"'mxfp4' \(AMD Quark OCP MXFP4 \(card 001\)\) is planned, not implemented yet; runnable: none, fp8_dynamic"):
        q.QuantRecipe(recipe="mxfp4", ignore=None, verify=True)
    with pytest.raises(ValueError, match=r"^quantize: recipe 'mxfp4' needs its options under quantize\.quark$"):
        q.QuantRecipe.from_params("mxfp4")
    assert not (tmp_path / "out").exists()


def test_failure_mid_quantize_leaves_no_output(src: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "fp8"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fp8_dynamic, "write_config", boom)  # after llm-compressor has written the shards
    with pytest.raises(RuntimeError, match="disk full"):
        q.quantize(src, out, "fp8_dynamic")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temp folder

    out.mkdir()  # a previous good result survives a failed re-run untouched
    (out / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="disk full"):
        q.quantize(src, out, "fp8_dynamic")
    assert [p.name for p in tmp_path.iterdir()] == ["fp8"] and (out / "config.json").read_text() == "{}"


def test_none_passes_the_download_through(src: Path, tmp_path: Path) -> None:
    res = q.quantize(src, tmp_path / "none", "none")
    out = Path(res.model_dir)
    links = [p for p in out.iterdir() if p.name != q.REPORT_NAME]
    assert links and all(p.is_symlink() and p.resolve().parent == src.resolve() for p in links)
    r = res.report
    assert r.bits_per_weight == 16.0 and set(r.formats) == {"bf16"} and r.excluded_modules == []
    assert r.size_bytes == sum(p.stat().st_size for p in src.iterdir())
    assert r.shared_expert_check.passed and r.reload["ok"]


# The card's own checkpoints go through the pass-through recipe (`model.use: published`); verify=False because
# transformers cannot load these layouts on CPU. Real M3 config field names (moe_layer_freq, text_config).
PUBLISHED = {  # format: (stored format of a quantized module, bits per weight of that module)
    "autoround3": ("autoround int3 g128", 3 + 19 / 128),  # 3-bit codes + 3-bit zero + fp16 scale per 128
    "mlx4": ("mlx int4 g64", 4 + 32 / 64),  # 4-bit codes + fp16 scale and bias per 64 (U32 packed)
    "mxfp4": ("mxfp4 g32", 4 + 8 / 32),  # E2M1 codes + one E8M0 byte per 32
}


@pytest.mark.parametrize("fmt", sorted(PUBLISHED))
def test_published_quantized_checkpoints_are_measured_not_read_as_16_bits(fmt: str, tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / fmt, fmt)
    res = q.quantize(d, tmp_path / "out", q.QuantRecipe.from_params({"recipe": "none", "verify": False}))
    r = res.report
    label, module_bpw = PUBLISHED[fmt]
    assert r.formats[label] > 0 and set(r.formats) == {label, "bf16"}
    assert module_bpw < r.bits_per_weight < 16.0  # the bf16 embeddings, lm_head and router pull it up a little
    assert r.bits_per_weight == res.inspect["bits_per_weight"]
    assert set(r.excluded_modules) == set(res.inspect["excluded"]["modules"]) and any(
        m.endswith("lm_head") for m in r.excluded_modules)
    check = r.shared_expert_check
    assert check.passed and not check.reloaded and check.moe_layers == REAL_MOE_LAYERS
    assert check.sources == ["moe_layer_freq"]


@pytest.mark.parametrize("fmt", sorted(PUBLISHED))
def test_published_checkpoint_with_zeroed_shared_experts_fails_the_stage(fmt: str, tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / fmt, fmt, zero=(4,))
    with pytest.raises(q.QuantizeError, match=r"\(MoE layers \[4\] of \[3, 4\]\): layer 4: shared expert gate"):
        q.quantize(d, tmp_path / "out", q.QuantRecipe.from_params({"recipe": "none", "verify": False}))
    d = write_checkpoint(tmp_path / f"{fmt}-dropped", fmt, drop=(3,))
    with pytest.raises(q.QuantizeError, match=r"\(MoE layers \[3\] of \[3, 4\]\): layer 3: shared expert gate "
                                              r"projection missing"):
        q.quantize(d, tmp_path / "out", q.QuantRecipe.from_params({"recipe": "none", "verify": False}))
    assert not (tmp_path / "out").exists()
