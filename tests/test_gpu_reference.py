"""The vLLM paths against real output recorded on an H200 (results/reference/, made by `m3lab run gpu-tiny-vllm`
through tools/gpu-run.sh on 2026-11-22; that profile is now h200-tiny-bf16). CI has no GPU: these tests replay what
the GPU run wrote."""

import json
import shlex
from pathlib import Path

import pytest

from m3lab.claims import lookup
from m3lab.params import REPO_ROOT, load_params
from m3lab.serve import build_command
from m3lab.vllm_obs import decisive_lines, parse_prometheus, parse_server_log, summarize_metrics

RUN = REPO_ROOT / "results" / "reference" / "h200-gpu-tiny-vllm"
# Each recorded folder -> (the profile name its files record, the profile's name now). The recordings are history
# and keep the old names; the profiles were renamed to <hardware>-tiny-<recipe> (params/README.md).
REFERENCE_PROFILES = {"h200-gpu-tiny-vllm": ("gpu-tiny-vllm", "h200-tiny-bf16"),
                      "h200-gpu-tiny-vllm-fp8": ("gpu-tiny-vllm-fp8", "h200-tiny-fp8")}
FIXTURES = Path(__file__).parent / "fixtures" / "vllm"
# Settings the profiles changed on purpose after the 2026-11 recordings, and why.
CHANGED_SINCE = {
    "benchmark.concurrency": "1-16 since the F2 fix: the 2026-11 profile was cut to 1-2 after the c=4 crash",
}


def read(*parts):
    return json.loads(RUN.joinpath(*parts).read_text())


def test_reference_run_is_complete_and_ok():
    summary = read("summary.json")
    assert summary["profile"] == REFERENCE_PROFILES[RUN.name][0] and summary["status"] == "ok"
    assert {s["status"] for s in summary["stages"].values()} == {"ok"}
    assert "H200" in " ".join(read("provenance.json")["gpus"])
    assert (RUN / "index.html").is_file()


def test_vllm_command_from_params_is_the_command_that_ran():
    server = read("serve", "result.json")["server"]
    params = load_params(REFERENCE_PROFILES[RUN.name][1])
    rebuilt = build_command("vllm", server["model_dir"], params.serve.model_dump(mode="json"), server["port"])
    assert rebuilt == server["argv"]
    assert shlex.join(rebuilt) == server["command"]


@pytest.mark.parametrize("folder", sorted(REFERENCE_PROFILES))
def test_renamed_profile_still_holds_every_recorded_param(folder):
    """The recorded params.json, key by key, against today's profile of the new name: only the name, `extends`
    and keys added to the schema since (absent from the recording) may differ."""
    recorded_as, name = REFERENCE_PROFILES[folder]
    recorded = json.loads((REPO_ROOT / "results" / "reference" / folder / "params.json").read_text())
    assert recorded["profile"] == recorded_as
    now = load_params(name).model_dump(mode="json")

    def same(rec, cur, where):
        if isinstance(rec, dict) and isinstance(cur, dict):
            for k, v in rec.items():
                assert k in cur, f"{where}{k}: recorded, gone from profile {name}"
                same(v, cur[k], f"{where}{k}.")
        elif where.rstrip(".") not in CHANGED_SINCE:
            assert rec == cur, f"{where.rstrip('.')}: recorded {rec!r}, profile {name} has {cur!r}"

    same({k: v for k, v in recorded.items() if k not in ("profile", "extends")}, now, "")


def test_start_up_log_facts_parse_from_the_real_log():
    facts = parse_server_log((RUN / "servers" / "server.log").read_text())
    assert facts.vllm_version == "0.25.1" and facts.attention_backend == "TRITON_ATTN"
    assert facts.max_model_len == 4096 and facts.enforce_eager is True
    assert facts.kv_cache_tokens == 9_699_072 and facts.kv_cache_gib == pytest.approx(41.62)
    assert 0 < facts.model_memory_gib < 0.1  # a 4.8M-parameter model
    assert facts.max_concurrency == pytest.approx(9_699_072 / 4096, rel=0.01)
    recorded = read("serve", "result.json")["vllm"]  # what the serve stage parsed at start-up
    for key in ("vllm_version", "model_memory_gib", "kv_cache_gib", "kv_cache_tokens", "max_concurrency",
                "engine_init_s", "startup_s"):
        assert recorded[key] == getattr(facts, key), key
    assert recorded["errors"] == [] and facts.errors  # the full log also has the later prompt_logprobs NaN error


