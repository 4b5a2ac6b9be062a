"""Claims ledger: lookup paths, the verdict at the tolerance edges, and 'not run' never carrying a number."""

import json

import pytest
import yaml

from m3lab.claims import MeasureNotFound, evaluate_claims, judge, lookup
from m3lab.params import ParamsError, load_params

RESULT = {
    "levels": [{"concurrency": 1, "output_throughput": 13.0}, {"concurrency": 4, "output_throughput": 40.9}],
    "cells": [{"length": 4096, "depth": 50.0, "status": "hit"}, {"length": 30000, "depth": 50.0, "status": "miss"}],
    "evals": [{"id": "gsm8k", "mean": 94.19, "stderr": 0.64}],
}


def test_lookup_follows_dotted_paths_and_selectors():
    assert lookup(RESULT, "levels[concurrency=4].output_throughput") == 40.9
    assert lookup(RESULT, "cells[length=4096,depth=50].status") == "hit"  # 50 matches 50.0
    assert lookup(RESULT, "evals[id=gsm8k].mean") == 94.19
    with pytest.raises(MeasureNotFound, match="no element of 'levels' with concurrency=8"):
        lookup(RESULT, "levels[concurrency=8].output_throughput")
    with pytest.raises(MeasureNotFound, match="no 'nope'"):
        lookup(RESULT, "nope.x")


@pytest.mark.parametrize("measured,ok", [(96.0, True), (94.0, True), (93.99, False), (96.01, False)])
def test_abs_tolerance_edges_are_inclusive(measured, ok):
    assert judge(95.0, measured, {"abs": 1.0})[0] is ok


@pytest.mark.parametrize("measured,ok", [(110.0, True), (90.0, True), (110.5, False), (89.5, False)])
def test_rel_tolerance_edges(measured, ok):
    assert judge(100.0, measured, {"rel": 0.1})[0] is ok


def test_stderr_tolerance_uses_the_measured_stderr():
    assert judge(95.0, 94.0, {"stderr": 2}, stderr=0.5)[0]  # |−1.0| ≤ 2·0.5
    assert not judge(95.0, 93.9, {"stderr": 2}, stderr=0.5)[0]
    with pytest.raises(MeasureNotFound):
        judge(95.0, 94.0, {"stderr": 2}, stderr=None)


def test_range_min_max_and_equals():
    assert judge([5.2, 6.1], 5.2, {"range": [5.2, 6.1]})[0] and judge([5.2, 6.1], 6.1, {"range": [5.2, 6.1]})[0]
    assert not judge([5.2, 6.1], 6.11, {"range": [5.2, 6.1]})[0]
    assert judge(46464, 46464, {"min": 46464})[0] and not judge(46464, 46463, {"min": 46464})[0]
    assert judge(228, 228.0, {"max": 228})[0] and not judge(228, 228.1, {"max": 228})[0]
    assert judge("hit", "hit", {"equals": True}) == (True, None)
    assert judge(True, False, {"equals": True}) == (False, None)


def _claim(**kw):
    base = {"id": "c", "card": "001", "metric": "gsm8k", "unit": "%", "claimed": 94.19, "stage": "correctness",
            "measure": "evals[id=gsm8k].mean", "tolerance": {"abs": 1.0}}
    return {**base, **kw}


def _run_dir(tmp_path, status="ok", result=RESULT):
    d = tmp_path / "correctness"
    d.mkdir(parents=True)
    (d / "status.json").write_text(json.dumps({"status": status, "error": "ServerDied: boom"}))
    if result is not None:
        (d / "result.json").write_text(json.dumps(result))
    return tmp_path


