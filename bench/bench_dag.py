"""Time the embedded DAG: a full run from an empty results folder, then an unchanged re-run.

    .venv/bin/python bench/bench_dag.py          # targets on a 2-core machine: full ≤ 120 s, re-run ≤ 5 s
    .venv/bin/python bench/bench_dag.py --repeat 3 --tree /tmp/old   # median of 3, and the same for another
                                                 # checkout (e.g. `git worktree add /tmp/old <rev>`), back to back

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


def timed_run(results: Path, tree: Path = ROOT) -> tuple[float, dict]:
    env = {**os.environ, "M3LAB_RESULTS": str(results), "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "m3lab", "run"], cwd=tree, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"m3lab run failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    index = out.stdout.strip().splitlines()[-1].removeprefix("index: ")
    return dt, json.loads((Path(index).parent / "summary.json").read_text())


def measure(tree: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        full, summary = timed_run(Path(tmp), tree)
        rerun, _ = timed_run(Path(tmp), tree)
    return {"full_dag_s": round(full, 1), "unchanged_rerun_s": round(rerun, 2),
            "stage_s": {n: s.get("duration_s") for n, s in summary["stages"].items()}}


def main() -> None:
    import argparse
    import statistics

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--tree", type=Path, default=None, help="another checkout to time the same way, interleaved")
    a = ap.parse_args()
    trees = {"this": ROOT} | ({"other": a.tree.resolve()} if a.tree else {})
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(a.repeat):
        for name, tree in trees.items():  # interleaved, so load drift hits both alike
            runs[name].append(measure(tree))
    out = {"cpus": os.cpu_count(), "repeat": a.repeat, "targets": {"full_dag_s": 120, "unchanged_rerun_s": 5}}
    for name, rs in runs.items():
        out[name] = {"tree": str(trees[name]), "runs": rs,
                     "median_full_dag_s": statistics.median(r["full_dag_s"] for r in rs),
                     "median_unchanged_rerun_s": statistics.median(r["unchanged_rerun_s"] for r in rs)}
    if a.tree:
        out["ratio_this_over_other"] = {k: round(out["this"][k] / out["other"][k], 3)
                                        for k in ("median_full_dag_s", "median_unchanged_rerun_s")}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