def test_metrics_scraped_around_the_benchmark_parse_and_summarize():
    parsed = json.loads((RUN / "benchmark" / "server-metrics.json").read_text())
    summary = summarize_metrics(parsed)
    bench = read("benchmark", "result.json")
    completed = sum(lv["completed"] for lv in bench["levels"])
    assert summary["num_requests_success"] >= completed  # every benchmark request (plus warmups, earlier stages)
    assert summary["kv_cache_tokens"] == 9_699_072 and summary["block_size"] == 128
    assert bench["server_metrics"]["status"] == "ok"
    assert bench["server_metrics"]["ttft_count"] == completed + len(bench["levels"])  # + one warmup per level


def test_our_client_and_vllm_bench_serve_measured_the_same_server():
    cross = read("benchmark", "result.json")["crosscheck"]
    assert cross["status"] == "ok"
    for lv in cross["levels"]:
        assert lv["status"] == "ok" and lv["command"].startswith("vllm bench serve --backend openai")
        for k in ("output_throughput", "median_ttft_ms", "median_tpot_ms"):
            assert lv[f"ratio_{k}"] == pytest.approx(lv[f"m3lab_{k}"] / lv[f"vllm_{k}"])
        # Same server, same load: the two clients agree within a factor of 1.5 on the per-token numbers.
        assert 1 / 1.5 < lv["ratio_median_tpot_ms"] < 1.5


def test_results_on_the_gpu_are_the_trained_models_answers():
    corr = read("correctness", "result.json")
    assert corr["passed"] == corr["total"] == 4
    assert corr["parity"]["match_rate"] == 1.0  # vLLM's greedy tokens = transformers' offline greedy tokens
    assert_eval_invariants(lookup(corr, "evals[id=wikitext2_ppl]"))
    assert_needle_invariants(read("needle", "result.json"))


def assert_eval_invariants(ev):
    """Whatever the GPU run measured: a failed or not-run eval carries no number and says why; an ok one does."""
    if ev["status"] == "ok":
        assert isinstance(ev["score"], float) and ev["score"] == ev["score"]  # finite, not NaN
    else:
        assert ev.get("score") is None and ev["reason"]


def assert_needle_invariants(needle):
    """Counts add up from the cells: hits ≤ cells run ≤ cells total, accuracy = hits / run, and a cell beyond the
    model's context is never scored."""
    cells = needle["cells"]
    ran = [c for c in cells if not c["status"].startswith("not run")]
    assert needle["cells_total"] == len(cells) and needle["cells_run"] == len(ran)
    assert needle["hits"] == sum(c["status"] == "hit" for c in ran) <= len(ran)
    assert needle["accuracy"] == pytest.approx(needle["hits"] / len(ran))
    assert all(c["status"] in ("hit", "miss", "error") for c in ran)


def test_decisive_lines_of_a_real_engine_crash():
    lines = decisive_lines((FIXTURES / "h200-engine-crash-server.log").read_text())
    assert any("illegal memory access" in line for line in lines)
    assert not any(line.startswith("File ") for line in lines)


