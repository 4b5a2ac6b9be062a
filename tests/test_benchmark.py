"""m3lab.benchmark: metric math on hand-computed timings, SSE parsing, prompts, failure handling
(against a scripted in-process SSE server), and a real `transformers serve` sweep on the tiny model."""

import json
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

from m3lab.benchmark import (
    BenchConfig,
    BenchmarkError,
    BenchMetrics,
    RequestRecord,
    SSEDecoder,
    compute_metrics,
    make_prompts,
    parse_completion_event,
    run_sweep,
    save_results,
)


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


def test_config_validation_and_url():
    kw = dict(model="m", tokenizer_dir="t")
    with pytest.raises(ValueError, match="concurrency"):
        BenchConfig(base_url="http://h:1", concurrency=[0], **kw)
    with pytest.raises(ValueError, match="output_len"):
        BenchConfig(base_url="http://h:1", output_len=0, **kw)
    with pytest.raises(ValueError, match="engine"):
        BenchConfig(base_url="http://h:1", engine="tgi", **kw)
    assert BenchConfig(base_url="http://h:1/v1/", **kw).url == "http://h:1/v1/completions"
    assert BenchConfig(base_url="http://h:1", **kw).url == "http://h:1/v1/completions"


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


def _handler(script):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # keep pytest output clean
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                n, script.n = script.n, script.n + 1
                script.bodies.append(body)
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


def test_sweep_against_scripted_server(fake_server, tokenizer, tmp_path):
    url, script = fake_server
    cfg = BenchConfig(base_url=url, model="m", tokenizer_dir="unused", concurrency=[1, 3], num_prompts=3,
                      input_len=16, output_len=6, engine="transformers", total_timeout_s=30)
    res = run_sweep(cfg, tokenizer=tokenizer)
    assert [lv.concurrency for lv in res.levels] == [1, 3] and not res.timed_out
    for lv in res.levels:
        assert lv.warmup is not None and lv.warmup.success  # warmup ran and is not in the records
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
    assert len(data["levels"][0]["requests"]) == 3
    lines = cpath.read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("concurrency,completed,failed")


def test_output_tokens_fall_back_to_tokenizer(fake_server, tokenizer):
    url, script = fake_server
    script.usage = False
    cfg = BenchConfig(base_url=url, model="m", tokenizer_dir="unused", concurrency=[2], num_prompts=2,
                      input_len=16, output_len=6, warmup=False)
    res = run_sweep(cfg, tokenizer=tokenizer)
    assert len(res.levels[0].records) == 2 and len(script.bodies) == 2  # no warmup: exactly num_prompts
    expected = len(tokenizer("alpha beta gamma delta", add_special_tokens=False)["input_ids"])
    for r in res.levels[0].records:
        assert r.success and r.output_tokens_source == "tokenizer" and r.output_tokens == expected
        assert r.prompt_len == 16  # local count when the server sends no usage
    assert script.bodies[0]["ignore_eos"] is True  # vLLM flavour (the default engine)


def test_run_sweep_inside_a_running_loop(fake_server, tokenizer):
    """papermill/Jupyter cells run inside an event loop; run_sweep must still work there."""
    import asyncio

    url, _ = fake_server
    cfg = BenchConfig(base_url=url, model="m", tokenizer_dir="unused", concurrency=[2], num_prompts=2,
                      input_len=8, output_len=4, warmup=False)

    async def cell():
        return run_sweep(cfg, tokenizer=tokenizer)

    assert asyncio.run(cell()).levels[0].metrics.completed == 2


def test_failed_requests_are_counted_not_raised(fake_server, tokenizer):
    url, script = fake_server
    # request 0 is the warmup; then per 3: HTTP 500, death mid-stream, ok
    script.plan = lambda n: "ok" if n == 0 else ("http500", "die", "ok")[(n - 1) % 3]
    cfg = BenchConfig(base_url=url, model="m", tokenizer_dir="unused", concurrency=[1], num_prompts=6,
                      input_len=8, output_len=4)
    lv = run_sweep(cfg, tokenizer=tokenizer).levels[0]
    assert (lv.metrics.completed, lv.metrics.failed) == (2, 4)
    errors = [r.error for r in lv.records if not r.success]
    assert sum("HTTP 500" in e for e in errors) == 2
    assert sum("finish_reason" in e for e in errors) == 2
    assert lv.metrics.total_output_tokens == 12  # only the 2 successes


def test_dead_server_raises_naming_url(tokenizer):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = BenchConfig(base_url=f"http://127.0.0.1:{port}", model="m", tokenizer_dir="unused",
                      concurrency=[1, 2], num_prompts=2, input_len=8, output_len=4)
    with pytest.raises(BenchmarkError, match=f"127.0.0.1:{port}/v1/completions"):
        run_sweep(cfg, tokenizer=tokenizer)


def test_total_timeout_stops_the_sweep(fake_server, tokenizer):
    url, script = fake_server
    script.plan = lambda n: "slow"  # 5 s per chunk: nothing finishes within the budget
    cfg = BenchConfig(base_url=url, model="m", tokenizer_dir="unused", concurrency=[1, 2], num_prompts=2,
                      input_len=8, output_len=4, warmup=False, total_timeout_s=1.0)
    t0 = time.perf_counter()
    with pytest.raises(BenchmarkError, match="total_timeout_s=1.0"):
        run_sweep(cfg, tokenizer=tokenizer)
    assert time.perf_counter() - t0 < 4


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
    cfg = BenchConfig(base_url=tiny_server["url"], model=tiny_server["model"], tokenizer_dir=tiny_server["model"],
                      concurrency=[1, 2], num_prompts=4, input_len=32, output_len=16, engine="transformers",
                      total_timeout_s=120, request_timeout_s=60)
    res = run_sweep(cfg)
    save_results(res, tmp_path)
    for lv in res.levels:
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
