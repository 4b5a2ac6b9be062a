"""m3lab.benchmark: metric math on hand-computed timings, SSE parsing, prompts, failure handling and the
warm-up (against a scripted in-process SSE server), load settings declared only in params, each engine's way
of forcing the output length, the cross-check verdict (on the recorded H200 reference and on synthetic
numbers), and a real `transformers serve` sweep on the tiny model."""

import dataclasses
import inspect
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import filler_tokenizer
from pydantic import ValidationError

import m3lab.benchmark as bm
from m3lab.benchmark import (
    CROSSCHECK_METRICS,
    BenchmarkError,
    BenchMetrics,
    RequestRecord,
    SSEDecoder,
    Target,
    compute_metrics,
    judge_crosscheck,
    make_prompts,
    output_len_forced,
    parse_completion_event,
    run_stage,
    run_sweep,
    save_results,
    vllm_bench_command,
)
from m3lab.params import REPO_ROOT, Benchmark
from m3lab.registry import ENGINES, RegistryError


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE tokenizer trained in-process (no download, ~20 ms)."""
    return filler_tokenizer(add_bos=False)


# -----------------------------------------------------------------------------
# metric math


def rec(i, prompt_len, send, chunks, out_tokens, success=True):
    return RequestRecord(index=i, prompt_len=prompt_len, send_s=send, first_token_s=chunks[0] if chunks else None,
                         chunk_s=list(chunks), end_s=chunks[-1] if chunks else None, output_tokens=out_tokens,
                         output_tokens_source="usage", success=success, error="" if success else "boom")


def test_metrics_on_known_timings():
    records = [
        rec(0, 10, 0.0, [0.1, 0.2, 0.3, 0.5], 4),  # ttft 100, e2el 500, tpot 400/3, itl 100 100 200
        rec(1, 10, 0.0, [0.3], 1),  # 1 token: ttft 300, e2el 300, no tpot, no itl
        rec(2, 12, 0.1, [0.2, 0.4, 0.6], 5),  # 5 tokens in 3 chunks: ttft 100, e2el 500, tpot 400/4, itl 200 200
        rec(3, 100, 0.0, [5.0, 9.0], 50, success=False),  # failed: must not leak into any statistic
    ]
    m = compute_metrics(records, duration_s=2.0)
    approx = pytest.approx
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (32, 10)
    assert m.duration_s == 2.0
    assert m.request_throughput == approx(1.5)
    assert m.output_throughput == approx(5.0)
    assert m.total_token_throughput == approx(21.0)
    # TTFT ms [100, 300, 100]; numpy-linear percentiles on sorted [100, 100, 300]
    assert m.mean_ttft_ms == approx(500 / 3)
    assert m.median_ttft_ms == approx(100) and m.p50_ttft_ms == approx(100)
    assert m.std_ttft_ms == approx((((100 - 500 / 3) ** 2 * 2 + (300 - 500 / 3) ** 2) / 3) ** 0.5)
    assert m.p90_ttft_ms == approx(100 + 0.8 * 200)  # rank 0.9*2 = 1.8
    assert m.p99_ttft_ms == approx(100 + 0.98 * 200)
    # TPOT ms: (e2el - ttft) / (n - 1) = [400/3, 100]; the 1-token request is excluded
    assert m.mean_tpot_ms == approx((400 / 3 + 100) / 2)
    assert m.median_tpot_ms == approx((400 / 3 + 100) / 2)
    assert m.p90_tpot_ms == approx(100 + 0.9 * (400 / 3 - 100))
    # ITL ms: chunk gaps [100, 100, 200, 200, 200] (per chunk, not per token)
    assert m.mean_itl_ms == approx(160)
    assert m.median_itl_ms == approx(200)
    assert m.std_itl_ms == approx(2400 ** 0.5)
    assert m.p99_itl_ms == approx(200)
    # E2EL ms [500, 300, 500]
    assert m.mean_e2el_ms == approx(1300 / 3)
    assert m.median_e2el_ms == approx(500)
    assert m.p90_e2el_ms == approx(500)


def test_metrics_edge_cases():
    # All 1-token answers: TPOT and ITL have no samples -> 0.0 (as vLLM), never NaN.
    m = compute_metrics([rec(0, 5, 0.0, [0.2], 1), rec(1, 5, 0.0, [0.4], 1)], duration_s=1.0)
    assert m.completed == 2 and m.mean_tpot_ms == 0.0 and m.p99_itl_ms == 0.0
    assert m.mean_ttft_ms == pytest.approx(300)
    # All failed: counts only.
    m = compute_metrics([rec(0, 5, 0.0, [], 0, success=False)], duration_s=1.0)
    assert (m.completed, m.failed, m.total_input_tokens, m.output_throughput) == (0, 1, 0, 0.0)
    with pytest.raises(ValueError, match="duration_s"):
        compute_metrics([], duration_s=0.0)


def test_metric_names_follow_vllm():
    names = set(BenchMetrics.__dataclass_fields__)
    for m in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            assert f"{stat}_{m}_ms" in names
    assert {"completed", "failed", "total_input_tokens", "total_output_tokens", "duration_s",
            "request_throughput", "output_throughput", "total_token_throughput"} <= names


# -----------------------------------------------------------------------------
# SSE


def test_sse_decoder_reassembles_split_events():
    stream = ('data: {"choices":[{"text":"東京"}]}\n\n: ping\n\nevent: x\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
              'data: [DONE]\n\n').encode()
    dec, out = SSEDecoder(), []
    for i in range(len(stream)):  # worst case: one byte per read, splitting the UTF-8 of 東京
        out += dec.feed(stream[i:i + 1])
    out += dec.flush()
    assert out == ['{"choices":[{"text":"東京"}]}', '{"a":\n1}', "[DONE]"]
    # A last event without its blank line (server closed right after it) is not lost.
    dec = SSEDecoder()
    assert dec.feed(b'data: {"x": 1}') == [] and dec.flush() == ['{"x": 1}']


def test_parse_completion_event():
    tok = parse_completion_event('{"choices":[{"index":0,"text":" Paris","finish_reason":null}]}')
    assert tok["text"] == " Paris" and tok["usage"] is None and not tok["done"]
    # vLLM: an empty string mid-stream is a real (special) token.
    assert parse_completion_event('{"choices":[{"text":"","finish_reason":null}]}')["text"] == ""
    # vLLM's usage-only chunk and transformers serve's closing chunk carry no token.
    usage_only = parse_completion_event('{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7}}')
    assert usage_only["text"] is None and usage_only["usage"]["completion_tokens"] == 7
    closing = parse_completion_event('{"choices":[{"text":"","finish_reason":"length"}],'
                                     '"usage":{"prompt_tokens":2,"completion_tokens":8}}')
    assert closing["text"] is None and closing["finish_reason"] == "length" and closing["usage"]
    last_tok = parse_completion_event('{"choices":[{"text":"!","finish_reason":"stop"}]}')
    assert last_tok["text"] == "!" and last_tok["finish_reason"] == "stop"
    assert parse_completion_event("[DONE]")["done"]
    assert parse_completion_event('{"error": "CUDA out of memory"}')["error"] == "CUDA out of memory"
    assert parse_completion_event('{"error": {"message": "bad"}}')["error"] == "bad"


# -----------------------------------------------------------------------------
# prompts and config


def test_prompts_exact_length_and_deterministic(tokenizer):
    ps = make_prompts(tokenizer, 8, 48, seed=3)
    assert [n for _, n in ps] == [48] * 8
    assert all(len(tokenizer(p, add_special_tokens=False)["input_ids"]) == 48 for p, _ in ps)
    assert ps == make_prompts(tokenizer, 8, 48, seed=3)
    assert ps != make_prompts(tokenizer, 8, 48, seed=4)
    assert len({p for p, _ in ps}) == 8


def test_target_validation_and_url():
    kw = dict(model="m", tokenizer_dir="t")
    with pytest.raises(RegistryError, match=r"unknown engine 'tgi'; registered: transformers, vllm, mlx"):
        Target(base_url="http://h:1", engine="tgi", **kw)
    with pytest.raises(ValueError, match="endpoint"):
        Target(base_url="http://h:1", engine="vllm", endpoint="v1/completions", **kw)
    assert Target(base_url="http://h:1/v1/", engine="vllm", **kw).url == "http://h:1/v1/completions"
    assert Target(base_url="http://h:1", engine="mlx", **kw).url == "http://h:1/v1/completions"


@pytest.mark.parametrize("bad", [
    {"concurrency": []}, {"concurrency": [0]}, {"concurrency": [10_000]}, {"output_len": 0},
    {"num_prompts": 10**9}, {"request_timeout_s": math.inf}, {"total_timeout_s": math.nan},
    {"total_timeout_s": 0}, {"temperature": -0.1}, {"temperature": math.nan}, {"warmup_factor": -1},
    {"warmup_factor": 17}, {"seed": -1}, {"warmup": True},
])
def test_load_settings_are_bounded(bad):
    with pytest.raises(ValidationError):
        Benchmark(**{"concurrency": [1], **bad})


def test_load_settings_are_declared_only_in_params():
    """m3lab.params.Benchmark is the one declaration: no dataclass field or keyword default in benchmark.py
    re-declares a load setting, and the runtime Target holds none."""
    settings = set(Benchmark.model_fields)
    assert not hasattr(bm, "BenchConfig")
    assert settings.isdisjoint(f.name for f in dataclasses.fields(Target))
    for name, obj in vars(bm).items():
        if getattr(obj, "__module__", None) != bm.__name__:
            continue
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                assert not (f.name in settings and has_default), f"{name}.{f.name} re-declares a default"
        elif inspect.isfunction(obj):
            for p in inspect.signature(obj).parameters.values():
                assert not (p.name in settings and p.default is not p.empty), f"{name}({p.name}=…) re-declares it"


def test_engines_force_the_output_length_their_own_way():
    body = {"model": "m", "prompt": "p", "max_tokens": 7, "temperature": 0.0}
    vllm = ENGINES.load("vllm").force_output_len(body, 7)
    assert vllm["ignore_eos"] is True and vllm["max_tokens"] == 7
    tf = ENGINES.load("transformers").force_output_len(body, 7)
    assert "ignore_eos" not in tf  # transformers serve answers 422 to it
    assert json.loads(tf["generation_config"]) == {"min_new_tokens": 7, "max_new_tokens": 7, "do_sample": False}
    assert json.loads(ENGINES.load("transformers").force_output_len({**body, "temperature": 0.7}, 7)
                      ["generation_config"])["do_sample"] is True
    assert ENGINES.load("mlx").force_output_len(body, 7) is None  # mlx_lm.server has no way to ask
    assert body == {"model": "m", "prompt": "p", "max_tokens": 7, "temperature": 0.0}  # not mutated
    load = Benchmark(concurrency=[1])
    forced = {e: output_len_forced(Target("http://h:1", "m", "t", e), load) for e in ENGINES.names()}
    assert forced == {"transformers": True, "vllm": True, "mlx": False, "reference": True}
    assert not output_len_forced(Target("http://h:1", "m", "t", "vllm"), Benchmark(concurrency=[1], ignore_eos=False))


# -----------------------------------------------------------------------------
# scripted SSE server: timings, usage fallback, failures


class _Script:
    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()
        self.plan = lambda n: "ok"  # request number -> "ok" | "http500" | "die" | "slow"
        self.usage = True
        self.gap_s = 0.03
        self.bodies = []
        self.in_flight = 0
        self.seen = []  # per request, in arrival order: (arrival time, requests in flight including it)
        self.finished = {}  # request number -> time its response ended


def _handler(script):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # keep pytest output clean
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                n, script.n = script.n, script.n + 1
                script.bodies.append(body)
                script.in_flight += 1
                script.seen.append((time.perf_counter(), script.in_flight))
            try:
                self.answer(n)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up on a slow answer (timeouts): expected, not a server error
            finally:
                with script.lock:
                    script.in_flight -= 1
                    script.finished[n] = time.perf_counter()

        def answer(self, n):
            what = script.plan(n)
            if what == "http500":
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"internal error")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i, word in enumerate(["alpha", " beta", " gamma", " delta"]):
                time.sleep(5.0 if what == "slow" else script.gap_s)
                self.wfile.write(f'data: {json.dumps({"choices": [{"text": word}]})}\n\n'.encode())
                self.wfile.flush()
                if what == "die" and i == 1:
                    return  # connection closes mid-answer, no finish_reason
            final = {"choices": [{"text": "", "finish_reason": "length"}]}
            if script.usage:
                final["usage"] = {"prompt_tokens": 21, "completion_tokens": 6}
            self.wfile.write(f"data: {json.dumps(final)}\n\n".encode())

    return H


@pytest.fixture
def fake_server():
    script = _Script()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    srv.daemon_threads = True
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", script
    finally:
        srv.shutdown()
        srv.server_close()


def target(url, engine="vllm"):
    return Target(base_url=url, model="m", tokenizer_dir="unused", engine=engine)


def test_sweep_against_scripted_server(fake_server, tokenizer, tmp_path):
    url, script = fake_server
    load = Benchmark(concurrency=[1, 3], num_prompts=3, input_len=16, output_len=6, total_timeout_s=30)
    res = run_sweep(target(url, "transformers"), load, tokenizer=tokenizer)
    assert [lv.concurrency for lv in res.levels] == [1, 3] and not res.timed_out and res.output_len_forced
    for lv in res.levels:
        assert lv.warmup.count == 2 * lv.concurrency and lv.warmup.failed == 0  # warm-up ran, apart
        m = lv.metrics
        assert (m.completed, m.failed) == (3, 0)
        assert m.total_output_tokens == 18 and m.total_input_tokens == 63  # both from usage
        for r in lv.records:
            assert r.output_tokens_source == "usage" and r.generated_text == "alpha beta gamma delta"
            assert len(r.chunk_s) == 4 and r.finish_reason == "length"
            assert r.send_s < r.first_token_s <= r.end_s
        assert 25 <= m.median_itl_ms <= 150  # the server sleeps 30 ms between chunks
        assert m.median_ttft_ms >= 25
        tpots = sorted((r.e2el_s - r.ttft_s) / (6 - 1) * 1000 for r in lv.records)  # 6 = usage tokens
        assert m.median_tpot_ms == pytest.approx(tpots[1])
    # transformers serve: ignore_eos becomes a generation_config (it 422s on unknown fields)
    body = script.bodies[0]
    assert "ignore_eos" not in body and json.loads(body["generation_config"])["min_new_tokens"] == 6
    assert body["stream"] is True and body["temperature"] == 0.0
    jpath, cpath = save_results(res, tmp_path)
    data = json.loads(jpath.read_text())
    assert data["levels"][1]["concurrency"] == 3 and "p99_ttft_ms" in data["levels"][1]
    assert len(data["levels"][0]["requests"]) == 3 and data["levels"][1]["warmup"]["count"] == 6
    assert data["load"] == load.model_dump(mode="json") and data["target"]["engine"] == "transformers"
    lines = cpath.read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("concurrency,completed,failed")


def test_output_tokens_fall_back_to_tokenizer(fake_server, tokenizer):
    url, script = fake_server
    script.usage = False
    load = Benchmark(concurrency=[2], num_prompts=2, input_len=16, output_len=6, warmup_factor=0)
    res = run_sweep(target(url), load, tokenizer=tokenizer)
    assert len(res.levels[0].records) == 2 and len(script.bodies) == 2  # no warm-up: exactly num_prompts
    assert res.levels[0].warmup.count == 0
    expected = len(tokenizer("alpha beta gamma delta", add_special_tokens=False)["input_ids"])
    for r in res.levels[0].records:
        assert r.success and r.output_tokens_source == "tokenizer" and r.output_tokens == expected
        assert r.prompt_len == 16  # local count when the server sends no usage
    assert script.bodies[0]["ignore_eos"] is True  # vLLM's flavour


def test_run_sweep_inside_a_running_loop(fake_server, tokenizer):
    """papermill/Jupyter cells run inside an event loop; run_sweep must still work there."""
    import asyncio

    url, _ = fake_server
    load = Benchmark(concurrency=[2], num_prompts=2, input_len=8, output_len=4, warmup_factor=0)

    async def cell():
        return run_sweep(target(url), load, tokenizer=tokenizer)

    assert asyncio.run(cell()).levels[0].metrics.completed == 2


def test_failed_requests_are_counted_not_raised(fake_server, tokenizer):
    url, script = fake_server
    # requests 0 and 1 are the warm-up (2 × concurrency 1); then per 3: HTTP 500, death mid-stream, ok
    script.plan = lambda n: "ok" if n < 2 else ("http500", "die", "ok")[(n - 2) % 3]
    load = Benchmark(concurrency=[1], num_prompts=6, input_len=8, output_len=4)
    lv = run_sweep(target(url), load, tokenizer=tokenizer).levels[0]
    assert (lv.metrics.completed, lv.metrics.failed) == (2, 4)
    errors = [r.error for r in lv.records if not r.success]
    assert sum("HTTP 500" in e for e in errors) == 2
    assert sum("finish_reason" in e for e in errors) == 2
    assert lv.metrics.total_output_tokens == 12  # only the 2 successes


def test_dead_server_raises_naming_url(tokenizer):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load = Benchmark(concurrency=[1, 2], num_prompts=2, input_len=8, output_len=4)
    with pytest.raises(BenchmarkError, match=f"127.0.0.1:{port}/v1/completions"):
        run_sweep(target(f"http://127.0.0.1:{port}"), load, tokenizer=tokenizer)


def test_total_timeout_stops_the_sweep(fake_server, tokenizer):
    url, script = fake_server
    script.plan = lambda n: "slow"  # 5 s per chunk: nothing finishes within the budget
    load = Benchmark(concurrency=[1, 2], num_prompts=2, input_len=8, output_len=4, warmup_factor=0,
                     total_timeout_s=1.0)
    t0 = time.perf_counter()
    with pytest.raises(BenchmarkError, match="total_timeout_s=1.0"):
        run_sweep(target(url), load, tokenizer=tokenizer)
    assert time.perf_counter() - t0 < 4


def test_a_slow_warmup_counts_against_the_total_timeout(fake_server, tokenizer):
    url, script = fake_server
    script.plan = lambda n: "slow" if n == 0 else "ok"  # the warm-up's first request outlives the budget
    load = Benchmark(concurrency=[1], num_prompts=2, input_len=8, output_len=4, total_timeout_s=1.0)
    t0 = time.perf_counter()
    with pytest.raises(BenchmarkError, match="total_timeout_s=1.0"):
        run_sweep(target(url), load, tokenizer=tokenizer)
    assert time.perf_counter() - t0 < 4


# -----------------------------------------------------------------------------
# warm-up: one full batch (2 × concurrency by default) before each level, recorded apart


def test_each_level_is_warmed_with_full_batches_recorded_apart(fake_server, tokenizer):
    url, script = fake_server
    load = Benchmark(concurrency=[1, 3], num_prompts=3, input_len=16, output_len=6, total_timeout_s=30)
    assert load.warmup_factor == 2  # InferenceX's 2 × conc, the params default
    res = run_sweep(target(url), load, tokenizer=tokenizer)
    # The server saw, in order: level 1's warm-up (2) and timed part (3), then level 3's warm-up (6) and timed (3).
    assert len(script.bodies) == (2 + 3) + (6 + 3)
    phases = {"c1-warm": range(0, 2), "c1-timed": range(2, 5), "c3-warm": range(5, 11), "c3-timed": range(11, 14)}
    # Level 3's warm-up ran as a full batch: 3 requests in flight at once, never more.
    assert max(script.seen[n][1] for n in phases["c3-warm"]) == 3
    # Nothing timed starts before the level's warm-up has ended.
    for c in ("c1", "c3"):
        warm_end = max(script.finished[n] for n in phases[f"{c}-warm"])
        assert warm_end <= min(script.seen[n][0] for n in phases[f"{c}-timed"])
    # Warm-up prompts are not the timed prompts (a prefix cache must not flatter the timed part).
    for c in ("c1", "c3"):
        warm = {script.bodies[n]["prompt"] for n in phases[f"{c}-warm"]}
        assert warm.isdisjoint(script.bodies[n]["prompt"] for n in phases[f"{c}-timed"])
    for lv in res.levels:
        w = lv.warmup
        assert (w.count, w.completed, w.failed, w.errors) == (2 * lv.concurrency, 2 * lv.concurrency, 0, [])
        assert len(w.e2el_ms) == w.count and all(e >= 100 for e in w.e2el_ms)  # 4 chunks, 30 ms apart
        assert w.duration_s > 0
        assert (lv.metrics.completed, len(lv.records)) == (3, 3)  # only the timed requests are measured
        assert lv.metrics.total_output_tokens == 3 * 6


def test_warmup_failures_are_recorded_not_measured(fake_server, tokenizer):
    url, script = fake_server
    script.plan = lambda n: "http500" if n == 0 else "ok"  # the first warm-up request fails
    load = Benchmark(concurrency=[1], num_prompts=2, input_len=8, output_len=4)
    lv = run_sweep(target(url), load, tokenizer=tokenizer).levels[0]
    assert (lv.warmup.count, lv.warmup.completed, lv.warmup.failed) == (2, 1, 1)
    assert "HTTP 500" in lv.warmup.errors[0]
    assert (lv.metrics.completed, lv.metrics.failed) == (2, 0)


# -----------------------------------------------------------------------------
# the stage: the params section as it is, any registered engine


class _Ctx:
    def __init__(self, benchmark, serve_result, stage_dir):
        self.params, self._serve, self.stage_dir = {"benchmark": benchmark}, serve_result, stage_dir

    def upstream(self, stage):
        assert stage == "serve"
        return self._serve


def test_stage_uses_the_params_defaults_and_accepts_mlx(fake_server, tokenizer, tmp_path):
    url, script = fake_server
    script.gap_s = 0.005
    tokenizer.save_pretrained(tmp_path / "tok")
    serve = {"server": {"base_url": url, "model": "/models/oq4", "engine": "mlx"},
             "tokenizer_dir": str(tmp_path / "tok")}
    (tmp_path / "benchmark").mkdir()
    out = run_stage(_Ctx({"concurrency": [1], "crosscheck_vllm_bench": True}, serve, tmp_path / "benchmark"))
    defaults = Benchmark(concurrency=[1], crosscheck_vllm_bench=True)
    assert out["load"] == defaults.model_dump(mode="json")  # what ran is what params declare
    assert len(script.bodies) == defaults.num_prompts + defaults.warmup_factor * 1
    assert out["levels"][0]["completed"] == defaults.num_prompts
    assert out["levels"][0]["warmup"]["count"] == defaults.warmup_factor
    for body in script.bodies:
        assert body["max_tokens"] == defaults.output_len and body["temperature"] == defaults.temperature
        assert body["model"] == "/models/oq4"
        assert "ignore_eos" not in body and "generation_config" not in body  # mlx_lm.server cannot be asked
    assert out["output_len_forced"] is False
    assert out["server_metrics"]["status"] == "not run"
    cross = out["crosscheck"]
    assert cross["status"].startswith("not run (vllm bench serve needs the vllm engine")
    assert "cross-checked" not in cross["summary"].replace("not cross-checked", "")
    assert (tmp_path / "benchmark" / "benchmark.csv").is_file()


def test_vllm_bench_runs_the_same_load_with_the_same_warmup():
    t = Target(base_url="http://127.0.0.1:8000/v1", model="m3", tokenizer_dir="/tok", engine="vllm")
    argv = vllm_bench_command(t, Benchmark(concurrency=[4], num_prompts=16, input_len=256, output_len=64),
                              4, Path("/r"))
    flag = dict(zip(argv, argv[1:]))
    assert argv[:3] == ["vllm", "bench", "serve"] and flag["--base-url"] == "http://127.0.0.1:8000"
    assert (flag["--random-input-len"], flag["--random-output-len"], flag["--num-prompts"]) == ("256", "64", "16")
    assert (flag["--max-concurrency"], flag["--num-warmups"], flag["--temperature"]) == ("4", "8", "0.0")
    assert "--ignore-eos" in argv
    cold = vllm_bench_command(t, Benchmark(concurrency=[4], warmup_factor=0, ignore_eos=False), 4, Path("/r"))
    assert "--num-warmups" not in cold and "--ignore-eos" not in cold


# -----------------------------------------------------------------------------
# the cross-check verdict: ±10% on throughput, median TTFT and median TPOT at every level

H200_REFERENCE = REPO_ROOT / "results" / "reference" / "h200-gpu-tiny-vllm" / "benchmark" / "result.json"


def _said_cross_checked(verdict):
    return "cross-checked" in verdict["summary"].replace("not cross-checked", "")


def test_crosscheck_disagrees_on_the_recorded_h200_reference():
    """The H200 reference (one warm-up request per level) measured c=2 throughput at 0.39× vllm bench serve's."""
    rows = json.loads(H200_REFERENCE.read_text())["crosscheck"]["levels"]
    verdict = judge_crosscheck(rows)
    assert verdict["status"] == "disagree" and not _said_cross_checked(verdict)
    c2 = {ch["metric"]: ch for ch in next(lv for lv in verdict["levels"] if lv["concurrency"] == 2)["checks"]}
    assert set(c2) == set(CROSSCHECK_METRICS)
    assert c2["output_throughput"]["ratio"] == pytest.approx(0.392, abs=0.001)
    assert c2["output_throughput"]["agree"] is False
    assert c2["median_tpot_ms"]["agree"] is True  # the per-token numbers did agree
    for lv in verdict["levels"]:
        assert lv["status"] in ("agree", "disagree")
        for ch in lv["checks"]:
            assert ch["ratio"] == pytest.approx(ch["m3lab"] / ch["vllm"])
            assert ch["agree"] is (abs(ch["ratio"] - 1) <= 0.10)
    assert "c=2 output_throughput ×0.39" in verdict["summary"]


