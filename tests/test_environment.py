"""environment.yml and pyproject.toml list the same dependencies, and torch is pinned to a CPU build."""

import re
import tomllib

import yaml

from m3lab.params import REPO_ROOT


def _name(req: str) -> str:
    return re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def _conda_pip() -> list[str]:
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict)][0]["pip"]
    return [p for p in pip if not p.startswith("-e")]


def test_environment_yml_and_pyproject_list_the_same_requirements():
    proj = _pyproject()
    wanted = set(proj["dependencies"]) | set(proj["optional-dependencies"]["cpu"]) | set(
        proj["optional-dependencies"]["dev"])
    assert set(_conda_pip()) == wanted


def test_torch_is_pinned_exactly_so_pip_never_picks_a_cuda_build():
    assert "torch==2.13.0" in _conda_pip()
    assert _pyproject()["optional-dependencies"]["cpu"] == ["torch==2.13.0"]
    assert (REPO_ROOT / "constraints.txt").read_text().split() == ["torch==2.13.0"]


def test_the_named_packages_are_dependencies():
    names = {_name(r) for r in _conda_pip()} | {_name(r) for r in _pyproject()["optional-dependencies"]["gpu"]}
    for pkg in ("jupyterlab", "papermill", "vllm", "matplotlib", "pandas", "huggingface-hub"):
        assert pkg in names, pkg
