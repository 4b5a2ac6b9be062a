"""Environments for the tools whose pins clash with m3lab's own: one overlay folder per environment.

llm-compressor 0.14 pins transformers <= 5.17, vLLM 0.25.1 pins compressed-tensors 0.17, and the other cards'
quantizers (AMD Quark, AutoRound, mlx-lm) bring pins of their own. Rather than one venv each (a torch apiece),
an environment here is a folder of pinned packages installed with `pip install --target --no-deps`, put in
front of m3lab's own interpreter's path for one child process only: the quantize stage's recipe
(`m3lab.quantize`) or the serve stage's server (`m3lab.serve`). m3lab's venv itself never changes.

    m3lab/envs/<name>.txt      the environment's packages, every one pinned with ==, dependencies listed too
                               (--no-deps: pip installs exactly this list, nothing resolved behind our back)
    <envs dir>/<name>/         the installed overlay; <envs dir> is $M3LAB_ENVS_DIR or <repo>/.envs
    <envs dir>/<name>/.m3lab-env.json   sha256 of the requirements it was built from, the pip command, versions

`make setup` builds every environment (`python -m m3lab.envs build`); `python -m m3lab.envs` lists them and
whether each is built and current. A recipe or engine names its environment in `m3lab.registry` (meta `env`).
An environment that is missing, or was built from other requirements, is an error that names it and the command
that builds it, raised before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

__all__ = ["EnvError", "names", "requirements_file", "envs_dir", "env_dir", "status", "require", "build",
           "pythonpath", "activate", "record"]

DATA = ("envs/*.txt",)  # m3lab.fingerprint: an edited pin changes the fingerprint of every stage that imports this
_HERE = Path(__file__).resolve().parent
REPO_ROOT = _HERE.parents[1]
MARKER = ".m3lab-env.json"
_PIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+$")


class EnvError(RuntimeError):
    """An environment that is unknown, unbuilt, stale or whose requirements are not all pinned."""


def names() -> list[str]:
    return sorted(p.stem for p in _HERE.glob("*.txt"))


def requirements_file(name: str) -> Path:
    path = _HERE / f"{name}.txt"
    if not path.is_file():
        raise EnvError(f"environment {name!r}: no {path.relative_to(REPO_ROOT)}; known: {', '.join(names())}")
    return path


def _requirements(name: str) -> list[str]:
    """The pinned lines of m3lab/envs/<name>.txt (comments and blank lines dropped); an unpinned line is an error
    naming the file and line."""
    path = requirements_file(name)
    out = []
    for i, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not _PIN_RE.match(line):
            raise EnvError(f"{path.relative_to(REPO_ROOT)}:{i}: {line!r} is not pinned as name==version")
        out.append(line)
    return out


def _digest(name: str) -> str:
    return hashlib.sha256(requirements_file(name).read_bytes()).hexdigest()


def envs_dir() -> Path:
    return Path(os.environ.get("M3LAB_ENVS_DIR") or REPO_ROOT / ".envs").absolute()


def env_dir(name: str) -> Path:
    return envs_dir() / name


def status(name: str) -> str:
    """"ready", "missing" or "stale" (built from other requirements)."""
    marker = env_dir(name) / MARKER
    if not marker.is_file():
        return "missing"
    try:
        built = json.loads(marker.read_text(encoding="utf-8")).get("requirements_sha256")
    except (OSError, ValueError):
        return "stale"
    return "ready" if built == _digest(name) else "stale"


def build_command(name: str) -> str:
    return f"make setup  (or: {Path(sys.executable).name} -m m3lab.envs build {name})"


def require(name: str, who: str) -> Path:
    """The overlay folder of a built, current environment; otherwise an EnvError that says who needs it and how
    to build it."""
    requirements_file(name)  # an unknown name lists the known ones
    state = status(name)
    if state != "ready":
        why = "is not built" if state == "missing" else "was built from other requirements than " \
              f"{requirements_file(name).relative_to(REPO_ROOT)}"
        raise EnvError(f"{who} runs in environment {name!r}, which {why} ({env_dir(name)}): {build_command(name)}")
    return env_dir(name)


def pythonpath(name: str, who: str) -> str:
    """PYTHONPATH for a child process in environment `name`: its overlay, then the repo root (m3lab from source,
    as in the parent), then whatever the parent had."""
    parts = [str(require(name, who)), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def activate(name: str, who: str) -> Path:
    """Put environment `name` in front of this process's own sys.path (for an in-process offline reference,
    e.g. correctness loading an AutoRound checkpoint in transformers). Refused if the overlay holds a package
    this process has already imported: the old copy would keep running, silently."""
    path = require(name, who)
    tops = {p.name.split("-")[0].split(".")[0] for p in path.iterdir() if not p.name.startswith(".")
            and (p.is_dir() or p.suffix == ".py") and not p.name.endswith((".dist-info", ".data"))}
    clash = sorted(t for t in tops if t in sys.modules and t != "__pycache__")
    if clash:
        raise EnvError(f"{who}: environment {name!r} holds {clash}, already imported in this process from "
                       f"elsewhere; run it in a child process instead")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


def record(name: str) -> dict[str, object]:
    """What provenance keeps of an environment: its name, requirements hash and pins."""
    return {"name": name, "requirements_sha256": _digest(name), "packages": _requirements(name),
            "path": str(env_dir(name))}


def build(name: str, *, quiet: bool = True) -> Path:
    """Install m3lab/envs/<name>.txt into a fresh overlay, then rename it into place (a failed install leaves
    the old one, or none, never a half-built one)."""
    pins = _requirements(name)
    final = env_dir(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{name}.partial-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "--target", str(tmp)]
    cmd += (["-q"] if quiet else []) + pins
    try:
        done = subprocess.run(cmd, capture_output=quiet, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-15:])
            raise EnvError(f"environment {name!r}: pip exited {done.returncode}:\n{tail}")
        (tmp / MARKER).write_text(json.dumps({"requirements_sha256": _digest(name), "packages": pins,
                                              "python": sys.version.split()[0], "command": cmd[:9] + ["<pins>"]},
                                             indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["build"]:
        for name in args[1:] or names():
            if status(name) == "ready":
                print(f"{name}: ready ({env_dir(name)})")
                continue
            print(f"{name}: building {env_dir(name)} from {requirements_file(name).relative_to(REPO_ROOT)}",
                  flush=True)
            build(name)
        return 0
    if args:
        print("usage: python -m m3lab.envs [build [NAME ...]]", file=sys.stderr)
        return 2
    for name in names():
        print(f"{name}: {status(name)} ({env_dir(name)})")
    return 0
