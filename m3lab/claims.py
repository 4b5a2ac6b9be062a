"""Claims ledger: every number a model card states, checked against what this run measured.

A claim (params, `claims:`) names the card, the metric, the claimed value (and the card's baseline where it
gives one), the unit, the stage that measures it, where in that stage's `result.json` the measured value is
(`measure`), and a tolerance rule. The verdict is one of:

    reproduced        the measured value is within the tolerance of the claim
    not reproduced    it is not
    not run (reason)  the stage did not run, or did not measure this — and then no number is shown

Tolerance rules (edges inclusive):
    abs: x        |measured − claimed| ≤ x
    rel: r        |measured − claimed| ≤ r·|claimed|
    stderr: k     |measured − claimed| ≤ k·stderr, with the stderr read from `measure_stderr`
    range: [lo, hi]   lo ≤ measured ≤ hi (the claimed value is the range, e.g. card 002's "PPL ≈ 5.2–6.1")
    min: x / max: x   measured ≥ x / measured ≤ x (a floor or ceiling rather than a point)
    equals: true  measured == claimed (booleans and strings: "hit", true)

`measure` is a dotted path into the stage's result, where a segment `name[key=value,...]` selects the first
element of the list `name` whose fields match: `levels[concurrency=1].output_throughput`,
`cells[length=4096,depth=50].status`, `evals[id=gsm8k].mean`.

A claim of `kind: recovery` (the card's "Recovery (%)") is judged on the eval's *paired* record: the eval its
`measure` points into (`evals[id=gsm8k].score_pct` → `evals[id=gsm8k]`) carries `paired`, the item-by-item
comparison with a baseline this run measured (m3lab.evals.paired: same harness, same items, same metric). The
measured value is `paired.recovery_pct`; a `stderr` tolerance uses `paired.recovery_stderr_pct`. Dividing by the
card's own baseline number would make the recovery the score claim again under another tolerance, so without a
paired record the verdict is `not run (…)` with its reason; the card's baseline stays in the ledger as what the
card said.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from m3lab.stage import read_json

__all__ = ["Verdict", "lookup", "judge", "evaluate_claims", "to_rows", "MeasureNotFound"]

_SEGMENT = re.compile(r"^(?P<name>[^\[\]]+)(?:\[(?P<sel>[^\]]+)\])?$")


class MeasureNotFound(KeyError):
    """The result has no value at the claim's `measure` path."""


class NoBaseline(ValueError):
    """A recovery claim whose baseline this run did not measure."""