def _row(c, ratio=1.0, **over):
    ours = {"output_throughput": 150.0, "median_ttft_ms": 18.0, "median_tpot_ms": 6.2}
    return {"concurrency": c, "status": "ok", "command": "vllm bench serve …",
            **{f"m3lab_{k}": v * ratio for k, v in ours.items()}, **{f"vllm_{k}": v for k, v in ours.items()},
            **over}


def test_crosscheck_agrees_on_numbers_within_ten_percent():
    verdict = judge_crosscheck([_row(1, 1.0), _row(2, 1.09), _row(4, 0.91)])
    assert verdict["status"] == "agree" and _said_cross_checked(verdict)
    assert [lv["status"] for lv in verdict["levels"]] == ["agree"] * 3
    assert all(ch["agree"] for lv in verdict["levels"] for ch in lv["checks"])


def test_crosscheck_one_metric_beyond_ten_percent_at_one_level_is_a_disagreement():
    verdict = judge_crosscheck([_row(1), _row(2, vllm_median_ttft_ms=18.0 / 1.11)])
    assert verdict["status"] == "disagree" and not _said_cross_checked(verdict)
    assert [lv["status"] for lv in verdict["levels"]] == ["agree", "disagree"]
    bad = [ch["metric"] for ch in verdict["levels"][1]["checks"] if not ch["agree"]]
    assert bad == ["median_ttft_ms"]


