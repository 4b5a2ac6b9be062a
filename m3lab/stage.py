"""What a stage notebook sees: its params slice, its folder, and its upstream stages' results.

A notebook is a function (papermill): the `parameters` cell is its signature. Every stage notebook has the same
three parameters, and one line turns them into a `StageContext`:

    profile = "cpu-tiny"   # which params file
    run_dir = ""           # "" → results/<profile>/interactive (JupyterLab); the runner passes the run's folder
    params = None          # None → this stage's slice of the profile; the runner passes the slice
    ctx = m3lab.stage.context("serve", profile, run_dir, params)

Results are JSON files: `<run_dir>/<stage>/result.json`. A stage reads its upstream results from there, so a
notebook run by hand in JupyterLab (in DAG order) and a papermill run see exactly the same inputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3lab.params import REPO_ROOT, load_params
from m3lab.registry import STAGES

__all__ = ["StageContext", "StageError", "context", "results_root", "newest_ok_run", "write_json", "read_json"]


class StageError(RuntimeError):
    """A stage cannot proceed; the message says what and where."""


def results_root() -> Path:
    """Where runs go: $M3LAB_RESULTS or <repo>/results."""
    return Path(os.environ.get("M3LAB_RESULTS", REPO_ROOT / "results")).resolve()


def newest_ok_run(profile: str, stage: str) -> Path | None:
    """The newest run folder of `profile` (under results_root()) whose `stage` ended ok or reused."""
    for status_path in sorted((results_root() / profile).glob(f"*/{stage}/status.json"), reverse=True):
        try:
            ok = read_json(status_path).get("status") in ("ok", "reused")
        except (OSError, ValueError):
            continue  # a half-written run folder is not a baseline
        if ok and (status_path.parent / "result.json").is_file():
            return status_path.parent.parent
    return None


def write_json(path: Path, obj: Any) -> None:
    """Atomic write: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a half-written temp file behind
        raise


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@dataclass
class StageContext:
    stage: str
    profile: str
    run_dir: Path
    params: dict[str, Any]  # this stage's sections of the profile, e.g. {"serve": {...}, "hardware": {...}}
    cache_dir: Path = field(default_factory=lambda: results_root() / ".cache")

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.stage

    def upstream(self, stage: str) -> dict[str, Any]:
        """The result of an earlier stage of this run; a clear error if it has none."""
        path = self.run_dir / stage / "result.json"
        if not path.is_file():
            raise StageError(
                f"{self.stage}: needs the result of stage {stage!r}, but {path} does not exist — "
                f"run the stages in order (`m3lab run {self.profile}`, or the notebooks one after another)"
            )
        return read_json(path)

    def save(self, result: dict[str, Any]) -> Path:
        """Write this stage's result.json (the runner and later stages read it)."""
        path = self.stage_dir / "result.json"
        write_json(path, result)
        return path


def context(stage: str, profile: str = "cpu-tiny", run_dir: str | Path = "", params: dict | None = None) -> StageContext:
    """Build the context from a notebook's parameters (see the module docstring)."""
    if stage not in STAGES:
        raise StageError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if params is None:
        resolved = load_params(profile).model_dump(mode="json")
        params = STAGES[stage].slice(resolved)
        profile = resolved["profile"]
    run_dir = Path(run_dir) if run_dir else results_root() / profile / "interactive"
    ctx = StageContext(stage=stage, profile=profile, run_dir=run_dir.resolve(), params=params)
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    return ctx
