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


# --------------------------------------------------------------------------------------------------------------
# List extends: base files, a card, a hardware file, merged left to right, then the profile's own keys.


def test_list_extends_merges_left_to_right_then_the_profile(tmp_path):
    write(tmp_path, "base.yaml", {**MINIMAL, "serve": {"host": "127.0.0.1", "port": 8001, "args": {"--a": 1}},
                                  "benchmark": {"concurrency": [1], "num_prompts": 3}})
    (tmp_path / "cards").mkdir()
    write(tmp_path / "cards", "c.yaml", {"serve": {"port": 8002, "args": {"--b": 2}}, "benchmark": {"num_prompts": 5},
                                         "needle": {"depths": [0]}})
    (tmp_path / "hardware").mkdir()
    write(tmp_path / "hardware", "h.yaml", {"hardware": {"name": "box", "accelerator": "nvidia", "gpus": 1},
                                            "serve": {"port": 8003}})
    p = load_params(write(tmp_path, "prof.yaml", {"extends": ["base.yaml", "cards/c.yaml", "hardware/h.yaml"],
                                                  "profile": "prof", "benchmark": {"num_prompts": 7}}))
    assert p.serve.port == 8003  # the later entry wins over the earlier ones
    assert p.serve.args == {"--a": 1, "--b": 2} and p.serve.host == "127.0.0.1"  # mappings merge across entries
    assert p.benchmark.num_prompts == 7  # the profile's own keys win over every entry
    assert p.needle.depths == [0.0] and p.needle.lengths == [128]
    assert p.hardware.name == "box" and p.extends == ["base.yaml", "cards/c.yaml", "hardware/h.yaml"]
    swapped = load_params(write(tmp_path, "swapped.yaml", {"extends": ["base.yaml", "hardware/h.yaml", "cards/c.yaml"],
                                                           "profile": "swapped"}))
    assert swapped.serve.port == 8002 and swapped.benchmark.num_prompts == 5


def test_list_extends_error_names_the_entry_file_that_set_the_bad_value(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL)
    write(tmp_path, "hw.yaml", {"hardware": {"gpus": -1}})
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, "p.yaml", {"extends": ["base.yaml", "hw.yaml"], "profile": "p"}))
    assert f"{tmp_path / 'hw.yaml'}: hardware.gpus:" in str(e.value)


def test_list_extends_missing_entry_names_the_profile_and_the_path(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL)
    prof = write(tmp_path, "p.yaml", {"extends": ["base.yaml", "cards/999.yaml"], "profile": "p"})
    with pytest.raises(ParamsError) as e:
        load_params(prof)
    msg = str(e.value)
    assert msg.startswith(f"{prof}: extends: no such params file 'cards/999.yaml' (looked for ")
    assert f"{tmp_path / 'cards' / '999.yaml'}, params/cards/999.yaml, cards/999.yaml)" in msg  # where it looked


