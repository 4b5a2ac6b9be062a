"""The vLLM server as data (vLLM cannot run on this CPU box): the h200-tiny-bf16 profile, the exact command
lines it and card 001 produce, and the text-only checkpoint layout vLLM loads."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from m3lab.checkpoint import read_tensors
from m3lab.params import Serve, load_params
from m3lab.serve import build_command, served_checkpoint
from m3lab.tinymodel import TinySpec

# shared/tools/vllm-gpu/README.md: what serve-smoke.sh ran on the H200 and the H100 (2026-11-22).
SMOKE_TEST = ("python3 -m vllm.entrypoints.cli.main serve MODEL_DIR --host 127.0.0.1 --port 8000 "
              "--served-model-name m3 --max-model-len 2048 --block-size 128 --attention-backend TRITON_ATTN "
              "--enforce-eager --gpu-memory-utilization 0.3 --trust-remote-code --tool-call-parser minimax_m3 "
              "--enable-auto-tool-choice --reasoning-parser minimax_m3")

# Card 001 (amd/MiniMax-M3-MXFP4), "Launching server", verbatim.
CARD_001 = """\
vllm serve /mnt/amd/MiniMax-M3-MXFP4 \\
  --trust-remote-code \\
  --block-size 128 \\
  --tensor-parallel-size 8 \\
  --attention-backend TRITON_ATTN \\
  --mm-encoder-tp-mode data \\
  --mm-encoder-attn-backend ROCM_AITER_FA \\
  --tool-call-parser minimax_m3 \\
  --enable-auto-tool-choice \\
  --reasoning-parser minimax_m3 \\
  --moe-backend emulation
