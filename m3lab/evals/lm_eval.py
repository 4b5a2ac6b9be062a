"""lm-evaluation-harness against the served endpoint: the card's `lm_eval` command line, verbatim."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from m3lab.evals.harness import EvalError, build_command, run_eval

__all__ = ["run", "command"]

command = build_command


def run(ev: dict[str, Any], server: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Scores (also in %, the cards' unit). A dead server is not an eval failure: ServerDied propagates and
    fails the stage."""
    try:
        r = asdict(run_eval(ev, server, out_dir))
    except EvalError as e:
        return {"id": ev["id"], "status": "not run", "reason": str(e)}
    pct = lambda x: None if x is None else round(100.0 * x, 4)  # noqa: E731
    return {**r, "status": "ok", "score_pct": pct(r["score"]), "stderr_pct": pct(r["stderr"])}


def plan_lines(ev: dict[str, Any], server: dict[str, Any]) -> list[str]:
    """One command per seed (no seeds: one run with the runner's own default)."""
    import shlex

    return [shlex.join(build_command(ev, server, Path(f"<run>/correctness/evals/{ev['id']}"), seed))
            for seed in ev.get("seeds") or [None]]