def test_list_extends_cycle_names_the_chain(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL)
    write(tmp_path, "a.yaml", {"extends": ["base.yaml", "b.yaml"]})
    write(tmp_path, "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, "p.yaml", {"extends": ["a.yaml"], "profile": "p"}))
    chain = " -> ".join(str(tmp_path / n) for n in ("p.yaml", "a.yaml", "b.yaml", "a.yaml"))
    assert str(e.value) == f"{tmp_path / 'b.yaml'}: extends: cycle {chain}; remove one of these extends entries"


def test_the_same_file_twice_in_two_branches_is_no_cycle(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL)
    write(tmp_path, "x.yaml", {"extends": "base.yaml", "serve": {"port": 8010}})
    p = load_params(write(tmp_path, "p.yaml", {"extends": ["base.yaml", "x.yaml"], "profile": "p"}))
    assert p.serve.port == 8010


@pytest.mark.parametrize("bad", [["base.yaml", 3], [["base.yaml"]], ["base.yaml", ""], {"a": "base.yaml"}, 7])
def test_an_extends_entry_that_is_not_a_file_name_is_an_error(tmp_path, bad):
    write(tmp_path, "base.yaml", MINIMAL)
    prof = write(tmp_path, "p.yaml", {"extends": bad, "profile": "p"})
    with pytest.raises(ParamsError, match=rf"^{prof}: extends(\.\d)?: expected a file name"):
        load_params(prof)


# --------------------------------------------------------------------------------------------------------------
# Hardware facts: a memory bandwidth always comes with its source.


def _hw(tmp_path, **hardware):
    return write(tmp_path, "p.yaml", {**MINIMAL, "hardware": {"name": "box", "accelerator": "nvidia", "gpus": 1,
                                                               **hardware}})


def test_bandwidth_with_its_source_validates(tmp_path):
    hw = load_params(_hw(tmp_path, memory_bandwidth_gb_s=4800, memory_bandwidth_source="a datasheet")).hardware
    assert hw.memory_bandwidth_gb_s == 4800.0 and hw.memory_bandwidth_source == "a datasheet"


@pytest.mark.parametrize("fields, says", [
    ({"memory_bandwidth_gb_s": 4800}, "hardware.memory_bandwidth_gb_s: 4800 GB/s needs its source: add "
                                      "memory_bandwidth_source"),
    ({"memory_bandwidth_gb_s": 4800, "memory_bandwidth_source": "  "}, "hardware.memory_bandwidth_gb_s: 4800 GB/s "
                                                                        "needs its source"),
    ({"memory_bandwidth_source": "a datasheet"}, "hardware.memory_bandwidth_source: a source without a figure: add "
                                                 "memory_bandwidth_gb_s"),
    ({"memory_bandwidth_gb_s": 0, "memory_bandwidth_source": "x"}, "hardware.memory_bandwidth_gb_s: Input should be "
                                                                    "greater than 0"),
    ({"memory_bandwidth_gb_s": -1.5, "memory_bandwidth_source": "x"}, "hardware.memory_bandwidth_gb_s: Input should "
                                                                       "be greater than 0"),
    ({"memory_bandwidth_gb_s": float("inf"), "memory_bandwidth_source": "x"}, "hardware.memory_bandwidth_gb_s: Input "
                                                                               "should be a finite number"),
    ({"memory_bandwidth_gb_s": "fast", "memory_bandwidth_source": "x"}, "hardware.memory_bandwidth_gb_s: expected "
                                                                         "float"),
])
def test_bad_bandwidth_is_an_error_naming_file_and_key(tmp_path, fields, says):
    with pytest.raises(ParamsError) as e:
        load_params(_hw(tmp_path, **fields))
    assert str(e.value).startswith(f"{tmp_path / 'p.yaml'}: {says}")


def test_errors_name_the_file_that_set_the_key_through_nested_extends(tmp_path):
    """A profile over a profile over base/card/hardware files: the file named is the one that wrote the key."""
    write(tmp_path, "base.yaml", MINIMAL)
    write(tmp_path, "hw.yaml", {"hardware": {"name": "box", "accelerator": "nvidia", "gpus": 1}})
    write(tmp_path, "card.yaml", {"needle": {"depths": [200]}})
    write(tmp_path, "mid.yaml", {"extends": ["base.yaml", "card.yaml", "hw.yaml"], "profile": "mid"})
    top = write(tmp_path, "top.yaml", {"extends": "mid.yaml", "profile": "top",
                                       "hardware": {"memory_bandwidth_gb_s": 100}})
    with pytest.raises(ParamsError) as e:
        load_params(top)
    assert str(e.value).splitlines() == [
        f"{top}: hardware.memory_bandwidth_gb_s: 100 GB/s needs its source: add memory_bandwidth_source (the "
        f"datasheet or URL the figure comes from), or remove the bandwidth",
        f"{tmp_path / 'card.yaml'}: needle.depths: depths are percentages in [0, 100], got [200.0]",
    ]


# --------------------------------------------------------------------------------------------------------------
# The shipped params: three kinds of file (params/README.md).

CARDS = sorted((PARAMS_DIR / "cards").glob("*.yaml"))
HARDWARE = sorted((PARAMS_DIR / "hardware").glob("*.yaml"))
PROFILES = sorted(p for p in PARAMS_DIR.glob("*.yaml") if not p.stem.startswith("base"))
# A profile's name starts with its hardware file's name, but for these (the tiny model's one-GPU profiles are
# named for the H200 their reference runs were made on; hardware/hopper1.yaml is sized to fit an H100 too).
HARDWARE_ALIASES = {"h200": "hopper1"}


def _chain_files(path: Path) -> list[Path]:
    """Every file `path` extends, depth first (resolved as the loader does)."""
    from m3lab.params import _extends_path

    bases = yaml.safe_load(path.read_text()).get("extends") or []
    out: list[Path] = []
    for b in [bases] if isinstance(bases, str) else bases:
        f = _extends_path(path, b)
        out += [f, *_chain_files(f)]
    return out


def test_there_are_cards_hardware_and_profiles():
    assert {p.stem for p in CARDS} == {"000", "001", "002", "003", "tiny"}
    assert len(HARDWARE) >= 8 and len(PROFILES) >= 13


@pytest.mark.parametrize("path", CARDS + HARDWARE + sorted(PARAMS_DIR.glob("base*.yaml")),
                         ids=lambda p: str(p.relative_to(PARAMS_DIR)))
def test_fragments_extend_nothing(path):
    assert "extends" not in yaml.safe_load(path.read_text()), f"{path}: only profiles extend other files"


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.name)
def test_a_card_file_holds_what_its_card_states_and_block_style_claims(path):
    data = yaml.safe_load(path.read_text())
    assert data["card"]["id"] == path.stem and data["claims"]
    assert set(data) <= {"card", "claims", "model", "quantize", "serve", "correctness", "needle", "benchmark"}
    assert "hardware" not in data and "profile" not in data
    assert set(data.get("model", {})) <= {"source", "repo_id", "revision", "published", "published_revision",
                                          "max_model_len"}
    assert all(c["card"] == data["card"]["id"] for c in data["claims"])
    root = yaml.compose(path.read_text())
    claims = next(v for k, v in root.value if k.value == "claims")
    for node in claims.value:
        cid = next(v.value for k, v in node.value if k.value == "id")
        assert not node.flow_style, f"{path}: claim {cid} is a {{...}} flow mapping: write one field per line"
        for k, v in node.value:
            if isinstance(v, yaml.MappingNode):
                assert not v.flow_style, f"{path}: claim {cid}: {k.value} is a {{...}} flow mapping"


