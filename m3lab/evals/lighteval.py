"""lighteval through LiteLLM (card 000): the command is built (`m3lab plan` prints it); running it is not wired
into m3lab's environment yet, so the eval reports `not run` with the command it would have used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m3lab.evals.lm_eval import plan_lines  # noqa: F401 (the same command shape, one per seed)
from m3lab.evals.lm_eval import run as _run_harness
from m3lab.evals.harness import build_command

__all__ = ["run", "command"]

command = build_command


def run(ev: dict[str, Any], server: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    return _run_harness(ev, server, out_dir)  # harness.run_eval refuses lighteval with the reason