def _coerce(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def _matches(item: Any, selector: dict[str, Any]) -> bool:
    if not isinstance(item, dict):
        return False
    for k, v in selector.items():
        have = item.get(k)
        if isinstance(have, (int, float)) and isinstance(v, (int, float)):
            if not math.isclose(float(have), float(v)):
                return False
        elif have != v:
            return False
    return True


def lookup(result: Any, path: str) -> Any:
    """Follow a `measure` path (see the module docstring) into a result; MeasureNotFound if it is not there."""
    node = result
    for part in path.split("."):
        m = _SEGMENT.match(part)
        if not m:
            raise MeasureNotFound(f"bad path segment {part!r} in {path!r}")
        name, sel = m["name"], m["sel"]
        if not isinstance(node, dict) or name not in node:
            raise MeasureNotFound(f"{path}: no {name!r}")
        node = node[name]
        if sel is not None:
            selector = dict((kv.split("=", 1)[0].strip(), _coerce(kv.split("=", 1)[1].strip()))
                            for kv in sel.split(","))
            hits = [x for x in node if _matches(x, selector)] if isinstance(node, list) else []
            if not hits:
                raise MeasureNotFound(f"{path}: no element of {name!r} with {sel}")
            node = hits[0]
    return node


@dataclass
class Verdict:
    id: str
    card: str
    metric: str
    unit: str
    stage: str
    claimed: Any
    measured: Any  # None when not run
    delta: float | None
    verdict: str  # "reproduced" | "not reproduced" | "not run (…)"
    rule: str


def _rule_text(tol: dict[str, Any]) -> str:
    (k, v), = tol.items()
    return {"abs": f"±{v}", "rel": f"±{v:.0%}" if isinstance(v, float) else f"±{v}", "stderr": f"±{v}·stderr",
            "range": f"in [{v[0]}, {v[1]}]" if isinstance(v, list) else "in range", "min": f"≥ {v}",
            "max": f"≤ {v}", "equals": "equal"}.get(k, k)


def judge(claimed: Any, measured: Any, tolerance: dict[str, Any], stderr: float | None = None) -> tuple[bool, float | None]:
    """(reproduced?, measured − claimed where numeric). One rule per tolerance mapping."""
    if len(tolerance) != 1:
        raise ValueError(f"a tolerance has exactly one rule, got {tolerance}")
    (rule, x), = tolerance.items()
    if rule == "equals":
        return measured == claimed, None
    measured_f = float(measured)
    if rule == "range":
        lo, hi = x if isinstance(x, list) else claimed
        return lo <= measured_f <= hi, None
    if rule == "min":
        return measured_f >= x, measured_f - x
    if rule == "max":
        return measured_f <= x, measured_f - x
    delta = measured_f - float(claimed)
    if rule == "abs":
        bound = x
    elif rule == "rel":
        bound = x * abs(float(claimed))
    elif rule == "stderr":
        if stderr is None:
            raise MeasureNotFound("stderr rule, but the stage reported no stderr")
        bound = x * stderr
    else:
        raise ValueError(f"unknown tolerance rule {rule!r}")
    return abs(delta) <= bound + 1e-12, delta


def _stage_result(run_dir: Path, stage: str) -> tuple[dict[str, Any] | None, str]:
    status_path = run_dir / stage / "status.json"
    status = read_json(status_path) if status_path.is_file() else {}
    if status.get("status") not in ("ok", "reused", None):
        return None, f"{stage} {status.get('status')}: {status.get('error') or status.get('reason') or ''}".strip()
    path = run_dir / stage / "result.json"
    if not path.is_file():
        return None, f"{stage} did not run"
    return read_json(path), ""


def _recovery(result: dict[str, Any], claim: dict[str, Any]) -> tuple[float, float | None]:
    """(recovery %, its stderr) from the paired record of the eval the claim's measure points into."""
    eval_path = claim["measure"].rsplit(".", 1)[0]
    try:
        pair = lookup(result, f"{eval_path}.paired")
    except MeasureNotFound:
        raise NoBaseline(f"no baseline measured: {eval_path} has no paired record; the card's baseline "
                         f"{claim.get('baseline')} is what the card said, not a measurement of these items") from None
    if pair.get("status") != "ok":
        raise NoBaseline(pair.get("reason") or "no baseline measured")
    if pair.get("recovery_pct") is None:
        raise NoBaseline(pair.get("recovery_reason") or "recovery undefined")
    return float(pair["recovery_pct"]), pair.get("recovery_stderr_pct")


def evaluate_claims(claims: list[dict[str, Any]], run_dir: Path) -> list[Verdict]:
    """Judge every claim against this run's stage results."""
    verdicts = []
    cache: dict[str, tuple[dict[str, Any] | None, str]] = {}
    for c in claims:
        stage = c["stage"]
        if stage not in cache:
            cache[stage] = _stage_result(run_dir, stage)
        result, why = cache[stage]
        claimed = c["claimed"]
        measured = delta = None
        tolerance = {k: v for k, v in c["tolerance"].items() if v is not None}  # params dump keeps unset rules
        rule = _rule_text(tolerance)
        if result is None:
            verdict = f"not run ({why})"
        else:
            try:
                measured = lookup(result, c["measure"])
                stderr = lookup(result, c["measure_stderr"]) if c.get("measure_stderr") else None
                if c.get("kind") == "recovery":
                    measured, stderr = _recovery(result, c)
                ok, delta = judge(claimed, measured, tolerance, stderr)
                verdict = "reproduced" if ok else "not reproduced"
            except NoBaseline as e:
                measured = None
                verdict = f"not run ({e})"
            except MeasureNotFound as e:
                measured = None
                verdict = f"not run ({stage} did not measure it: {e})"
        if isinstance(measured, float):
            measured = round(measured, 4)
        verdicts.append(Verdict(c["id"], c["card"], c["metric"], c.get("unit", ""), stage, claimed, measured,
                                None if delta is None else round(delta, 4), verdict, rule))
    return verdicts


def to_rows(verdicts: list[Verdict]) -> list[dict[str, Any]]:
    return [asdict(v) for v in verdicts]
