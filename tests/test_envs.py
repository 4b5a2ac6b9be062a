"""m3lab.envs: pinned overlay environments. Real pip, installing a small pure-Python package from PyPI into a
temporary envs folder (the same index `make setup` uses)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from m3lab import envs
from m3lab.params import ParamsError, load_params


@pytest.fixture
def env_files(tmp_path, monkeypatch):
    """A private m3lab/envs/ (requirements) and envs dir (overlays)."""
    spec = tmp_path / "spec"
    spec.mkdir()
    monkeypatch.setattr(envs, "_HERE", spec)
    monkeypatch.setattr(envs, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("M3LAB_ENVS_DIR", str(tmp_path / "built"))
    return spec


def test_an_unpinned_requirement_is_refused_naming_file_and_line(env_files):
    (env_files / "loose.txt").write_text("# comment\nsix==1.16.0\nrequests>=2\n")
    with pytest.raises(envs.EnvError, match=r"loose.txt:3: 'requests>=2' is not pinned"):
        envs.build("loose")
    assert not (envs.envs_dir() / "loose").exists()


def test_missing_and_stale_environments_name_the_command_that_builds_them(env_files):
    (env_files / "tool.txt").write_text("six==1.16.0\n")
    assert envs.status("tool") == "missing"
    with pytest.raises(envs.EnvError, match=r"quantize.recipe 'x' runs in environment 'tool', which is not built.*"
                                            r"make setup"):
        envs.require("tool", "quantize.recipe 'x'")
    with pytest.raises(envs.EnvError, match="no spec/nothing.txt"):
        envs.require("nothing", "serve.environment")


def test_build_installs_exactly_the_pins_and_a_child_imports_them(env_files):
    (env_files / "tool.txt").write_text("six==1.16.0  # a pure-Python package\n")
    path = envs.build("tool")
    assert envs.status("tool") == "ready"
    marker = json.loads((path / envs.MARKER).read_text())
    assert marker["packages"] == ["six==1.16.0"]
    out = subprocess.run([sys.executable, "-c", "import six; print(six.__version__, six.__file__)"],
                         env={"PYTHONPATH": envs.pythonpath("tool", "test")}, capture_output=True, text=True)
    assert out.stdout.split()[0] == "1.16.0" and out.stdout.split()[1].startswith(str(path))
    # an edited requirements file makes the built one stale, and require() says so
    (env_files / "tool.txt").write_text("six==1.17.0\n")
    assert envs.status("tool") == "stale"
    with pytest.raises(envs.EnvError, match="built from other requirements"):
        envs.require("tool", "t")


def test_activate_refuses_an_overlay_that_shadows_an_imported_package(env_files, tmp_path):
    (env_files / "shadow.txt").write_text("six==1.16.0\n")
    built = envs.envs_dir() / "shadow"
    (built / "json").mkdir(parents=True)  # stands in for an overlay that carries a second copy of an imported package
    (built / envs.MARKER).write_text(json.dumps({"requirements_sha256": envs._digest("shadow")}))
    with pytest.raises(envs.EnvError, match=r"holds \['json'\], already imported"):
        envs.activate("shadow", "correctness")


def test_a_profile_naming_an_unknown_environment_is_refused(tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_text("extends: [cpu-tiny.yaml]\nserve:\n  environment: nope\n")
    with pytest.raises(ParamsError, match=r"serve: environment: unknown environment 'nope'"):
        load_params(str(prof))