def test_crosscheck_that_could_not_compare_is_not_run_never_agree():
    failed = judge_crosscheck([_row(1), {"concurrency": 2, "status": "failed", "reason": "OOM", "command": "…"}])
    assert failed["status"] == "not run (c=2: vllm bench serve failed: OOM)" and not _said_cross_checked(failed)
    missing = judge_crosscheck([_row(1, vllm_median_tpot_ms=None)])
    assert missing["status"].startswith("not run (c=1: vllm bench serve reported no usable median_tpot_ms")
    assert judge_crosscheck([])["status"] == "not run (no levels to compare)"
    # A disagreement elsewhere still says disagree, not "not run".
    assert judge_crosscheck([_row(1, 0.5), {"concurrency": 2, "status": "failed", "reason": "x"}])["status"] == \
        "disagree"


# -----------------------------------------------------------------------------
# a real `transformers serve` on the tiny text checkpoint

try:
    from m3lab.checkpoint import text_only
    from m3lab.tinymodel import build_tiny_checkpoint
except ImportError as e:  # the tiny-model helpers land separately
    _TINY_MISSING = f"m3lab.tinymodel / m3lab.checkpoint not available yet ({e})"
else:
    _TINY_MISSING = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    if _TINY_MISSING:
        pytest.skip(_TINY_MISSING)
    exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_checkpoint(root / "vl")
    model_dir = str(text_only(root / "vl", root / "text", flavor="transformers") or root / "text")
    port = _free_port()
    log = open(root / "serve.log", "w")
    t0 = time.perf_counter()
    # One torch thread: on 2 cores, torch's default 2 intra-op threads plus uvicorn's loop and this
    # client oversubscribe the CPU and decode steps stall now and then (6 ms/token becomes ~200).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([exe, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n{(root / 'serve.log').read_text()}")
            if time.perf_counter() - t0 > 120:
                pytest.fail(f"transformers serve not healthy after 120 s:\n{(root / 'serve.log').read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        healthy_s = time.perf_counter() - t0
        yield {"url": f"http://127.0.0.1:{port}", "model": model_dir, "healthy_s": healthy_s}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_real_transformers_serve_sweep(tiny_server, tmp_path):
    tgt = Target(base_url=tiny_server["url"], model=tiny_server["model"], tokenizer_dir=tiny_server["model"],
                 engine="transformers")
    load = Benchmark(concurrency=[1, 2], num_prompts=4, input_len=32, output_len=16, total_timeout_s=120,
                     request_timeout_s=60)
    res = run_sweep(tgt, load)
    save_results(res, tmp_path)
    for lv in res.levels:
        assert (lv.warmup.count, lv.warmup.failed) == (2 * lv.concurrency, 0), lv.warmup.errors
        m = lv.metrics
        assert (m.completed, m.failed) == (4, 0), [r.error for r in lv.records]
        # ignore_eos via generation_config: exactly output_len tokens, counted by the server
        assert m.total_output_tokens == 4 * 16
        assert all(r.output_tokens_source == "usage" and r.output_tokens == 16 for r in lv.records)
        assert m.total_input_tokens >= 4 * 32
        for r in lv.records:
            assert r.send_s < r.first_token_s < r.end_s  # really streamed: tokens arrive over time
            assert len(r.chunk_s) >= 2 and r.generated_text
        assert 0 < m.mean_ttft_ms < m.mean_e2el_ms
        assert m.mean_tpot_ms > 0 and m.mean_itl_ms > 0
        assert m.output_throughput > 0 and m.duration_s > 0
    (tmp_path / "measured.json").write_text(json.dumps({"healthy_s": tiny_server["healthy_s"],
                                                         "levels": res.rows()}, indent=1))
