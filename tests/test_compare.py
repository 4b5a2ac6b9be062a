"""m3lab.compare on the committed reference runs (real vLLM records from an H200), and the two-GPU profile as
data (the nvidia-h200-x2 kind it needs has not been lent: its command line and plan are what can be checked)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from m3lab import compare, memplan, plan
from m3lab.params import load_params

REF = Path(__file__).resolve().parents[1] / "results" / "reference"
BF16, ASSHIPPED = REF / "h200-tiny-bf16", REF / "h200-tiny-bf16-asshipped"


def test_a_run_agrees_with_itself():
    r = compare.compare_runs(BF16, BF16)
    assert r["verdict"] == "agree"
    assert r["needle"]["cells"] == 20 and r["needle"]["differ"] == []
    assert all(row["ratio_b_over_a"] == 1.0 for row in r["benchmark"])


def test_the_unfixed_sparse_path_differs_from_the_fixed_one():
    r = compare.compare_runs(BF16, ASSHIPPED)
    assert r["verdict"] in ("differ", "not run")
    assert r["numerics"]["agree"] is False
    assert r["numerics"]["verdicts"]["nonfinite"] == ["pass", "fail"]


def test_one_changed_needle_cell_is_a_difference(tmp_path):
    b = tmp_path / "b"
    shutil.copytree(BF16, b)
    res = json.loads((b / "needle" / "result.json").read_text())
    res["cells"][3]["status"] = "miss"
    (b / "needle" / "result.json").write_text(json.dumps(res))
    r = compare.compare_runs(BF16, b)
    assert r["verdict"] == "differ"
    assert r["needle"]["differ"] == [{"length": res["cells"][3]["length"], "depth": res["cells"][3]["depth"],
                                      "a": "hit", "b": "miss"}]


def test_a_stage_that_did_not_end_ok_is_not_run_never_a_match(tmp_path):
    b = tmp_path / "b"
    shutil.copytree(BF16, b)
    (b / "needle" / "status.json").write_text(json.dumps({"status": "failed"}))
    r = compare.compare_runs(BF16, b)
    assert r["needle"]["verdict"].startswith("not run") and r["verdict"] == "not run"


def test_plan_against_vllms_startup_facts_on_the_gpu_the_run_had():
    # hardware/hopper1.yaml is sized for an H100 (80 GiB); the run had an H200 (nvidia-smi: 143771 MiB).
    on_profile = {r["quantity"]: r for r in compare.plan_vs_measured(BF16)["rows"]}
    assert on_profile["kv_cache_gib"]["rel_error"] < -0.4  # planned for the smaller GPU
    real = {r["quantity"]: r for r in compare.plan_vs_measured(BF16, gpu_memory_gib=143771 / 1024)["rows"]}
    assert abs(real["kv_cache_gib"]["rel_error"]) < 0.02
    assert abs(real["kv_cache_tokens"]["rel_error"]) < 0.02
    assert real["kv_cache_tokens"]["measured"] == 9699072


def test_a_run_without_vllm_facts_has_no_plan_check(tmp_path):
    run = tmp_path / "run"
    (run / "serve").mkdir(parents=True)
    (run / "serve" / "result.json").write_text(json.dumps({"server": {}}))
    assert compare.plan_vs_measured(run)["verdict"] == "not run"


def test_the_two_gpu_profile_states_card_002s_parallel_flags():
    p = load_params("h200x2-tiny-bf16-tp2ep")
    assert p.hardware.gpus == 2
    serve_line = plan.format_plan(plan.make_plan(p))
    assert "--tensor-parallel-size 2 --enable-expert-parallel --disable-custom-all-reduce" in serve_line
    args = p.serve.args
    assert args["--tensor-parallel-size"] == 2 and args["--enable-expert-parallel"] is True
    assert args["--disable-custom-all-reduce"] is True
    mp = memplan.plan_for_params(p)
    assert mp["parallel"] == "TP 2, EP 2" and mp["num_gpus"] == 2
    # everything else as on one GPU: the comparison is like with like
    one = load_params("h200-tiny-bf16")
    assert p.needle == one.needle and p.correctness == one.correctness and p.model == one.model


def test_the_tiny_shapes_must_divide_across_the_gpus():
    p = load_params("h200x2-tiny-bf16-tp2ep")
    p.serve.args["--tensor-parallel-size"] = 3
    with pytest.raises(memplan.PlanError, match="does not divide 4 attention heads"):
        memplan.plan_for_params(p)
