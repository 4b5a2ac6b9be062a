"""Paired comparisons (m3lab.evals.paired): known answers for the statistics, and every reason two runs must not
be paired. The samples files are written in lm-eval 0.4.13's `--log_samples` shape (one line per item and
filter); tests/test_embedded_dag.py checks the same code on files lm-eval itself wrote."""

from __future__ import annotations

import json
import math

import pytest

from m3lab.evals.paired import (Item, Unpaired, compare, comparable, mcnemar_exact, pair_records, read_samples,
                                samples_file)


def _items(values, target="4", prompt="p"):
    return {i: Item(i, f"d{i}", prompt, target, float(v), f"r{i}") for i, v in enumerate(values)}


def test_known_answer_one_flip_each_way_and_two_more():
    base = _items([1, 1, 1, 0, 0, 1, 1, 0])  # 5/8
    quant = _items([1, 0, 1, 1, 0, 1, 0, 0])  # 4/8: items 1 and 6 lost, item 3 gained
    r = compare(quant, base)
    assert r["items"] == 8 and r["baseline_mean"] == 5 / 8 and r["quantized_mean"] == 4 / 8
    assert r["diff"] == pytest.approx(-1 / 8)
    d = [0, -1, 0, 1, 0, 0, -1, 0]
    mean = sum(d) / 8
    assert r["diff_stderr"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 7 / 8))
    assert r["discordant"] == {"only_quantized_right": 1, "only_baseline_right": 2}
    assert r["mcnemar_p"] == pytest.approx(1.0)  # 1 vs 2 of 3 discordant: no evidence either way
    assert r["recovery_pct"] == pytest.approx(80.0)
    assert [f["doc_id"] for f in r["flipped"]] == [1, 3, 6]
    assert [f["right"] for f in r["flipped"]] == ["baseline", "quantized", "baseline"]


def test_identical_runs_recover_100_with_zero_error():
    base = _items([1, 0, 1, 1])
    r = compare(dict(base), base)
    assert r["recovery_pct"] == 100.0 and r["recovery_stderr_pct"] == 0.0 and r["diff_stderr"] == 0.0
    assert r["mcnemar_p"] == 1.0 and r["flipped"] == []


@pytest.mark.parametrize("b_only,q_only,p", [(0, 0, 1.0), (5, 0, 2 / 32), (10, 0, 2 / 1024), (6, 2, 2 * 37 / 256)])
def test_mcnemar_exact_known_values(b_only, q_only, p):
    # (6, 2): 2 · P(X ≤ 2 | n=8, ½) = 2 · (1 + 8 + 28) / 256
    assert mcnemar_exact(b_only, q_only) == pytest.approx(p)


def test_a_baseline_of_zero_has_no_recovery_and_says_so():
    r = compare(_items([1, 0]), _items([0, 0]))
    assert r["recovery_pct"] is None and "scored 0" in r["recovery_reason"]


@pytest.mark.parametrize("quant,match", [
    ({**_items([1, 1, 0]), 3: Item(3, "d3", "p", "4", 1.0, "")}, "other items: 1 only in the quantized run"),
    ({0: Item(0, "other", "p", "5", 1.0, "")} | {i: v for i, v in _items([1, 1, 0]).items() if i}, "item 0 differs"),
    (_items([1, 1, 0], prompt="q"), "the prompts differ"),
])
def test_runs_on_other_items_are_not_paired(quant, match):
    with pytest.raises(Unpaired, match=match):
        compare(quant, _items([1, 1, 0]))


def _write_samples(path, rows, filters=("strict-match", "flexible-extract")):
    with path.open("w") as f:
        for i, (v_strict, v_flex) in enumerate(rows):
            for filt, v in zip(filters, (v_strict, v_flex)):
                f.write(json.dumps({"doc_id": i, "doc": {"question": f"q{i}"}, "target": f"x\n#### {i}",
                                    "arguments": {}, "resps": [[f"r{i}"]], "filtered_resps": [f"r{i}"],
                                    "filter": filt, "metrics": ["exact_match"], "doc_hash": f"h{i}",
                                    "prompt_hash": f"p{i}", "target_hash": f"t{i}", "exact_match": v}) + "\n")


def test_read_samples_takes_the_metrics_filter(tmp_path):
    path = tmp_path / "samples_tiny_arith_2026-12-03T10-00-00.jsonl"
    _write_samples(path, [(1.0, 1.0), (0.0, 1.0), (0.0, 0.0)])
    strict = read_samples(path, "exact_match,strict-match")
    flex = read_samples(path, "exact_match,flexible-extract")
    assert [strict[i].value for i in range(3)] == [1.0, 0.0, 0.0]
    assert [flex[i].value for i in range(3)] == [1.0, 1.0, 0.0]
    with pytest.raises(Unpaired, match="no items under filter 'nope'"):
        read_samples(path, "exact_match,nope")
    with pytest.raises(Unpaired, match="has no 'acc'"):
        read_samples(path, "acc,strict-match")


def test_samples_file_is_the_results_files_twin(tmp_path):
    results = tmp_path / "results_2026-12-03T10-00-00.123.json"
    results.write_text("{}")
    with pytest.raises(Unpaired, match="without --log_samples"):
        samples_file(results, "tiny_arith")
    twin = tmp_path / "samples_tiny_arith_2026-12-03T10-00-00.123.jsonl"
    twin.write_text("")
    assert samples_file(results, "tiny_arith") == twin


def _record(tmp_path, name, rows, **kw):
    d = tmp_path / name
    d.mkdir()
    (d / "results_T.json").write_text("{}")
    _write_samples(d / "samples_tiny_arith_T.jsonl", rows)
    rec = {"id": "tiny_arith", "runner": "lm_eval", "runner_version": "0.4.13", "task": "tiny_arith",
           "metric": "exact_match,strict-match", "limit": 3, "samples": 3, "status": "ok",
           "runs": [{"seed": None, "results_path": str(d / "results_T.json")}]}
    return {**rec, **kw}


def test_pair_records_end_to_end_and_the_checks_that_refuse(tmp_path):
    q = _record(tmp_path, "q", [(1.0, 1.0), (0.0, 0.0), (1.0, 1.0)])
    b = _record(tmp_path, "b", [(1.0, 1.0), (1.0, 1.0), (1.0, 1.0)])
    r = pair_records(q, b)
    assert r["recovery_pct"] == pytest.approx(200 / 3) and r["diff_pct"] == pytest.approx(-100 / 3)
    for key, value in [("runner_version", "0.4.12"), ("limit", 40), ("metric", "exact_match,flexible-extract"),
                       ("task", "gsm8k")]:
        with pytest.raises(Unpaired, match=f"{key} differs"):
            comparable({**q, key: value}, b)
    with pytest.raises(Unpaired, match="seeds differ"):
        comparable({**q, "runs": [{**q["runs"][0], "seed": 42}]}, b)
