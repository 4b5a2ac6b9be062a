"""Accuracy evals, one runner module each (registered in `m3lab.registry.EVAL_RUNNERS`), each with
`run(ev, server, out_dir) -> dict`: the eval's record, with its score or, if it could not run, the reason —
never a number. `harness` holds what the command-line harnesses share (lm-eval, lighteval)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m3lab.registry import EVAL_RUNNERS

__all__ = ["run_one"]


def run_one(ev: dict[str, Any], server: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    return EVAL_RUNNERS.load(ev["runner"]).run(ev, server, out_dir)