def test_fp8_from_the_quantize_stage_served_by_vllm():
    fp8 = REPO_ROOT / "results" / "reference" / "h200-gpu-tiny-vllm-fp8"
    summary = json.loads((fp8 / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["quantize"]["recipe"] == "fp8_dynamic"
    assert summary["quantize"]["shared_expert_check"] is True
    facts = parse_server_log((fp8 / "servers" / "server.log").read_text())
    assert facts.quantization == "compressed-tensors"  # vLLM loaded the workbook's own llm-compressor output
    corr = json.loads((fp8 / "correctness" / "result.json").read_text())
    assert corr["passed"] == 4 and corr["parity"]["match_rate"] == 1.0
    ppl = lookup(corr, "evals[id=wikitext2_ppl]")
    assert_eval_invariants(ppl)
    if ppl["status"] == "ok":
        assert ppl["clamped_tokens"] == 0 and 1.0 < ppl["score"] < 10.0
    assert_needle_invariants(json.loads((fp8 / "needle" / "result.json").read_text()))


def test_prometheus_text_round_trip_of_a_real_family():
    parsed = json.loads((RUN / "benchmark" / "server-metrics.json").read_text())
    fam = parsed["vllm:time_to_first_token_seconds"]
    assert fam["type"] == "histogram"
    def line(sample):
        labels = ",".join(f'{k}="{v}"' for k, v in sample["labels"].items())
        return f"{sample['name']}{{{labels}}} {sample['value']}"

    text = "\n".join(line(s) for s in fam["samples"])
    again = parse_prometheus(f"# TYPE vllm:time_to_first_token_seconds histogram\n{text}\n")
    assert again["vllm:time_to_first_token_seconds"]["samples"] == fam["samples"]


@pytest.mark.parametrize("name", ["h200-gpu-tiny-vllm", "h200-gpu-tiny-vllm-fp8", "h200-tiny-bf16",
                                  "h200-tiny-bf16-asshipped", "h200-tiny-fp8"])
def test_each_reference_names_the_commit_that_made_it(name):
    import re
    import subprocess

    prov = json.loads((REPO_ROOT / "results" / "reference" / name / "provenance.json").read_text())
    git = prov["git"]
    assert "git_sha" not in prov and re.fullmatch(r"[0-9a-f]{40}", git["commit"]) and git["source"]
    # tools/verify_reference_commit.py: the run's own stage fingerprints, recomputed from that commit's code
    assert git["verified"].startswith("all 7 stage fingerprints") and git["commit"][:7] in git["verified"]
    known = subprocess.run(["git", "cat-file", "-e", f"{git['commit']}^{{commit}}"], cwd=REPO_ROOT,
                           capture_output=True)
    in_checkout = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=REPO_ROOT, capture_output=True).returncode == 0
    if in_checkout:
        assert known.returncode == 0, f"{git['commit']} is not a commit of this repository"


def test_the_f2_ab_recorded_on_the_h200_is_what_the_checks_say():
    """The 2026-12-03 pair: the same bf16 profile with vLLM 0.25.1's M3 sparse-path fix and without it. Invariants
    of the records (counts add up, verdicts follow from rows) and the A/B itself: red without, green with."""
    ref = REPO_ROOT / "results" / "reference"

    def load(name, *parts):
        return json.loads((ref / name).joinpath(*parts).read_text())

    fixed, shipped = load("h200-tiny-bf16", "summary.json"), load("h200-tiny-bf16-asshipped", "summary.json")
    assert any(said.startswith("patched") for said in fixed["serve"]["plugin_said"])
    assert "python_path" not in shipped["serve"]  # as shipped: no plugin on the server's path
    for run in ("h200-tiny-bf16", "h200-tiny-bf16-asshipped"):
        num = load(run, "correctness", "result.json")["numerics"]
        nf = num["nonfinite"]
        assert len(nf["findings"]) == sum("finding" in r for r in nf["rows"]) and nf["probes"] == len(nf["rows"])
        assert nf["verdict"] == ("fail" if nf["findings"] else "pass")
        det = num["determinism"]
        assert det["mismatch_rate"] == pytest.approx(sum(r["mismatched"] for r in det["rows"]) / det["requests"])
    verdicts = {run: {c["check"]: c["verdict"] for c in s["checks"]} for run, s in (("fixed", fixed),
                                                                                     ("shipped", shipped))}
    for check in ("numerics: nonfinite", "numerics: determinism", "numerics: prefix cache"):
        assert verdicts["fixed"][check] == "pass" and verdicts["shipped"][check] == "fail", check
    shipped_nf = load("h200-tiny-bf16-asshipped", "correctness", "result.json")["numerics"]["nonfinite"]
    assert {f["kind"] for f in shipped_nf["findings"]} == {"HTTP 400: NaN"}
    assert min(f["n_tokens"] for f in shipped_nf["findings"]) > 128  # from the first block edge on
    assert fixed["needle"]["hits"] == fixed["needle"]["cells_run"] == 20
    assert [lv["concurrency"] for lv in fixed["benchmark"]["levels"]] == [1, 2, 4, 8, 16]
    assert all(lv["failed"] == 0 and lv["completed"] == 16 for lv in fixed["benchmark"]["levels"])
    assert shipped["stages"]["needle"]["status"] == "failed"  # the engine died in correctness's concurrent batch
    assert "illegal memory access" in (ref / "h200-tiny-bf16-asshipped" / "servers" / "server.log").read_text()
