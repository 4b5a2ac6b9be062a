"""`m3lab wheelhouse`: everything m3lab needs on an offline host, as wheels, at the versions tested here.

Air-gapped GPU clusters have a Python with torch (and often vLLM) but no package index. This command runs on a
machine that has one, and writes a folder to carry over:

    m3lab wheelhouse .gpu/wheels --python-version 3.12 --provided m3lab/hosts/lent-hopper.txt \\
        --provided ../shared/tools/vllm-gpu/requirements.lock
    # on the host:  bash wheels/install.sh /tmp/m3lab-site && export PYTHONPATH=/tmp/m3lab-site:$PYTHONPATH

How it decides what goes in:
  1. the dependency closure of the requested distributions, read from *this* environment's installed metadata
     (so the versions are exactly the ones m3lab's tests ran with — no fresh resolution, no surprises),
  2. minus what the host already provides (`--provided`: pip-freeze or requirements.lock files, or plain names):
     a provided distribution is skipped together with nothing else — its own dependencies are assumed to be
     provided too, which is what a working host environment means,
  3. `pip download --no-deps --only-binary=:all:` of each `name==version` for the target Python and platform.
`manifest.json` lists every wheel with its sha256 and every skipped distribution with the reason.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["WheelhouseError", "Wheelhouse", "DEFAULT_REQUIREMENTS", "closure", "read_provided", "build_wheelhouse"]

# What a batch run of the DAG needs on a host that has torch, transformers and vLLM: the notebook runner and
# report (papermill, nbconvert, ipykernel), params (pydantic, pyyaml), figures and tables, the hub client, the
# quantizer. JupyterLab and lm-eval are left out: add them by name when the host needs them.
DEFAULT_REQUIREMENTS = ["papermill", "nbconvert", "nbformat", "ipykernel", "pydantic", "pyyaml", "matplotlib",
                        "pandas", "huggingface_hub", "aiohttp", "llmcompressor", "compressed-tensors", "transformers",
                        "tokenizers", "safetensors"]
DATA = ("hosts/*.txt",)  # package lists of known offline hosts (m3lab.fingerprint)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_24_x86_64"]
# Never carried: platform shims that pip markers would skip on Linux anyway, and torch (the host's own build).
NEVER = {"torch", "appnope", "win32-setctime", "colorama", "aiocontextvars", "exceptiongroup", "tomli",
         "async-timeout", "importlib-metadata"}


class WheelhouseError(RuntimeError):
    """A wheelhouse cannot be built as asked; the message names the distribution or file."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0]


def closure(requirements: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of the requirements and their non-extra dependencies, from this
    environment's metadata."""
    seen: dict[str, str] = {}
    stack = [_requirement_name(r) for r in requirements]
    while stack:
        name = stack.pop()
        key = canonical(name)
        if key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            if name in [_requirement_name(r) for r in requirements]:
                raise WheelhouseError(f"{name}: not installed in {sys.executable}; install it (or drop it) first")
            continue  # an optional/platform-specific dependency that pip skipped here: not needed here either
        seen[key] = dist.version
        for req in dist.requires or []:
            if "extra ==" not in req:
                stack.append(_requirement_name(req))
    return seen


def read_provided(paths: list[Path]) -> set[str]:
    """Canonical names from pip-freeze / requirements.lock files (`name==ver`, `name @ url`) or name lists."""
    names: set[str] = set()
    for path in paths:
        if not path.is_file():
            raise WheelhouseError(f"--provided {path}: no such file")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                names.add(canonical(_requirement_name(line)))
    return names


@dataclass
class Wheelhouse:
    out_dir: str
    python_version: str
    platforms: list[str]
    requirements: list[str]
    wheels: list[dict[str, str]] = field(default_factory=list)  # name, version, file, sha256
    skipped: dict[str, str] = field(default_factory=dict)  # name → why


def _download(specs: list[str], out: Path, python_version: str, platforms: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(out)]
    for p in platforms:
        cmd += ["--platform", p]
    done = subprocess.run(cmd + specs, capture_output=True, text=True)
    if done.returncode == 0:
        return
    # Say which one: retry one by one (only on failure, so the common case stays one pip call).
    bad = [s for s in specs if subprocess.run(cmd + [s], capture_output=True, text=True).returncode != 0]
    raise WheelhouseError(f"no wheel for Python {python_version} on {platforms[0]} for: {', '.join(bad)} "
                          f"(sdist-only, or not built for that target); pip said: {done.stderr.strip()[-800:]}")


def build_wheelhouse(out_dir: Path, requirements: list[str] | None = None, python_version: str = "3.12",
                     provided: list[Path] | None = None, platforms: list[str] | None = None) -> Wheelhouse:
    requirements = requirements or list(DEFAULT_REQUIREMENTS)
    platforms = platforms or list(PLATFORMS)
    have = read_provided(provided or [])
    wanted = closure(requirements)
    house = Wheelhouse(str(out_dir), python_version, platforms, requirements)
    specs = []
    for name, version in sorted(wanted.items()):
        if name in NEVER:
            house.skipped[name] = "never carried (the host's own build, or not for Linux)"
        elif name in have:
            house.skipped[name] = "provided by the host"
        else:
            specs.append(f"{name}=={version}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if specs:
        _download(specs, out_dir, python_version, platforms)
    by_name = {canonical(w.name.split("-", 1)[0]): w for w in out_dir.glob("*.whl")}
    for spec in specs:
        name, version = spec.split("==")
        whl = by_name.get(name)
        if whl is None:
            raise WheelhouseError(f"{spec}: pip reported success but no wheel is in {out_dir}")
        house.wheels.append({"name": name, "version": version, "file": whl.name,
                             "sha256": hashlib.sha256(whl.read_bytes()).hexdigest()})
    (out_dir / "manifest.json").write_text(json.dumps(asdict(house), indent=2) + "\n")
    (out_dir / "install.sh").write_text(
        "#!/usr/bin/env bash\n"
        "# install.sh [TARGET] — install these wheels offline into TARGET (default /tmp/m3lab-site);\n"
        "# then: export PYTHONPATH=TARGET:$PYTHONPATH\n"
        "set -euo pipefail\n"
        'here=$(cd "$(dirname "$0")" && pwd)\n'
        'target=${1:-/tmp/m3lab-site}\n'
        'python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$target" "$here"/*.whl\n'
        'echo "installed $(ls "$here"/*.whl | wc -l) wheels into $target"\n')
    return house
