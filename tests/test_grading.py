"""Grading, by known answers: given these completions, lm-eval's tiny_arith scores exactly this.

The real lm-eval CLI and m3lab's task, against a stand-in server that answers each question with a completion
written here (a mock of the model, so that the expected scores are known before the run). Both of the task's
filters are checked, and the per-item records that paired comparisons read (m3lab.evals.paired).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import StandIn

from m3lab.evals.harness import run_eval
from m3lab.evals.paired import read_samples, samples_file

ITEMS = [json.loads(line) for line in
         (Path(__file__).resolve().parents[1] / "m3lab/assets/tiny-m3/arith_eval.jsonl").read_text().splitlines()[:4]]


def _answer(item: dict) -> str:
    return item["answer"].rsplit("#### ", 1)[1]


# (completion, strict-match right?, flexible-extract right?)
CASES = [
    lambda it: (f" Work.\n#### {_answer(it)}", 1.0, 1.0),  # the format the task asks for
    lambda it: (f" So the answer is {_answer(it)}", 0.0, 1.0),  # right number, no "####": flexible only
    lambda it: (f" #### {int(_answer(it)) + 1}", 0.0, 0.0),  # wrong number in the right format
    lambda it: ("", 0.0, 0.0),  # nothing
]


@pytest.fixture
def stand_in():
    replies = {f"Question: {it['question']}\nAnswer:": case(it)[0] for it, case in zip(ITEMS, CASES)}

    def answer(body, n):
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        return 200, {"id": "x", "object": "text_completion", "model": body["model"],
                     "choices": [{"index": i, "text": replies[p], "finish_reason": "stop", "logprobs": None}
                                 for i, p in enumerate(prompts)]}

    with StandIn(answer) as s:
        yield s.server


def test_known_completions_get_known_scores_under_both_filters(stand_in, tmp_path):
    ev = {"id": "tiny_arith", "runner": "lm_eval", "metric": "exact_match,strict-match", "limit": 4,
          "args": {"--model": "local-completions", "--tasks": "tiny_arith",
                   "--model_args": "model={model},base_url={base_url}/completions,tokenizer_backend=None,"
                                   "num_concurrent=1,max_gen_toks=16"},
          "timeout_s": 300}
    r = run_eval(ev, stand_in, tmp_path / "strict")
    assert r.samples == 4 and r.score == pytest.approx(0.25)  # only the "#### N" answer
    results = json.loads(Path(r.runs[0].results_path).read_text())["results"]["tiny_arith"]
    assert results["exact_match,flexible-extract"] == pytest.approx(0.5)  # "#### N" and "the answer is N"
    samples = samples_file(r.runs[0].results_path, "tiny_arith")
    for metric, column in (("exact_match,strict-match", 1), ("exact_match,flexible-extract", 2)):
        items = read_samples(samples, metric)
        want = [case(it)[column] for it, case in zip(ITEMS, CASES)]
        assert [items[i].value for i in range(4)] == want, metric
