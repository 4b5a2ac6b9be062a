"""Bad profiles are refused before anything runs: a ParamsError that names the file and the key, no run folder,
no server. Each case is one way a real profile went wrong in the reliability probe (issue G)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from m3lab.dag import RunError, run
from m3lab.params import PARAMS_DIR, ParamsError, load_params

TOKEN = "hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7"  # token-shaped, not a real token


def profile(tmp_path: Path, **over) -> Path:
    data = {"extends": str(PARAMS_DIR / "cpu-tiny.yaml"), "profile": "bad", **over}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data, allow_unicode=True))
    return p


CASES = [
    ({"benchmark": {"num_prompts": True}}, r"num_prompts: expected an integer, got True"),
    ({"needle": {"lengths": [True, 512]}}, r"lengths: expected an integer"),
    ({"correctness": {"prompts": [{"id": "p", "prompt": "x", "expect": [""]}]}}, r"correctness\.prompts\.0\.expect"),
    ({"benchmark": {"num_prompts": 1e26}}, r"benchmark\.num_prompts"),
    ({"serve": {"startup_timeout_s": float("inf")}}, r"serve\.startup_timeout_s"),
    ({"serve": {"startup_timeout_s": 1e9}}, r"serve\.startup_timeout_s"),
    ({"serve": {"host": "0.0.0.0"}}, r"binds beyond this machine's loopback.*allow_nonlocal_host"),
    ({"serve": {"args": {"--device": "cpu", "--trust-remote-code": True}}}, r"allow_remote_code: true"),
    ({"profile": "../../x"}, r"profile: "),
    ({"profile": ""}, r"profile: "),
    ({"correctness": {"evals": [{"id": "tiny_arith", "args": {"--tasks": "tiny_arith"}, "metric": "acc"}]}},
     r"'<metric>,<filter>'"),
    ({"needle": {"lengths": [8192], "depths": [50]}}, r"none fits model\.max_model_len 4096"),
    ({"benchmark": {"concurrency": [0]}}, r"benchmark\.concurrency"),
    ({"benchmark": {"input_len": 4000, "output_len": 200}}, r"exceeds model\.max_model_len 4096"),
    ({"model": {"revision": ""}}, r"model\.revision"),
    ({"download": {"token_env": TOKEN}}, r"download\.token_env: looks like an access token"),
    ({"serve": {"env": {"HF_TOKEN": TOKEN}}}, r"serve\.env\.HF_TOKEN: looks like an access token"),
    ({"serve": {"engine": "tgi"}}, r"serve\.engine: unknown engine 'tgi'; registered: transformers, vllm, mlx"),
    ({"serve": {"fault": "zero_everything"}}, r"serve\.fault: unknown fault 'zero_everything'; registered:"),
    ({"quantize": {"recipe": "int3"}}, r"quantize\.recipe: unknown recipe 'int3'; registered:"),
    ({"correctness": {"evals": [{"id": "tiny_arith", "runner": "helm", "metric": "a,b"}]}},
     r"runner: unknown eval runner 'helm'; registered: lm_eval, lighteval, prompt_logprobs_ppl"),
    ({"serve": {"env": {"PYTHONPATH": "/x"}}}, r"serve: env: PYTHONPATH would replace.*serve\.python_path"),
    ({"serve": {"python_path": ["tools/no-such-plugin"]}}, r"serve: python_path: 'tools/no-such-plugin' is not a folder"),
    ({"correctness": {"baseline": {"checkpoint": None}}}, r"correctness\.baseline: .*exactly one baseline source"),
    ({"correctness": {"baseline": {"checkpoint": "download", "profile": "x"}}}, r"exactly one baseline source"),
    ({"correctness": {"baseline": {"checkpoint": None, "profile": "bad"}}},
     r"correctness\.baseline\.profile: 'bad' is this profile"),
    ({"correctness": {"baseline": {"checkpoint": None, "profile": "../x"}}}, r"correctness\.baseline\.profile"),
    ({"correctness": {"baseline": {"checkpoint": None, "profile": "cpu-tiny-nope"}}},
     r"correctness\.baseline\.profile: no profile 'cpu-tiny-nope'"),
    ({"quantize": {"recipe": "none"}}, r"download is the checkpoint this profile serves"),
    ({"correctness": {"numerics": {"repeats": 1}}}, r"correctness\.numerics\.repeats"),
    ({"correctness": {"chat": [{"id": "c", "messages": [{"role": "user", "content": "hi"}]}]}},
     r"chat check 'c' expects nothing"),
    ({"correctness": {"chat": [{"id": "c", "messages": [{"role": "user", "content": "hi"}],
                                "expect_tool": {"name": "get_weather"}}]}},
     r"chat check 'c': expect_tool 'get_weather' is not among its tools"),
    ({"claims": [{"id": "x", "card": "tiny", "metric": "m", "claimed": 1.0, "stage": "correctness",
                  "measure": "evals[id=tiny_arith].score", "tolerance": {"min": 0},
                  "protocol": {"--model": "local-chat-completions"}}]},
     r"claims\[x\]\.protocol: the card measured with --model 'local-chat-completions', but "
     r"correctness\.evals\[tiny_arith\]\.args has --model 'local-completions'"),
    ({"claims": [{"id": "x", "card": "tiny", "metric": "m", "claimed": 1.0, "stage": "needle",
                  "measure": "accuracy", "tolerance": {"min": 0}, "protocol": {"--stride": 1}}]},
     r"claims\[x\]\.protocol: its measure 'accuracy' names no eval"),
    ({"correctness": {"numerics": {"edges": [0]}}}, r"correctness\.numerics\.edges"),
]


@pytest.mark.parametrize("over, match", CASES, ids=[m[:40] for _, m in CASES])
def test_bad_profile_is_refused_naming_file_and_key(tmp_path, over, match):
    with pytest.raises(ParamsError, match=match) as e:
        load_params(profile(tmp_path, **over))
    assert str(e.value).startswith(f"{tmp_path / 'bad.yaml'}: ")  # the file that wrote the bad value, not a base
    assert TOKEN not in str(e.value)  # never echo the secret


def test_run_refuses_before_making_a_run_folder(tmp_path):
    with pytest.raises(ParamsError):
        run(profile(tmp_path, serve={"host": "0.0.0.0"}), root=tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_duplicate_yaml_keys_are_an_error_with_the_line(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text(f"extends: {PARAMS_DIR / 'cpu-tiny.yaml'}\nprofile: dup\nserve:\n  host: 127.0.0.1\n"
                 "  host: 0.0.0.0\n")
    with pytest.raises(ParamsError, match=r"dup\.yaml: not valid YAML: .*key 'host' appears twice \(first on line 4\)"):
        load_params(p)


def test_a_non_utf8_params_file_is_a_one_line_error(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("profile: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ParamsError, match=r"latin1\.yaml: not UTF-8 text"):
        load_params(p)


def test_opt_ins_let_the_same_settings_through(tmp_path):
    p = load_params(profile(tmp_path, serve={"host": "0.0.0.0", "allow_nonlocal_host": True,
                                             "allow_remote_code": True,
                                             "args": {"--device": "cpu", "--trust-remote-code": True}}))
    assert p.serve.host == "0.0.0.0" and p.serve.allow_remote_code


@pytest.mark.parametrize("name", sorted(x.stem for x in PARAMS_DIR.glob("*.yaml") if not x.stem.startswith("base")))
def test_every_shipped_profile_still_loads(name):
    assert load_params(name).profile == name


def test_a_read_only_results_folder_is_a_one_line_error(tmp_path, monkeypatch):
    """A read-only filesystem cannot be made here without privileges (and root writes through chmod), so the
    OS's EROFS answer is injected at the one call that meets it first: the run lock."""
    import errno
    import os

    import m3lab.dag as dag

    real_open = os.open

    def read_only(path, *a, **kw):
        if str(path).endswith(".run.lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(dag.os, "open", read_only)
    with pytest.raises(RunError, match=r"cannot create the run lock \(Read-only file system\); is the results "
                                       r"folder writable"):
        run("cpu-tiny", root=tmp_path)
    assert not [p for p in (tmp_path / "cpu-tiny").iterdir() if p.name[:1].isdigit()]
