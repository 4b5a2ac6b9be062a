"""The whole embedded DAG, for real: papermill runs the seven notebooks on the tiny M3 on this CPU.

One full run per module (about a minute on 2 cores), then the checks that need it: every stage ran, the report
is complete and self-contained, summary.json has the documented keys, an unchanged re-run reuses everything
without starting a server, earlier runs are left alone, and a failing stage keeps its notebook and fails the run.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from m3lab import dag, procs
from m3lab.params import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("M3LAB_RESULTS", str(root))  # kernels inherit it, so every stage writes under tmp
        yield root


@pytest.fixture(scope="module")
def first_run(results_root):
    lines: list[str] = []
    rep = dag.run("cpu-tiny", echo=lines.append)
    return rep, lines


def test_every_stage_ran_for_real_and_the_run_is_ok(first_run):
    rep, lines = first_run
    assert rep.status == "ok", lines
    assert {n: s["status"] for n, s in rep.stages.items()} == {n: "ok" for n in dag.STAGES}
    for name, st in dag.STAGES.items():
        nb = json.loads((rep.run_dir / name / st.notebook).read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(c["execution_count"] for c in code), f"{name}: a cell did not execute"
        assert not any(o.get("output_type") == "error" for c in code for o in c["outputs"]), name
        assert (rep.run_dir / name / "result.json").is_file()
    assert any(line.startswith("[7/7] plot") and "ok" in line for line in lines)


def test_stage_results_come_from_the_real_parts(first_run):
    rep, _ = first_run
    read = lambda stage: json.loads((rep.run_dir / stage / "result.json").read_text())  # noqa: E731
    download = read("download")
    assert re.fullmatch(r"[0-9a-f]{40}", download["commit"]) and download["total_bytes"] > 1_000_000
    assert (rep.run_dir / "download" / "manifest.json").is_file()
    quant = read("quantize")
    assert quant["recipe"] == "fp8_dynamic" and 8 < quant["report"]["bits_per_weight"] < 16
    assert quant["report"]["shared_expert_check"]["passed"]
    server = read("serve")["server"]
    assert server["command"].startswith("transformers serve ") and server["host"] == "127.0.0.1"
    assert not procs.pid_alive(server["pid"]), "the runner must stop the server at the end"
    corr = read("correctness")
    assert corr["total"] == 4 and corr["parity"]["status"] == "ok"
    assert corr["parity"]["match_rate"] == 1.0  # server and offline transformers compute the same greedy tokens
    arith = corr["evals"][0]
    assert arith["id"] == "tiny_arith" and arith["status"] == "ok" and arith["samples"] == 40  # real lm-eval
    assert 0.0 <= arith["score"] <= 1.0 and arith["score_pct"] == pytest.approx(100 * arith["score"], abs=1e-3)
    # The bf16 baseline on the same server, the same 40 items, paired from lm-eval's own --log_samples files.
    base, pair = arith["baseline"], arith["paired"]
    assert base["status"] == "ok" and base["samples"] == 40 and pair["status"] == "ok" and pair["items"] == 40
    assert pair["baseline_mean"] == pytest.approx(base["score"]) and pair["quantized_mean"] == pytest.approx(
        arith["score"])
    d = pair["discordant"]
    assert len(pair["flipped"]) == d["only_baseline_right"] + d["only_quantized_right"]
    assert pair["recovery_pct"] == pytest.approx(100 * arith["score"] / base["score"])
    assert base["runs"][0]["command"].count("--log_samples") == 1
    num = corr["numerics"]
    assert num["lengths"] == [127, 128, 129, 511, 512, 513, 1024, 2048, 4000]
    assert num["nonfinite"]["verdict"] == "pass" and num["determinism"]["verdict"] == "pass"
    assert num["parity"]["verdict"] == "pass" and "greedy" in num["parity"]["method"]  # no logprobs on CPU
    assert num["prefix_cache"]["verdict"] == "not run"
    assert corr["chat"]["passed"] == corr["chat"]["total"] == 2  # reasoning and a tool call, via m3lab.parsers
    needle = read("needle")
    assert needle["cells_run"] == needle["cells_total"] == 20
    bench = read("benchmark")
    assert [lv["concurrency"] for lv in bench["levels"]] == [1, 2]
    assert all(lv["completed"] == 4 and lv["failed"] == 0 for lv in bench["levels"])
    assert all(0 < lv["median_ttft_ms"] < lv["median_e2el_ms"] for lv in bench["levels"])
    assert (rep.run_dir / "benchmark" / "benchmark.csv").is_file()
    assert {p.name for p in (rep.run_dir / "plot").glob("*.png")} == {
        "1-correctness.png", "2-needle.png", "3-benchmark.png", "4-claims.png", "5-recovery.png"}


def test_report_pages_exist_and_are_self_contained(first_run):
    rep, _ = first_run
    pages = [rep.index_html] + [rep.run_dir / n / f"{n}.html" for n in dag.STAGES]
    for page in pages:
        html = page.read_text()
        assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=[\"']?(https?:)?//", html), page
        assert "@import url(http" not in html, page
    index = rep.index_html.read_text()
    for name in dag.STAGES:
        assert f"href='{name}/{name}.html'" in index
    assert index.count("data:image/png;base64,") == 5


def test_summary_json_has_every_documented_key(first_run):
    rep, _ = first_run
    summary = json.loads((rep.run_dir / "summary.json").read_text())
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### summary.json", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_.\[\]]+)`", section, re.M))
    for key in documented:
        head = key.split(".")[0].rstrip("[]")
        assert head in summary, f"README documents {key} but summary.json has no {head}"
    assert summary["schema"] == "m3lab.summary/1" and summary["status"] == "ok"
    assert 0.0 <= summary["correctness"]["pass_rate"] <= 1.0
    assert summary["needle"]["cells_run"] == 20
    level = summary["benchmark"]["levels"][0]
    for k in ("concurrency", "request_throughput", "output_throughput", "median_ttft_ms", "median_tpot_ms",
              "p99_e2el_ms"):
        assert isinstance(level[k], (int, float)), k
    claims = {c["id"]: c for c in summary["claims"]}
    assert set(claims) == {"tiny-correctness", "tiny-parity", "tiny-needle", "tiny-arith", "tiny-arith-recovery"}
    for c in claims.values():
        assert c["verdict"] in ("reproduced", "not reproduced") and isinstance(c["measured"], (int, float))
    arith = json.loads((rep.run_dir / "correctness" / "result.json").read_text())["evals"][0]
    assert claims["tiny-arith-recovery"]["measured"] == pytest.approx(arith["paired"]["recovery_pct"], abs=1e-3)
    assert claims["tiny-arith"]["measured"] == pytest.approx(arith["baseline"]["score_pct"], abs=1e-3)  # bf16
    assert {c["check"] for c in summary["checks"]} >= {"numerics: nonfinite", "numerics: determinism",
                                                        "numerics: parity", "recovery: tiny_arith"}
    assert claims["tiny-correctness"]["verdict"] == "reproduced"  # the trained model knows its facts
    assert claims["tiny-needle"]["verdict"] == "reproduced"
    prov = json.loads((rep.run_dir / "provenance.json").read_text())
    assert prov["packages"]["transformers"] and prov["packages"]["papermill"] and prov["params_hash"]
    assert prov["checkpoints"]["download"]["commit"] == summary["download"]["commit"]


def test_unchanged_rerun_reuses_every_stage_and_starts_no_server(first_run):
    rep, _ = first_run
    before = {p: p.stat().st_mtime_ns for p in rep.run_dir.rglob("*") if p.is_file()}
    again = dag.run("cpu-tiny", echo=lambda s: None)
    assert again.status == "ok" and again.run_dir != rep.run_dir
    assert {s["status"] for s in again.stages.values()} == {"reused"}
    assert not (again.run_dir / "servers").exists()
    assert (again.run_dir / "index.html").is_file()
    summary = json.loads((again.run_dir / "summary.json").read_text())
    assert summary["needle"]["cells_run"] == 20  # reused numbers are still reported
    assert {p: p.stat().st_mtime_ns for p in rep.run_dir.rglob("*") if p.is_file()} == before  # untouched


def test_failed_stage_keeps_its_notebook_and_fails_the_run(first_run, tmp_path):
    profile = tmp_path / "broken-serve.yaml"
    profile.write_text(yaml.safe_dump({"extends": "cpu-tiny", "profile": "broken-serve",
                                       "serve": {"args": {"--no-such-flag": True}, "startup_timeout_s": 60}}))
    lines: list[str] = []
    rep = dag.run(profile, echo=lines.append)
    assert rep.status == "failed"
    assert rep.stages["serve"]["status"] == "failed" and "ServerDied" in rep.stages["serve"]["error"]
    for name in ("correctness", "needle", "benchmark"):
        assert rep.stages[name]["status"] == "not run" and "upstream failed: serve" in rep.stages[name]["reason"]
    assert rep.stages["plot"]["status"] == "ok"  # plot still shows what there is
    nb = json.loads((rep.run_dir / "serve" / "03_serve.ipynb").read_text())
    assert any(o.get("output_type") == "error" for c in nb["cells"] if c["cell_type"] == "code"
               for o in c.get("outputs", []))  # papermill's error cell is kept
    summary = json.loads((rep.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["needle"]["status"] == "not run"
    assert "accuracy" not in summary["needle"]  # a stage that did not run never carries a number
    assert (rep.run_dir / "serve" / "serve.html").is_file() and rep.index_html.is_file()


def test_ctrl_c_stops_the_server_and_marks_the_run_interrupted(first_run, results_root):
    import os
    import signal
    import subprocess
    import sys
    import time

    rep, _ = first_run
    env = {**os.environ, "M3LAB_RESULTS": str(results_root)}
    # A terminal's Ctrl-C signals the whole foreground process group: the runner and its notebook kernel.
    proc = subprocess.Popen([sys.executable, "-m", "m3lab", "run", "cpu-tiny", "--from", "needle"], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    profile_dir = results_root / "cpu-tiny"
    deadline = time.monotonic() + 240
    record = None
    while time.monotonic() < deadline and record is None and proc.poll() is None:
        runs = sorted(p for p in profile_dir.iterdir() if p.name[:1].isdigit() and p != rep.run_dir)
        for run in runs:
            rec = run / "servers" / "server.json"
            if rec.is_file() and (run / "serve" / "result.json").is_file():  # serve done: needle is next
                record = json.loads(rec.read_text())
        time.sleep(0.5)
    assert record is not None, f"the run never got its server up: {proc.poll() is None or proc.communicate()[0]}"
    time.sleep(2)  # well inside the needle stage
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert not procs.pid_alive(record["pid"]), "Ctrl-C must stop the server the run started"
    run_dir = Path(record["log_path"]).parent.parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert (run_dir / "index.html").is_file()
