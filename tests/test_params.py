"""Params: extends + deep merge, schema errors that name the file and the key path, every profile valid."""

from pathlib import Path

import pytest
import yaml

from m3lab.params import PARAMS_DIR, ParamsError, load_params, params_hash

MINIMAL = {
    "profile": "t",
    "model": {"repo_id": "org/m", "revision": "main"},
    "correctness": {"prompts": [{"id": "a", "prompt": "p", "expect": ["x"]}]},
    "needle": {"lengths": [128], "depths": [50]},
    "benchmark": {"concurrency": [1]},
}


def write(tmp: Path, name: str, data: dict) -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(data, allow_unicode=True))
    return p


@pytest.mark.parametrize("path", sorted(PARAMS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_profile_validates(path):
    if path.stem.startswith("base"):
        pytest.skip(f"{path.name} is a fragment, only meaningful under a profile")
    p = load_params(path)
    assert p.profile == path.stem


def test_default_profile_is_the_embedded_cpu_tiny():
    p = load_params(None)
    assert p.profile == "cpu-tiny" and p.model.source == "embedded" and p.serve.engine == "transformers"


def test_extends_merges_deeply_and_profile_wins(tmp_path):
    write(tmp_path, "base.yaml", {**MINIMAL, "serve": {"host": "127.0.0.1", "args": {"--a": 1}},
                                  "needle": {"lengths": [128, 256], "depths": [0, 50], "max_tokens": 4}})
    p = load_params(write(tmp_path, "child.yaml", {"extends": "base.yaml", "profile": "child",
                                                   "needle": {"depths": [100]}, "serve": {"port": 8123}}))
    assert p.needle.lengths == [128, 256]  # kept from base
    assert p.needle.depths == [100.0]  # lists replace, not append
    assert p.needle.max_tokens == 4
    assert p.serve.port == 8123 and p.serve.host == "127.0.0.1" and p.serve.args == {"--a": 1}


def test_wrong_type_names_file_and_key_path(tmp_path):
    path = write(tmp_path, "bad.yaml", {**MINIMAL, "serve": {"port": "abc"}})
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert f"{path}: serve.port: expected int, got 'abc'" in str(e.value)


def test_error_names_the_base_file_that_set_the_bad_value(tmp_path):
    write(tmp_path, "base.yaml", {**MINIMAL, "benchmark": {"concurrency": ["many"]}})
    child = write(tmp_path, "child.yaml", {"extends": "base.yaml", "profile": "c"})
    with pytest.raises(ParamsError) as e:
        load_params(child)
    assert f"{tmp_path / 'base.yaml'}: benchmark.concurrency.0: expected int, got 'many'" in str(e.value)


def test_unknown_key_is_an_error_not_ignored(tmp_path):
    with pytest.raises(ParamsError, match=r"quantize.recipee: unknown key"):
        load_params(write(tmp_path, "p.yaml", {**MINIMAL, "quantize": {"recipee": "fp8_dynamic"}}))


def test_missing_required_key_is_named(tmp_path):
    data = {k: v for k, v in MINIMAL.items() if k != "model"}
    with pytest.raises(ParamsError, match=r"p.yaml: model: required key is missing"):
        load_params(write(tmp_path, "p.yaml", data))


def test_unknown_recipe_and_engine_list_the_choices(tmp_path):
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, "p.yaml", {**MINIMAL, "quantize": {"recipe": "int3"},
                                               "serve": {"engine": "tgi"}}))
    msg = str(e.value)
    assert "p.yaml: quantize.recipe: unknown recipe 'int3'; registered: none, fp8_dynamic," in msg
    assert "p.yaml: serve.engine: unknown engine 'tgi'; registered: transformers, vllm, mlx" in msg


def test_engine_flags_must_be_written_as_on_the_command_line(tmp_path):
    with pytest.raises(ParamsError, match=r"serve.args: engine flag 'block-size' must be written as on the"):
        load_params(write(tmp_path, "p.yaml", {**MINIMAL, "serve": {"args": {"block-size": 128}}}))


def test_extends_cycle_and_missing_base_are_errors(tmp_path):
    write(tmp_path, "a.yaml", {"extends": "b.yaml"})
    write(tmp_path, "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ParamsError, match="cycle"):
        load_params(tmp_path / "a.yaml")
    with pytest.raises(ParamsError, match=r"extends: no such params file 'nope.yaml'"):
        load_params(write(tmp_path, "c.yaml", {**MINIMAL, "extends": "nope.yaml"}))


def test_bad_yaml_and_unknown_profile_are_clear(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ParamsError, match=r"broken.yaml: not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match=r"no-such-profile: no such params file"):
        load_params("no-such-profile")


def test_params_hash_ignores_key_order():
    assert params_hash({"a": 1, "b": [1, 2]}) == params_hash({"b": [1, 2], "a": 1})
    assert params_hash({"a": 1}) != params_hash({"a": 2})