"""


def one_line(shell: str) -> str:
    return " ".join(shell.replace("\\\n", " ").split())


@pytest.fixture(scope="module")
def profile():
    return load_params("h200-tiny-bf16")


def test_gpu_tiny_vllm_profile_is_the_smoke_tested_setup(profile):
    assert profile.description == "Embedded tiny MiniMax-M3 on one Hopper GPU (H100/H200), vLLM 0.25.1"
    hw = profile.hardware
    assert (hw.accelerator, hw.gpus, hw.gpu_memory_gib) == ("nvidia", 1, 80)
    m = profile.model
    assert (m.source, m.repo_id, m.revision, m.max_model_len) == ("embedded", "m3lab/tiny-minimax-m3", "main", 4096)
    assert TinySpec(**m.embedded) == TinySpec.hopper()  # head/index dims and index blocks of 128
    assert profile.quantize.recipe == "none"
    s = profile.serve
    assert (s.engine, s.engine_version, s.text_only, s.served_model_name) == ("vllm", "0.25.1", True, "m3")
    assert s.env == {"VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1"}
    assert s.args["--max-model-len"] == profile.model.max_model_len


def test_profile_builds_the_vllm_command_flag_for_flag(profile):
    argv = build_command("vllm", "/models/tiny.text-vllm", profile.serve.model_dump(), 8000)
    assert argv == [
        "vllm", "serve", "/models/tiny.text-vllm", "--host", "127.0.0.1", "--port", "8000",
        "--served-model-name", "m3",
        "--max-model-len", "4096", "--block-size", "128", "--attention-backend", "TRITON_ATTN",
        "--enforce-eager", "--gpu-memory-utilization", "0.3", "--trust-remote-code",
        "--tool-call-parser", "minimax_m3", "--enable-auto-tool-choice", "--reasoning-parser", "minimax_m3",
    ]
    # The README's smoke test, but for the profile's 4096-token context.
    smoke = SMOKE_TEST.replace("python3 -m vllm.entrypoints.cli.main", "vllm").replace("2048", "4096")
    assert shlex.join(argv) == smoke.replace("MODEL_DIR", "/models/tiny.text-vllm")


def test_boolean_flags_are_bare_and_false_flags_absent(profile):
    serve = profile.serve.model_dump()
    serve["args"] = {"--enforce-eager": False, "--trust-remote-code": True, "--disable-log-stats": None,
                     "--block-size": 128}
    argv = build_command("vllm", "/m", serve, 8000)
    assert argv[9:] == ["--trust-remote-code", "--disable-log-stats", "--block-size", "128"]


def test_card_001_mxfp4_command_from_params_keeps_its_flags_verbatim():
    serve = Serve.model_validate({  # a profile's serve section, validated by the schema
        "engine": "vllm",
        "allow_remote_code": True,  # the card passes --trust-remote-code
        "args": {
            "--trust-remote-code": True,
            "--block-size": 128,
            "--tensor-parallel-size": 8,
            "--attention-backend": "TRITON_ATTN",
            "--mm-encoder-tp-mode": "data",
            "--mm-encoder-attn-backend": "ROCM_AITER_FA",
            "--tool-call-parser": "minimax_m3",
            "--enable-auto-tool-choice": True,
            "--reasoning-parser": "minimax_m3",
            "--moe-backend": "emulation",
        },
    }).model_dump()
    card = one_line(CARD_001)
    card_dir, card_flags = "/mnt/amd/MiniMax-M3-MXFP4", card.split(" ", 3)[3]
    assert card_flags.startswith("--trust-remote-code") and card_flags.endswith("--moe-backend emulation")
    line = shlex.join(build_command("vllm", card_dir, serve, 8000))
    assert line.startswith(f"vllm serve {card_dir} --host 127.0.0.1 --port 8000 --served-model-name m3 ")
    assert line.endswith(" " + card_flags)  # every flag of the card, in the card's order, nothing between


def test_card_001_constant_is_the_seed_card():
    seeds = sorted(Path("/work/shared/seeds").glob("001_*.txt"))
    if not seeds:
        pytest.skip("the seed cards are not on this machine")
    assert one_line(CARD_001) in one_line(seeds[0].read_text())


def test_vllm_text_only_checkpoint_has_vllms_layout(tiny_checkpoint):
    assert served_checkpoint("vllm", str(tiny_checkpoint), text_only=False) == str(tiny_checkpoint)
    out = Path(served_checkpoint("vllm", str(tiny_checkpoint), text_only=True))
    assert out == Path(f"{tiny_checkpoint}.text-vllm")

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MiniMaxM3SparseForCausalLM"]
    assert config["model_type"] == "minimax_m3_vl" and "text_config" in config  # vLLM parses text_config
    assert config["text_config"] == json.loads((tiny_checkpoint / "config.json").read_text())["text_config"]

    vl = dict(read_tensors(tiny_checkpoint / "model.safetensors"))
    text = dict(read_tensors(out / "model.safetensors"))
    assert all(k.startswith(("model.", "lm_head.")) for k in text)
    lm = {k.removeprefix("language_model."): v for k, v in vl.items() if k.startswith("language_model.")}
    assert sorted(text) == sorted(lm)  # vision tower and projectors dropped, nothing else
    assert all(text[k].dtype == lm[k].dtype and text[k].equal(lm[k]) for k in text)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_checkpoint / name).read_bytes()

    mtime = (out / "config.json").stat().st_mtime_ns  # a second serve reuses the folder
    assert served_checkpoint("vllm", str(tiny_checkpoint), text_only=True) == str(out)
    assert (out / "config.json").stat().st_mtime_ns == mtime


def test_the_f2fix_plugin_line_is_a_startup_fact_and_its_absence_is_not():
    from m3lab.engines import vllm

    log = ("INFO model loaded\n"
           "[m3lab_f2fix pid=101] patched MiniMaxM3IndexerTritonImpl.forward and MiniMaxM3SparseTritonImpl.forward "
           "(upstream #49149)\n"
           "[m3lab_f2fix pid=202] patched MiniMaxM3IndexerTritonImpl.forward and MiniMaxM3SparseTritonImpl.forward "
           "(upstream #49149)\n")
    assert vllm.startup_facts(log)["f2fix"] == [
        "patched MiniMaxM3IndexerTritonImpl.forward and MiniMaxM3SparseTritonImpl.forward"]
    off = "[m3lab_f2fix pid=7] M3LAB_F2FIX=0: vLLM left as shipped\n"
    assert vllm.startup_facts(off)["f2fix"] == ["M3LAB_F2FIX=0: vLLM left as shipped"]
    assert "f2fix" not in vllm.startup_facts("INFO model loaded\n")


def test_python_path_goes_in_front_of_the_inherited_one(monkeypatch):
    from m3lab.serve import server_env

    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    env = server_env({"env": {"A": "1"}, "python_path": ["tools/f2/vllm_plugin"]})
    first, rest = env["PYTHONPATH"].split(":", 1)
    assert first.endswith("/tools/f2/vllm_plugin") and Path(first).is_dir() and rest == "/tmp/site"
    assert env["A"] == "1"
    assert "PYTHONPATH" not in server_env({"env": {}})  # nothing to add: the inherited one stays as it is
