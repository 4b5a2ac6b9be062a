"""Time the embedded DAG: a full run from an empty results folder, then an unchanged re-run.

    .venv/bin/python bench/bench_dag.py          # targets on a 2-core machine: full ≤ 120 s, re-run ≤ 5 s

Run by hand; the numbers go into notes, never into test assertions. Each phase runs `m3lab run` as a fresh
process (imports included), as a user would.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed_run(results: Path, *extra: str) -> tuple[float, dict]:
    env = {**os.environ, "M3LAB_RESULTS": str(results)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "m3lab", "run", *extra], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"m3lab run failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    index = out.stdout.strip().splitlines()[-1].removeprefix("index: ")
    return dt, json.loads((Path(index).parent / "summary.json").read_text())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        full, summary = timed_run(Path(tmp))
        rerun, _ = timed_run(Path(tmp))
    stages = {n: s.get("duration_s") for n, s in summary["stages"].items()}
    print(json.dumps({"cpus": os.cpu_count(), "full_dag_s": round(full, 1), "unchanged_rerun_s": round(rerun, 2),
                      "stage_s": stages, "targets": {"full_dag_s": 120, "unchanged_rerun_s": 5}}, indent=2))


if __name__ == "__main__":
    main()