def test_verdicts_reproduced_not_reproduced_and_recovery(tmp_path):
    paired = {"status": "ok", "recovery_pct": 98.8, "recovery_stderr_pct": 0.3}
    result = {**RESULT, "evals": [{**RESULT["evals"][0], "paired": paired}]}
    run = _run_dir(tmp_path, result=result)
    v = evaluate_claims([_claim(), _claim(id="far", claimed=90.0),
                         _claim(id="rec", kind="recovery", baseline=95.30, claimed=98.84, tolerance={"abs": 0.5}),
                         _claim(id="rec-se", kind="recovery", baseline=95.30, claimed=100.0,
                                tolerance={"stderr": 2})],
                        run)
    assert [x.verdict for x in v] == ["reproduced", "not reproduced", "reproduced", "not reproduced"]
    assert v[0].delta == 0.0 and v[1].delta == pytest.approx(4.19)
    assert v[2].measured == 98.8  # the paired record's recovery, not 94.19 / the card's 95.30
    assert v[3].delta == pytest.approx(-1.2)  # 1.2 > 2 × 0.3: the paired stderr is the yardstick


def test_a_recovery_against_the_cards_own_baseline_is_not_judged(tmp_path):
    (v,) = evaluate_claims([_claim(id="rec", kind="recovery", baseline=95.30, claimed=98.84,
                                   tolerance={"abs": 0.5})], _run_dir(tmp_path))
    assert v.measured is None and v.delta is None
    assert v.verdict.startswith("not run (no baseline measured: evals[id=gsm8k] has no paired record; the card's "
                                "baseline 95.3 is what the card said")


def test_a_recovery_whose_pairing_failed_says_why(tmp_path):
    unpaired = {"status": "not run", "reason": "profile x: other items: 3 only in the quantized run"}
    result = {**RESULT, "evals": [{**RESULT["evals"][0], "paired": unpaired}]}
    (v,) = evaluate_claims([_claim(id="rec", kind="recovery", baseline=95.30, claimed=98.84,
                                   tolerance={"abs": 0.5})], _run_dir(tmp_path, result=result))
    assert v.measured is None and v.verdict == "not run (profile x: other items: 3 only in the quantized run)"


def test_a_claim_whose_stage_did_not_run_shows_no_number(tmp_path):
    v = evaluate_claims([_claim()], _run_dir(tmp_path, status="failed", result=None))[0]
    assert v.measured is None and v.delta is None
    assert v.verdict.startswith("not run (correctness failed: ServerDied: boom")
    v = evaluate_claims([_claim(stage="needle", measure="x")], tmp_path)[0]
    assert v.measured is None and v.verdict == "not run (needle did not run)"


def test_a_claim_the_stage_did_not_measure_is_not_run(tmp_path):
    v = evaluate_claims([_claim(measure="evals[id=ifeval].mean")], _run_dir(tmp_path))[0]
    assert v.measured is None and v.verdict.startswith("not run (correctness did not measure it")


def _profile(tmp_path, claims):
    data = {"extends": "cpu-tiny", "profile": "p", "claims": claims}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_claim_without_tolerance_or_stage_is_an_error_naming_the_key(tmp_path):
    bad = {k: v for k, v in _claim().items() if k != "tolerance"}
    with pytest.raises(ParamsError, match=r"claims.0.tolerance: required key is missing"):
        load_params(_profile(tmp_path, [bad]))
    bad = {k: v for k, v in _claim().items() if k != "stage"}
    with pytest.raises(ParamsError, match=r"claims.0.stage: required key is missing"):
        load_params(_profile(tmp_path, [bad]))
    with pytest.raises(ParamsError, match=r"claims.0.stage:.*'evals'"):
        load_params(_profile(tmp_path, [_claim(stage="evals")]))


def test_tolerance_needs_exactly_one_rule(tmp_path):
    with pytest.raises(ParamsError, match=r"claims.0.tolerance: a tolerance has exactly one rule"):
        load_params(_profile(tmp_path, [_claim(tolerance={"abs": 1, "rel": 0.1})]))
    with pytest.raises(ParamsError, match=r"claims.0: .*needs measure_stderr"):
        load_params(_profile(tmp_path, [_claim(tolerance={"stderr": 2})]))
