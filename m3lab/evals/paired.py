"""Two lm-eval runs of one task, compared item by item: a quantized checkpoint against its measured baseline.

A recovery ("the quantized model keeps 99% of the baseline's score") means something only when both scores come
from the same harness, the same task version, the same items and the same metric. m3lab runs lm-eval with
`--log_samples`, so every run leaves one record per item (`samples_<task>_<time>.jsonl`: `doc_id`, `doc_hash`,
`prompt_hash`, the filter, the metric's 0/1 value, the response). `compare` pairs the two runs' records by item
and reports:

    recovery_pct          100 · quantized mean / baseline mean (the cards' "Recovery (%)")
    recovery_stderr_pct   its standard error by the delta method, with the two runs' covariance (paired items)
    diff, diff_stderr     quantized − baseline, and the paired standard error sd(q_i − b_i) / sqrt(n)
    mcnemar_p             exact two-sided binomial test over the discordant items (one right, the other wrong)
    flipped               those discordant items: id, which side got it, both answers

Anything that makes the pairing unsound (other items, another task version, another lm-eval, another metric,
samples missing) raises `Unpaired` with the reason, and the caller records `not run (…)` — never a number.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Unpaired", "Item", "read_samples", "compare", "mcnemar_exact"]

MAX_FLIPPED = 50  # items listed in the record; the counts cover all of them


class Unpaired(ValueError):
    """Two runs that cannot be compared item by item; the message says why."""


@dataclass(frozen=True)
class Item:
    doc_id: int
    doc_hash: str
    prompt_hash: str
    target: str
    value: float  # the metric's value for this item (0/1 for exact match)
    response: str


def _response(rec: dict[str, Any]) -> str:
    resp = rec.get("filtered_resps")
    while isinstance(resp, list) and resp:
        resp = resp[0]
    return str(resp if resp is not None else "")


def samples_file(results_path: str | Path, task: str) -> Path:
    """The samples jsonl lm-eval wrote beside a results file (`--log_samples`): same folder, same timestamp."""
    results_path = Path(results_path)
    stamp = results_path.stem.removeprefix("results_")
    exact = results_path.with_name(f"samples_{task}_{stamp}.jsonl")
    if exact.is_file():
        return exact
    found = sorted(results_path.parent.glob(f"samples_{task}_*.jsonl"))
    if not found:
        raise Unpaired(f"no samples_{task}_*.jsonl beside {results_path} (lm-eval ran without --log_samples?)")
    return found[-1]


def read_samples(path: str | Path, metric: str) -> dict[int, Item]:
    """{doc_id: Item} for one filter of one metric (`metric` as in params: "exact_match,strict-match")."""
    name, _, filt = metric.partition(",")
    items: dict[int, Item] = {}
    path = Path(path)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise Unpaired(f"{path}:{n}: not JSON ({e.msg})") from None
        if rec.get("filter") != filt:
            continue
        if name not in rec:
            raise Unpaired(f"{path}:{n}: item {rec.get('doc_id')} has no {name!r} (metrics: {rec.get('metrics')})")
        doc_id = int(rec["doc_id"])
        if doc_id in items:
            raise Unpaired(f"{path}: item {doc_id} appears twice under filter {filt!r}")
        items[doc_id] = Item(doc_id, str(rec.get("doc_hash", "")), str(rec.get("prompt_hash", "")),
                             str(rec.get("target", "")), float(rec[name]), _response(rec))
    if not items:
        raise Unpaired(f"{path}: no items under filter {filt!r}")
    return items


def mcnemar_exact(b_only: int, q_only: int) -> float:
    """Two-sided exact McNemar (binomial, p = 1/2) over the discordant pairs; 1.0 when there are none."""
    n = b_only + q_only
    if n == 0:
        return 1.0
    k = min(b_only, q_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _cov(xs: list[float], ys: list[float]) -> float:
    """Sample covariance (n − 1), as lm-eval's stderr uses the sample variance."""
    if len(xs) < 2:
        return 0.0
    mx, my = _mean(xs), _mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (len(xs) - 1)


