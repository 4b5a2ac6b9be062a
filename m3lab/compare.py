"""Two runs side by side, and a run's memory plan against what its engine measured.

`compare_runs(a, b)`: what a parallel layout must not change. Run B (e.g. two GPUs, TP2 + EP) against run A (the
same checkpoint on one GPU), cell for cell: needle cells (hit/miss per length × depth), the numerics verdicts,
each eval's value, the correctness prompts, and the benchmark's output throughput per concurrency level (which
may differ: it is reported, not judged). The verdict is `agree` when the needle cells, the numerics verdicts and
the prompts agree and every eval is within `eval_rel_tol`; otherwise `differ`, with the differences listed.
Runs whose stage did not end ok are `not run` for that part, never a match.

`plan_vs_measured(run_dir)`: m3lab.memplan's plan for the run's own params against vLLM's start-up facts (the
serve stage's `vllm` record): weights per GPU (vLLM's "Model loading took … GiB", the largest rank), KV cache
GiB and tokens. Errors are (plan − measured) / measured.

    m3lab compare RUN_A RUN_B [--gpu-memory-gib G]    prints both as JSON (the plan check for RUN_B)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["compare_runs", "plan_vs_measured"]


def _result(run_dir: Path, stage: str) -> dict[str, Any] | None:
    status = run_dir / stage / "status.json"
    result = run_dir / stage / "result.json"
    if status.is_file():
        st = json.loads(status.read_text(encoding="utf-8")).get("status")
        if st not in ("ok", "reused"):
            return None
    return json.loads(result.read_text(encoding="utf-8")) if result.is_file() else None


def _needle(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    cells = lambda r: {(c["length"], c["depth"]): c["status"] for c in r.get("cells", [])}  # noqa: E731
    ca, cb = cells(a), cells(b)
    common = sorted(set(ca) & set(cb))
    differ = [{"length": k[0], "depth": k[1], "a": ca[k], "b": cb[k]} for k in common if ca[k] != cb[k]]
    return {"cells": len(common), "same": len(common) - len(differ), "differ": differ,
            "accuracy": [a.get("accuracy"), b.get("accuracy")], "agree": not differ and bool(common)}


def _numerics(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    na, nb = a.get("numerics") or {}, b.get("numerics") or {}
    parts = ("nonfinite", "determinism", "parity", "prefix_cache")
    verdicts = {k: [(na.get(k) or {}).get("verdict"), (nb.get(k) or {}).get("verdict")] for k in parts}
    return {"verdicts": verdicts, "agree": all(x == y for x, y in verdicts.values())}


def _eval_value(ev: dict[str, Any]) -> float | None:
    for key in ("ppl", "value"):
        v = ev.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    return None


def _evals(a: dict[str, Any], b: dict[str, Any], rel_tol: float) -> dict[str, Any]:
    eb = {e["id"]: e for e in b.get("evals", [])}
    rows, ok = [], True
    for e in a.get("evals", []):
        va, vb = _eval_value(e), _eval_value(eb.get(e["id"], {}))
        if va is None or vb is None:
            rows.append({"id": e["id"], "a": va, "b": vb, "verdict": "not run (a value is missing)"})
            ok = False
            continue
        rel = abs(vb - va) / abs(va) if va else abs(vb - va)
        rows.append({"id": e["id"], "a": va, "b": vb, "rel_diff": round(rel, 6),
                     "verdict": "agree" if rel <= rel_tol else "differ"})
        ok &= rel <= rel_tol
    return {"rows": rows, "agree": ok}


def compare_runs(run_a: str | Path, run_b: str | Path, eval_rel_tol: float = 0.01) -> dict[str, Any]:
    a, b = Path(run_a), Path(run_b)
    out: dict[str, Any] = {"a": str(a), "b": str(b)}
    parts = []
    na, nb = _result(a, "needle"), _result(b, "needle")
    out["needle"] = _needle(na, nb) if na and nb else {"verdict": "not run (a needle stage did not end ok)"}
    ca, cb = _result(a, "correctness"), _result(b, "correctness")
    if ca and cb:
        out["numerics"] = _numerics(ca, cb)
        out["evals"] = _evals(ca, cb, eval_rel_tol)
        pa = [p["passed"] for p in ca.get("prompts", [])]
        pb = [p["passed"] for p in cb.get("prompts", [])]
        out["prompts"] = {"a": pa, "b": pb, "agree": pa == pb}
    else:
        out["numerics"] = out["evals"] = out["prompts"] = {"verdict": "not run (a correctness stage did not end ok)"}
    ba, bb = _result(a, "benchmark"), _result(b, "benchmark")
    if ba and bb:
        la = {lv["concurrency"]: lv for lv in ba.get("levels", [])}
        out["benchmark"] = [{"concurrency": c, "a_output_tok_s": la[c].get("output_throughput"),
                             "b_output_tok_s": lv.get("output_throughput"),
                             "ratio_b_over_a": (round(lv["output_throughput"] / la[c]["output_throughput"], 3)
                                                if la[c].get("output_throughput") and lv.get("output_throughput")
                                                else None)}
                            for lv in bb.get("levels", []) for c in [lv["concurrency"]] if c in la]
    for key in ("needle", "numerics", "evals", "prompts"):
        parts.append(out[key].get("agree") if "agree" in out[key] else None)
    out["verdict"] = ("not run" if None in parts else "agree" if all(parts) else "differ")
    return out


def plan_vs_measured(run_dir: str | Path, gpu_memory_gib: float | None = None) -> dict[str, Any]:
    """The planner's per-GPU numbers for the run's params against vLLM's start-up facts; `not run` where the
    run has no vLLM facts (another engine, or a serve stage that did not end ok).

    `gpu_memory_gib`: the GPU the run really had (nvidia-smi's memory.total), when it differs from the profile's
    hardware file: hardware/hopper1.yaml is sized for an H100 (80 GiB) while the reference runs ran on an H200,
    and vLLM's KV cache is a share of the real GPU's memory."""
    from m3lab import memplan
    from m3lab.params import Params

    run = Path(run_dir)
    serve = _result(run, "serve")
    facts = (serve or {}).get("vllm")
    if not facts:
        return {"verdict": "not run", "reason": "no vLLM start-up facts in this run's serve stage"}
    raw = json.loads((run / "params.json").read_text(encoding="utf-8"))
    if gpu_memory_gib is not None:
        raw["hardware"]["gpu_memory_gib"] = gpu_memory_gib
    params = Params.model_validate(raw)
    try:
        plan = memplan.plan_for_params(params)
    except memplan.PlanError as e:
        return {"verdict": "not run", "reason": f"no memory plan: {e}"}
    ranks = facts.get("ranks") or {}
    weights = max([r["model_memory_gib"] for r in ranks.values() if r.get("model_memory_gib") is not None]
                  or [facts.get("model_memory_gib")] if facts.get("model_memory_gib") is not None else [None])
    rows = []
    for name, planned, measured in (("weights_per_gpu_gib", plan.get("weights_per_gpu_gib"), weights),
                                    ("kv_cache_gib", plan.get("kv_cache_gib"), facts.get("kv_cache_gib")),
                                    ("kv_cache_tokens", plan.get("kv_cache_tokens"), facts.get("kv_cache_tokens"))):
        err = (round((planned - measured) / measured, 4) if isinstance(planned, (int, float))
               and isinstance(measured, (int, float)) and measured else None)
        rows.append({"quantity": name, "planned": planned, "measured": measured, "rel_error": err})
    return {"verdict": "measured", "parallel": plan.get("parallel"), "num_gpus": plan.get("num_gpus"),
            "gpu_memory_gib": params.hardware.gpu_memory_gib,
            "rows": rows, "note": "vLLM reports model memory to 0.01 GiB; at the tiny model's size the weights' "
                                  "relative error is rounding, the KV rows are the meaningful ones"}


def main(run_a: str, run_b: str, gpu_memory_gib: float | None = None) -> int:
    for run in (run_a, run_b):
        if not (Path(run) / "params.json").is_file():
            print(f"m3lab compare: {run} is not a run folder (no params.json)", file=sys.stderr)
            return 2
    out = {"runs": compare_runs(run_a, run_b), "plan_vs_measured": plan_vs_measured(run_b, gpu_memory_gib)}
    print(json.dumps(out, indent=1))
    return 0 if out["runs"]["verdict"] == "agree" else 1
