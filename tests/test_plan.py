"""`m3lab plan`: every profile plans without running anything; the planned lines carry the cards' flags exactly;
a profile whose weights cannot fit is an error naming the numbers."""

import subprocess
import sys

import pytest
import yaml

from m3lab.cli import main
from m3lab.memplan import PlanError
from m3lab.params import PARAMS_DIR, load_params
from m3lab.plan import format_plan, make_plan

PROFILES = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml") if not p.stem.startswith("base"))


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_plans(profile):
    plan = make_plan(load_params(profile))
    text = format_plan(plan)
    assert set(plan.stages) == {"download", "quantize", "serve", "correctness", "needle", "benchmark", "plot"}
    if load_params(profile).hardware.accelerator != "none":
        assert plan.memory["fits_max_model_len"], text
        assert plan.memory["weights_per_gpu_gib"] > 0


def test_card_001_serve_and_lm_eval_lines_are_the_cards_own():
    plan = make_plan(load_params("mi355x8-mxfp4"))
    serve = plan.stages["serve"][0]
    card_flags = ("--trust-remote-code --block-size 128 --tensor-parallel-size 8 --attention-backend TRITON_ATTN "
                  "--mm-encoder-tp-mode data --mm-encoder-attn-backend ROCM_AITER_FA --tool-call-parser minimax_m3 "
                  "--enable-auto-tool-choice --reasoning-parser minimax_m3 --moe-backend emulation")
    for flag in card_flags.split(" --"):
        assert ("--" + flag.removeprefix("--")) in serve
    lm_eval = [line for line in plan.stages["correctness"] if line.startswith("lm_eval ")]
    assert len(lm_eval) == 1  # the card states no seed: one run with lm-eval's defaults
    assert ("lm_eval --model local-chat-completions --model_args "
            "model=m3,base_url=http://127.0.0.1:8000/v1/chat/completions,num_concurrent=32,max_gen_toks=16384 "
            "--tasks gsm8k --num_fewshot 5 --batch_size 1 --apply_chat_template --fewshot_as_multiturn") in lm_eval[0]



def test_reproducing_card_001_plans_the_cards_quark_script(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"extends": "mi355x8-mxfp4", "profile": "p", "model": {"use": "reproduce"}}))
    lines = make_plan(load_params(path)).stages["quantize"]
    assert "exclude_layers_name=['*lm_head', '*vision_tower*'" in lines[0]
    assert "get_config(scheme='mxfp4'" in lines[1] and "direct_quantize_checkpoint" in lines[2]


def test_card_000_runs_each_eval_once_per_seed_with_its_cap():
    lines = make_plan(load_params("mi350x8-fp8-dynamic")).stages["correctness"]
    assert sum("--tasks gsm8k_platinum" in x and "max_gen_toks=64000" in x for x in lines) == 3
    assert sum("lighteval|aime25|0" in x for x in lines) == 8  # AIME: eight seeds
    assert sum("lcb:codegeneration_v6" in x and "max_new_tokens:2048" in x for x in lines) == 3
    assert all("--seed" in x or "seed:" in x for x in lines if x.startswith(("lm_eval", "lighteval")))


def test_card_002_engine_args_and_memory_plan_match_the_card():
    plan = make_plan(load_params("rtxpro6000x2-autoround"))
    serve = plan.stages["serve"][0]
    for flag in ("--tensor-parallel-size 2", "--enable-expert-parallel", "--block-size 128",
                 "--attention-backend TRITON_ATTN", "--gpu-memory-utilization 0.97", "--disable-custom-all-reduce",
                 "--dtype bfloat16", "--max-model-len 40960", "--enforce-eager", '"n_shared_experts": 1'):
        assert flag in serve
    assert plan.memory["weights_per_gpu_gib"] == pytest.approx(87.6, rel=0.10)  # card: 87.6 GiB per GPU
    assert plan.memory["kv_cache_tokens"] == pytest.approx(46464, rel=0.10)  # card: KV 46,464 tokens


def test_dropping_an_inherited_flag_with_false():
    serve = make_plan(load_params("h200x8-mxfp4")).stages["serve"][0]
    assert "--mm-encoder-attn-backend" not in serve and "--moe-backend emulation" in serve


def test_multi_node_profile_uses_ray_and_pipeline_parallel():
    plan = make_plan(load_params("h100x8x2-bf16-ray"))
    assert "--distributed-executor-backend ray" in plan.stages["serve"][0]
    assert "--pipeline-parallel-size 2" in plan.stages["serve"][0]
    assert any("Ray cluster of 2 nodes" in x for x in plan.stages["serve"])


def _profile(tmp_path, **over):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"extends": "h100x8-fp8", "profile": "p", **over}))
    return path


def test_tp_larger_than_the_declared_gpus_is_an_error(tmp_path, capsys):
    path = _profile(tmp_path, serve={"args": {"--tensor-parallel-size": 16}})
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--tensor-parallel-size 16" in err and "hardware.gpus 8" in err and str(path) in err


def test_weights_that_cannot_fit_are_an_error_naming_the_numbers(tmp_path):
    path = _profile(tmp_path, model={"use": "reproduce"}, quantize={"recipe": "none"},
                    hardware={"gpus": 2}, serve={"args": {"--tensor-parallel-size": 2}})
    with pytest.raises(PlanError, match=r"needs [\d.]+ GiB per GPU, the profile's GPUs have [\d.]+ GiB"):
        make_plan(load_params(path))


def test_unknown_parser_is_a_params_error(tmp_path, capsys):
    path = _profile(tmp_path, serve={"args": {"--reasoning-parser": "minimax_m4"}})
    assert main(["plan", str(path)]) == 2
    assert "--reasoning-parser 'minimax_m4' is not a parser vLLM knows" in capsys.readouterr().err


def test_plan_command_runs_nothing_and_prints_the_server_line():
    out = subprocess.run([sys.executable, "-m", "m3lab", "plan", "m3ultra-mlx-q4"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "mlx_lm.server --model" in out.stdout and "temperature" in out.stdout
