"""Check which commit made a recorded run: recompute every stage fingerprint from that commit's code and the
run's own params.json, and compare with the fingerprints the run wrote in its status.json files.

    python tools/verify_reference_commit.py results/reference/h200-tiny-bf16 b3ffa14 [--record]

Each commit is checked out in a temporary git worktree and its own `m3lab.dag.fingerprints` is run. All stages
equal: that commit's code (as far as its fingerprints cover code) made the run. --record writes the result into
the run's provenance.json as git.verified. Exit 1 when any stage differs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBE = ("import json, sys\nfrom pathlib import Path\nfrom m3lab import dag\n"
         "run = Path(sys.argv[1])\nprint(json.dumps(dag.fingerprints(json.loads((run / 'params.json').read_text()))))")


def verify(run: Path, commit: str) -> dict:
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{commit}^{{commit}}"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    recorded = {p.parent.name: json.loads(p.read_text()).get("fingerprint") for p in sorted(run.glob("*/status.json"))}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), sha], cwd=REPO, check=True)
        try:
            out = subprocess.run([sys.executable, "-c", PROBE, str(run.resolve())], cwd=tree, check=True,
                                 capture_output=True, text=True, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)
    computed = json.loads(out.stdout.strip().splitlines()[-1])
    same = sorted(s for s, fp in recorded.items() if computed.get(s) == fp)
    return {"commit": sha, "stages": len(recorded), "equal": same,
            "differ": sorted(set(recorded) - set(same))}


def main(argv: list[str]) -> int:
    record = "--record" in argv
    run, commit = (Path(a) for a in argv if a != "--record")
    r = verify(run, str(commit))
    print(json.dumps(r))
    if record and not r["differ"]:
        prov_path = run / "provenance.json"
        prov = json.loads(prov_path.read_text())
        prov["git"]["verified"] = (f"all {r['stages']} stage fingerprints this run wrote (status.json) equal those "
                                   f"that commit {r['commit'][:7]}'s m3lab computes from the run's params.json "
                                   f"(tools/verify_reference_commit.py)")
        prov_path.write_text(json.dumps(prov, indent=1) + "\n")
    return 0 if not r["differ"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