@pytest.mark.parametrize("path", HARDWARE, ids=lambda p: p.name)
def test_a_hardware_file_holds_hardware_facts_only(path):
    from m3lab.params import Hardware

    data = yaml.safe_load(path.read_text())
    assert set(data) == {"hardware"}, f"{path}: a hardware file has only the hardware: section"
    hw = Hardware.model_validate(data["hardware"])
    if hw.accelerator == "none":
        assert hw.memory_bandwidth_gb_s is None
    else:
        assert hw.gpus >= 1 and hw.gpu_memory_gib > 0
        assert hw.memory_bandwidth_gb_s and hw.memory_bandwidth_source, f"{path}: a GPU's bandwidth and its source"


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_a_profile_is_base_card_hardware_and_at_most_one_profile_it_varies(path):
    data = yaml.safe_load(path.read_text())
    chain = _chain_files(path)
    kinds = [f.parent.name if f.parent != PARAMS_DIR else ("base" if f.stem.startswith("base") else "profile")
             for f in chain]
    assert kinds.count("hardware") == 1, f"{path}: extends exactly one hardware/ file ({chain})"
    assert kinds.count("cards") <= 1 and kinds.count("profile") <= 1
    hardware = next(f.stem for f, k in zip(chain, kinds) if k == "hardware")
    head = data["profile"].split("-")[0]
    assert HARDWARE_ALIASES.get(head, head) == hardware, (
        f"{path}: <hardware>-<recipe>[-<variant>]: the name starts with {head!r}, the hardware file is {hardware!r}")
    assert data["profile"] == path.stem
