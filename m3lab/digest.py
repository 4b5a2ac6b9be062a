"""Content hashes of checkpoint folders: what a stage's big artifacts are, so that reuse and provenance can check
them again instead of trusting a folder name.

A stage that leaves a folder under `results/.cache` lists it in its result.json:

    "artifacts": {"model": {"path": "/…/results/.cache/quantized/tiny-…", "files": {"config.json": "<sha256>", …}}}

`verify_artifacts` re-hashes every file (symlinks followed) and returns what differs; the runner reuses a stage
only when nothing does. Hashing reads every byte: about 1 s per GB here, minutes for a real 200–800 GB model,
which is the price of never serving a checkpoint that changed behind m3lab's back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["sha256_file", "folder_manifest", "artifact", "verify_artifacts", "run_folders", "verify_run", "main"]

_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    """Every file under `root`, sorted; hidden ones (`.cache/`, m3lab's own marks) are not part of it."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts))


def folder_manifest(folder: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (symlinked files hashed by content), sorted."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in _files(root)}


def artifact(folder: str | Path) -> dict[str, Any]:
    return {"path": str(folder), "files": folder_manifest(folder)}


def verify_artifacts(result: dict[str, Any]) -> list[str]:
    """Problems with the artifacts a result lists (missing folder or file, changed or extra file); [] if intact."""
    problems: list[str] = []
    for name, art in (result.get("artifacts") or {}).items():
        root = Path(art["path"])
        if not root.is_dir():
            problems.append(f"{name}: {root} is missing")
            continue
        want: dict[str, str] = art.get("files") or {}
        for rel, sha in want.items():
            p = root / rel
            if not p.is_file():
                problems.append(f"{name}: {p} is missing")
            elif sha256_file(p) != sha:
                problems.append(f"{name}: {p} changed (sha256 differs from the one recorded)")
        extra = sorted({p.relative_to(root).as_posix() for p in _files(root)} - set(want))
        if extra:
            problems.append(f"{name}: {root} has files it did not have: {', '.join(extra[:5])}")
    return problems


def run_folders(path: str | Path) -> list[Path]:
    """A run folder, every run of a profile folder, or every run under a results folder."""
    p = Path(path)
    if (p / "params.json").is_file():
        return [p]
    return sorted(r.parent for r in p.glob("*/params.json")) or sorted(r.parent for r in p.glob("*/*/params.json"))


def verify_run(run_dir: Path) -> tuple[int, list[str]]:
    """(files re-hashed, problems) over every artifact the run's stages list."""
    n, problems = 0, []
    for result in sorted(Path(run_dir).glob("*/result.json")):
        data = json.loads(result.read_text(encoding="utf-8"))
        arts = data.get("artifacts") or {}
        n += sum(len(a.get("files") or {}) for a in arts.values())
        problems += [f"{result.parent.name}: {x}" for x in verify_artifacts(data)]
    return n, problems


def main(argv: list[str]) -> int:
    """`m3lab verify PATH…`: re-hash every cached artifact the runs under PATH used; exit 1 on any mismatch."""
    bad = 0
    for path in argv:
        runs = run_folders(path)
        if not runs:
            print(f"m3lab verify: {path}: no run folders (a run folder holds params.json)")
            return 2
        for run in runs:
            n, problems = verify_run(run)
            print(f"{run}: {'ok' if not problems else 'CHANGED'} ({n} files re-hashed)")
            for x in problems:
                print(f"  {x}")
            bad += bool(problems)
    return 1 if bad else 0