def compare(quant: dict[int, Item], base: dict[int, Item], *, quant_label: str = "quantized",
            base_label: str = "baseline") -> dict[str, Any]:
    """The paired record (see the module docstring). Raises Unpaired if the items differ."""
    if set(quant) != set(base):
        only_q, only_b = sorted(set(quant) - set(base)), sorted(set(base) - set(quant))
        raise Unpaired(f"other items: {len(only_q)} only in the {quant_label} run (e.g. {only_q[:5]}), "
                       f"{len(only_b)} only in the {base_label} run (e.g. {only_b[:5]})")
    ids = sorted(quant)
    for i in ids:
        q, b = quant[i], base[i]
        if (q.doc_hash, q.target) != (b.doc_hash, b.target):
            raise Unpaired(f"item {i} differs between the runs (another dataset or revision): "
                           f"target {b.target!r} vs {q.target!r}")
        if q.prompt_hash != b.prompt_hash:
            raise Unpaired(f"item {i}: the prompts differ (prompt_hash {b.prompt_hash} vs {q.prompt_hash}): "
                           f"another few-shot setting or chat template")
    qs = [quant[i].value for i in ids]
    bs = [base[i].value for i in ids]
    n = len(ids)
    mq, mb = _mean(qs), _mean(bs)
    d = [x - y for x, y in zip(qs, bs)]
    diff_se = math.sqrt(_cov(d, d) / n)
    q_only = [i for i in ids if quant[i].value > base[i].value]
    b_only = [i for i in ids if quant[i].value < base[i].value]
    record: dict[str, Any] = {
        "status": "ok",
        "items": n,
        "quantized_mean": mq,
        "baseline_mean": mb,
        "diff": mq - mb,
        "diff_stderr": diff_se,
        "discordant": {"only_quantized_right": len(q_only), "only_baseline_right": len(b_only)},
        "mcnemar_p": mcnemar_exact(len(b_only), len(q_only)),
    }
    if mb > 0:
        r = mq / mb
        # Delta method for a ratio of two means over the same items: Var(q̄/b̄) ≈ (Var q̄ − 2r Cov + r² Var b̄) / b̄².
        var = (_cov(qs, qs) - 2 * r * _cov(qs, bs) + r * r * _cov(bs, bs)) / n / (mb * mb)
        record["recovery_pct"] = 100.0 * r
        record["recovery_stderr_pct"] = 100.0 * math.sqrt(max(var, 0.0))
    else:
        record["recovery_pct"] = None
        record["recovery_stderr_pct"] = None
        record["recovery_reason"] = "the baseline scored 0: a recovery is undefined"
    record["flipped"] = [
        {"doc_id": i, "right": ("quantized" if quant[i].value > base[i].value else "baseline"),
         "target": quant[i].target, "quantized": quant[i].response[:200], "baseline": base[i].response[:200]}
        for i in sorted(q_only + b_only)[:MAX_FLIPPED]]
    return record


# --------------------------------------------------------------------------------------------------------------
# Eval records (m3lab.evals.lm_eval's) → items, and whether two records may be paired at all.

COMPARED = ("runner", "runner_version", "task", "metric", "limit", "samples")


def comparable(quant: dict[str, Any], base: dict[str, Any]) -> None:
    """Raise Unpaired unless both eval records come from the same harness, task, metric, limit and seeds."""
    for key in COMPARED:
        if quant.get(key) != base.get(key):
            raise Unpaired(f"{key} differs: {base.get(key)!r} (baseline) vs {quant.get(key)!r} (quantized)")
    seeds = lambda rec: [r.get("seed") for r in rec.get("runs", [])]  # noqa: E731
    if seeds(quant) != seeds(base):
        raise Unpaired(f"seeds differ: {seeds(base)} (baseline) vs {seeds(quant)} (quantized)")


def record_items(record: dict[str, Any]) -> dict[int, Item]:
    """One eval record's items; with several seeds, each item's value is its mean over the seeds."""
    runs = record.get("runs") or []
    if not runs:
        raise Unpaired(f"eval {record.get('id')!r} has no runs")
    per_seed = []
    for run in runs:
        per_seed.append(read_samples(samples_file(run["results_path"], record["task"]), record["metric"]))
    first = per_seed[0]
    for other in per_seed[1:]:
        if set(other) != set(first):
            raise Unpaired(f"eval {record.get('id')!r}: its seeds scored different items")
    if len(per_seed) == 1:
        return first
    return {i: Item(it.doc_id, it.doc_hash, it.prompt_hash, it.target,
                    sum(s[i].value for s in per_seed) / len(per_seed), it.response) for i, it in first.items()}


def pair_records(quant: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The paired record of two eval records (percent fields added: the cards' unit)."""
    comparable(quant, base)
    out = compare(record_items(quant), record_items(base))
    out["diff_pct"] = 100.0 * out["diff"]
    out["diff_stderr_pct"] = 100.0 * out["diff_stderr"]
    return out
