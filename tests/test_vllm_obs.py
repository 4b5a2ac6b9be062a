"""vllm_obs on text shaped like vLLM's real output.

The `synthetic-*` fixtures are written from vLLM's format strings (tests/fixtures/vllm/README.md says which);
each assertion names the source line the fact comes from. vLLM cannot run here, so the only live server in
this file is transformers serve, for the "no /metrics" path."""

from __future__ import annotations

import http.server
import json
import math
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

from m3lab.vllm_obs import (MetricsUnavailable, VllmLogFacts, decisive_lines, histogram_quantile, metrics_delta,
                            parse_prometheus, parse_server_log, scrape_metrics, summarize_metrics)

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Server logs
# ---------------------------------------------------------------------------------------------------------------

def test_single_gpu_log_gives_memory_kv_capacity_and_config():
    f = parse_server_log(fixture("synthetic-serve-tp1.txt"))
    # vllm/entrypoints/utils.py banner "... version 0.25.1" and core.py "Initializing a V1 LLM engine (v0.25.1)"
    assert f.vllm_version == "0.25.1"
    # core.py engine config: "model='/tmp/m3-tiny', ... dtype=torch.bfloat16, max_seq_len=2048, ...
    # tensor_parallel_size=1, ... quantization=fp8, ... enforce_eager=True, ... kv_cache_dtype=auto"
    assert (f.model, f.quantization, f.dtype, f.kv_cache_dtype) == ("/tmp/m3-tiny", "fp8", "bfloat16", "auto")
    assert (f.tensor_parallel_size, f.enforce_eager, f.enable_prefix_caching) == (1, True, True)
    # platforms/cuda.py "Using %s attention backend out of potential backends: %s"
    assert f.attention_backend == "TRITON_ATTN"
    # gpu_model_runner.py "Model loading took %s GiB memory and %.6f seconds"
    assert f.model_memory_gib == 0.05 and f.model_load_s == pytest.approx(2.418337)
    # default_loader.py "Loading weights took %.2f seconds"
    assert f.weights_load_s == 0.31
    # gpu_worker.py "Available KV cache memory: %s GiB"
    assert f.kv_cache_gib == 23.14
    # kv_cache_utils.py "GPU KV cache size: %s tokens" / "Maximum concurrency for %s tokens per request: %.2fx"
    assert f.kv_cache_tokens == 6_064_128 and f.max_concurrency == 2961.0 and f.max_model_len == 2048
    # core.py "init engine (profile, create kv cache, warmup model) took %.2f s (compilation: %.2f s)"
    assert (f.engine_init_s, f.compile_s) == (16.85, 0.0)
    # eager: no "Graph capturing finished" line, so no graph facts
    assert f.cuda_graph_s is None and f.cuda_graph_gib is None
    # first timestamp 10:00:01, last before uvicorn's "Application startup complete." 10:00:46
    assert f.startup_complete and f.startup_s == 45.0
    # loggers.py "Engine 000: ... GPU KV cache usage: %.1f%%" (1.6 % then 0.0 %)
    assert f.peak_kv_cache_usage_pct == 1.6
    assert f.errors == [] and f.estimated_max_model_len is None
    assert list(f.ranks) == ["EngineCore"] and f.ranks["EngineCore"].pid == 4190


def test_tensor_parallel_log_reports_each_rank_and_the_worst_per_gpu():
    f = parse_server_log(fixture("synthetic-serve-tp2.txt"))
    assert set(f.ranks) == {"Worker_TP0", "Worker_TP1", "EngineCore"}
    tp0, tp1 = f.ranks["Worker_TP0"], f.ranks["Worker_TP1"]
    # V2 model runner "Model loading took %s GiB and %.6f seconds", one line per worker
    assert (tp0.model_memory_gib, tp1.model_memory_gib) == (87.6, 87.58)
    assert f.model_memory_gib == 87.6  # what a GPU spends: the larger rank
    # "Available KV cache memory" per worker; vLLM sizes every pool to the smallest
    assert (tp0.kv_cache_gib, tp1.kv_cache_gib, f.kv_cache_gib) == (4.35, 4.31, 4.31)
    # mem_utils.py MemoryProfilingResult.__repr__ (DEBUG): "Total non KV cache memory: %sGiB; torch peak memory
    # increase: %sGiB; non-torch forward increase memory: %sGiB; weights memory: %sGiB."
    assert (tp0.non_kv_cache_gib, tp0.activation_peak_gib, tp0.non_torch_gib) == (89.93, 1.71, 0.62)
    # "Graph capturing finished in %.0f secs, took %.2f GiB"
    assert (tp0.cuda_graph_s, tp1.cuda_graph_gib, f.cuda_graph_s, f.cuda_graph_gib) == (12.0, 0.63, 13.0, 0.63)
    # the merged kv_cache_utils line "GPU KV cache size: %s tokens, Maximum concurrency for %s tokens per
    # request: %.2fx", logged by the engine core, not by a worker
    assert f.ranks["EngineCore"].kv_cache_tokens == 46_464 and f.kv_cache_tokens == 46_464
    assert f.max_concurrency == 1.13 and f.max_model_len == 40_960
    assert (f.tensor_parallel_size, f.quantization, f.enforce_eager) == (2, "autoround_mixed", False)
    assert (f.engine_init_s, f.compile_s) == (70.12, 46.30)
    assert f.startup_s == 238.0 and f.peak_kv_cache_usage_pct == 67.4


def test_facts_are_json_able_with_units_in_their_names():
    d = parse_server_log(fixture("synthetic-serve-tp2.txt")).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert {"model_memory_gib", "kv_cache_gib", "kv_cache_tokens", "cuda_graph_s", "startup_s"} <= set(d)
    assert d["ranks"]["Worker_TP1"]["model_memory_gib"] == 87.58


def test_kv_too_small_crash_names_the_value_error_and_the_length_that_fits():
    text = fixture("synthetic-crash-kv-too-small.txt")
    f = parse_server_log(text)
    assert not f.startup_complete and f.startup_s is None
    assert f.model_memory_gib == 58.71 and f.kv_cache_gib == 13.15 and f.kv_cache_tokens is None
    # kv_cache_utils._check_enough_kv_cache_memory: "... the estimated maximum model length is %d."
    assert f.estimated_max_model_len == 110_848
    first = decisive_lines(text, 1)
    assert len(first) == 1 and first[0].startswith("ValueError: To serve at least one request")
    # the same ValueError is printed twice (logger.exception and the raw traceback): reported once
    lines = decisive_lines(text)
    assert sum(line.startswith("ValueError:") for line in lines) == 1
    assert lines[-1].startswith("RuntimeError: Engine core initialization failed")  # the wrapper, last
    assert not any(line.lstrip().startswith(("File ", "raise ", "^")) for line in lines)  # no traceback frames
    assert f.errors == lines


def test_worker_oom_crash_puts_the_root_cause_before_the_wrappers():
    text = fixture("synthetic-crash-oom-tp2.txt")
    top2 = decisive_lines(text, 2)
    # the worker's "torch.OutOfMemoryError: CUDA out of memory. ..." is the only non-wrapper exception line
    assert top2[0].startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    # then the latest of the generic lines ("Worker failed ... please check the stack trace above",
    # "Engine core initialization failed. See root cause above.")
    assert top2[1].startswith("RuntimeError: Engine core initialization failed")
    f = parse_server_log(text)
    assert (f.ranks["Worker_TP0"].model_memory_gib, f.ranks["Worker_TP1"].model_memory_gib) == (76.92, 76.9)
    assert f.tensor_parallel_size == 2 and f.kv_cache_dtype == "fp8"


def test_decisive_lines_skip_warnings_and_keep_plain_exceptions():
    text = "\n".join([
        "(APIServer pid=1) WARNING 01-02 03:04:05 [config.py:1] a long max_model_len may run out of memory",
        "(EngineCore pid=2) INFO 01-02 03:04:06 [core.py:1] Waiting for (Worker_TP1 pid=3) to report",
        "(EngineCore pid=2) Exception: boom",
        "Killed",
    ])
    assert decisive_lines(text) == ["Exception: boom", "Killed"]
    assert parse_server_log(text).ranks == {}  # "(Worker_TP1 pid=3)" mid-message is not a prefix


@pytest.mark.parametrize("text", ["", "\n\n", "garbage\x00\x01 line\n(((pid=)))", "INFO 13-45 99:99:99 [x.py:1] hi"])
def test_odd_or_empty_logs_give_empty_facts(text):
    f = parse_server_log(text)
    assert f == VllmLogFacts() or (f.ranks == {} and f.model_memory_gib is None)
    assert decisive_lines(text) == []


def test_truncated_log_keeps_what_it_has():
    text = fixture("synthetic-serve-tp2.txt")
    cut = text[: text.index("Model loading took 87.58") + len("Model loading took 87.5")]  # mid-line, rank 1
    f = parse_server_log(cut)
    assert f.ranks["Worker_TP0"].model_memory_gib == 87.6
    assert f.ranks["Worker_TP1"].model_memory_gib is None  # its line was cut before "GiB"
    assert f.kv_cache_tokens is None and not f.startup_complete and f.startup_s is None
    assert f.max_model_len == 40960  # from the engine config line


def test_older_spellings_of_the_same_facts():
    # lines as vLLM 0.8-0.11 printed them (V0 worker.py profiling summary, "%.4f GiB and", the API server's
    # version line, the V1 FlashAttention notice, "took %.2f seconds" without the compilation part)
    text = "\n".join([
        "INFO 03-14 09:12:40 [api_server.py:1043] vLLM API server version 0.8.5",
        "INFO 03-14 09:12:41 [cuda.py:221] Using Flash Attention backend on V1 engine.",
        "INFO 03-14 09:12:55 [gpu_model_runner.py:1289] Model loading took 14.9888 GiB and 13.204526 seconds",
        "INFO 03-14 09:13:07 [worker.py:241] model weights take 14.99GiB; non_torch_memory takes 0.35GiB; "
        "PyTorch activation peak memory takes 1.24GiB; the rest of the memory reserved for KV Cache is 54.62GiB.",
        "INFO 03-14 09:13:08 [kv_cache_utils.py:566] GPU KV cache size: 447,088 tokens",
        "INFO 03-14 09:13:08 [kv_cache_utils.py:570] Maximum concurrency for 32,768 tokens per request: 13.64x",
        "INFO 03-14 09:13:20 [core.py:159] init engine (profile, create kv cache, warmup model) took 42.00 seconds",
    ])
    f = parse_server_log(text)
    assert f.vllm_version == "0.8.5" and f.attention_backend == "Flash Attention"
    assert f.model_memory_gib == 14.9888 and f.kv_cache_gib == 54.62
    assert (f.non_torch_gib, f.activation_peak_gib) == (0.35, 1.24)
    assert (f.kv_cache_tokens, f.max_concurrency, f.max_model_len) == (447_088, 13.64, 32_768)
    assert f.engine_init_s == 42.0 and f.compile_s is None
    assert list(f.ranks) == ["main"]  # no process prefixes at all


def test_vit_and_encoder_backend_lines_are_not_the_attention_backend():
    # platforms/cuda.py logs the vision tower's backend before the language model's (0.20 spelling)
    text = "\n".join([
        "(EngineCore pid=199) INFO 05-21 21:03:31 [cuda.py:423] "
        "Using backend AttentionBackendEnum.FLASH_ATTN for vit attention",
        "(EngineCore pid=199) INFO 05-21 21:03:31 [mm_encoder_attention.py:230] "
        "Using AttentionBackendEnum.FLASH_ATTN for MMEncoderAttention.",
        "(EngineCore pid=199) INFO 05-21 21:03:32 [cuda.py:308] Using AttentionBackendEnum.FLASHINFER backend.",
    ])
    assert parse_server_log(text).attention_backend == "FLASHINFER"


def test_ray_and_docker_prefixes_resolve_to_the_writing_process():
    text = "\n".join([
        "vllm-1  | (EngineCore pid=311) (RayWorkerWrapper pid=144, ip=172.18.0.2) INFO 03-19 19:10:01 "
        "[gpu_model_runner.py:2100] Model loading took 7.1 GiB memory and 20.000000 seconds",
        "vllm-1  | (EngineCore pid=311) (RayWorkerWrapper pid=145, ip=172.18.0.3) INFO 03-19 19:10:02 "
        "[gpu_model_runner.py:2100] Model loading took 7.3 GiB memory and 21.000000 seconds",
    ])
    f = parse_server_log(text)
    assert {k: r.model_memory_gib for k, r in f.ranks.items()} == {"RayWorkerWrapper": 7.1,
                                                                 "RayWorkerWrapper pid=145": 7.3}
    assert f.model_memory_gib == 7.3


def test_auto_fit_max_model_len_wins_over_the_requested_one():
    text = "\n".join([
        "(EngineCore pid=9) INFO 01-02 03:04:05 [core.py:109] Initializing a V1 LLM engine (v0.25.1) with config: "
        "model='m', max_seq_len=196608, tensor_parallel_size=1, quantization=None",
        "(EngineCore pid=9) INFO 01-02 03:04:50 [kv_cache_utils.py:1400] Auto-fit max_model_len: reduced from "
        "196608 to 61440 to fit in available GPU memory (11.5 GiB available for KV cache)",
    ])
    f = parse_server_log(text)
    assert f.max_model_len == 61_440 and f.quantization is None


# ---------------------------------------------------------------------------------------------------------------
# Prometheus
# ---------------------------------------------------------------------------------------------------------------

def test_prometheus_families_types_and_labels():
    m = parse_prometheus(fixture("synthetic-metrics-after.txt"))
    # prometheus_client writes Counter("vllm:prompt_tokens") as "# TYPE vllm:prompt_tokens_total counter"
    assert m["vllm:prompt_tokens_total"]["type"] == "counter"
    assert m["vllm:prompt_tokens_total"]["samples"] == [
        {"name": "vllm:prompt_tokens_total", "labels": {"engine": "0", "model_name": "m3"}, "value": 4098.0}]
    assert m["vllm:prompt_tokens_created"]["type"] == "gauge"  # its own family, kept out of the counter
    ttft = m["vllm:time_to_first_token_seconds"]
    assert ttft["type"] == "histogram" and ttft["help"] == "Histogram of time to first token in seconds."
    buckets = [s for s in ttft["samples"] if s["name"].endswith("_bucket")]
    assert len(buckets) == 23 and buckets[-1]["labels"]["le"] == "+Inf" and buckets[-1]["value"] == 9.0
    assert m["vllm:kv_cache_usage_perc"]["type"] == "gauge"
    info = m["vllm:cache_config_info"]["samples"][0]["labels"]
    assert info["kv_cache_size_tokens"] == "46464" and info["num_gpu_blocks"] == "363"


def test_prometheus_escapes_untyped_and_malformed_lines():
    m = parse_prometheus('\n'.join([
        '# a comment that is neither HELP nor TYPE',
        'x_total{path="/v1/\\"q\\"",msg="a\\\\b\\nc"} 3',
        'lat_bucket{le="0.5"} 1', 'lat_bucket{le="+Inf"} 2', 'lat_sum 0.9', 'lat_count 2',
        'broken{le="1" 5', 'noval{a="b"}', 'nan_gauge NaN', 'ts_gauge 4 1700000000000',
        '# EOF',
    ]))
    assert m["x_total"]["type"] == "counter"
    assert m["x_total"]["samples"][0]["labels"] == {"path": '/v1/"q"', "msg": "a\\b\nc"}
    assert m["lat"]["type"] == "histogram" and len(m["lat"]["samples"]) == 4
    assert "broken" not in m and "noval" not in m
    assert math.isnan(m["nan_gauge"]["samples"][0]["value"])
    assert m["ts_gauge"]["samples"][0]["value"] == 4.0  # the optional timestamp is not the value
    assert parse_prometheus("") == {} and parse_prometheus("<html>not metrics</html>") == {}


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 2.0), (0.2, 6.0), (0.5, 8.0), (math.inf, 10.0)]
    assert histogram_quantile(buckets, 0.1) == pytest.approx(0.05)  # rank 1 in [0, 0.1] holding 2
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.175)  # rank 5: 0.1 + 0.1 * 3/4
    assert histogram_quantile(buckets, 0.8) == pytest.approx(0.5)  # rank 8: top of (0.2, 0.5]
    assert histogram_quantile(buckets, 0.99) == 0.5  # in +Inf: the highest finite bound
    assert histogram_quantile([(0.1, 0.0), (math.inf, 0.0)], 0.5) is None  # no observations
    assert histogram_quantile([], 0.5) is None


def test_summary_of_one_scrape():
    s = summarize_metrics(parse_prometheus(fixture("synthetic-metrics-after.txt")))
    # counters summed over engines; vllm:request_success has one series per finished_reason
    assert (s["prompt_tokens"], s["generation_tokens"], s["num_requests_success"]) == (4098.0, 2052.0, 9.0)
    assert s["prefix_cache_hit_rate"] == pytest.approx(2048 / 4098, abs=1e-6)
    assert s["kv_cache_usage_pct"] == 0.0 and s["num_requests_running"] == 0.0
    assert (s["kv_cache_tokens"], s["num_gpu_blocks"], s["block_size"]) == (46_464, 363, 128)
    # 9 TTFT observations: 0.35 s (the smoke request) and eight in (0.4, 0.9)
    assert s["ttft_count"] == 9 and 400 < s["mean_ttft_ms"] < 900
    assert 500 <= s["median_ttft_ms"] <= 1000 and s["p99_ttft_ms"] <= 1000
    assert s["itl_count"] == 3 + 8 * 255 and s["mean_itl_ms"] == pytest.approx(77.0, abs=1.5)
    assert s["tpot_count"] == 9 and s["e2el_count"] == 9 and s["queue_time_count"] == 9


def test_delta_isolates_a_benchmark_level():
    before = parse_prometheus(fixture("synthetic-metrics-before.txt"))
    after = parse_prometheus(fixture("synthetic-metrics-after.txt"))
    s = summarize_metrics(metrics_delta(before, after))
    # the level: 8 requests of 512 prompt / 256 generated tokens; the smoke request (2 / 4) is gone
    assert (s["num_requests_success"], s["prompt_tokens"], s["generation_tokens"]) == (8.0, 4096.0, 2048.0)
    assert s["ttft_count"] == 8 and s["itl_count"] == 8 * 255 and s["e2el_count"] == 8
    assert s["prefix_cache_hit_rate"] == 0.5
    assert s["kv_cache_usage_pct"] == 0.0  # gauges are after's


def test_delta_of_a_restarted_server_keeps_the_new_counts():
    before = parse_prometheus('# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{engine="0"} 900')
    after = parse_prometheus('# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{engine="0"} 40')
    assert summarize_metrics(metrics_delta(before, after))["prompt_tokens"] == 40.0


def test_summary_reads_the_older_metric_names():
    # vLLM 0.8-0.10: vllm:gpu_cache_usage_perc, vllm:gpu_prefix_cache_*_total, vllm:time_per_output_token_seconds
    # (renamed vllm:inter_token_latency_seconds in 0.11); no TYPE lines in this excerpt
    s = summarize_metrics(parse_prometheus("\n".join([
        'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.25',
        'vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 10.0',
        'vllm:gpu_prefix_cache_hits_total{engine="0",model_name="m"} 4.0',
        'vllm:time_per_output_token_seconds_bucket{engine="0",le="0.05",model_name="m"} 3.0',
        'vllm:time_per_output_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 4.0',
        'vllm:time_per_output_token_seconds_sum{engine="0",model_name="m"} 0.2',
        'vllm:time_per_output_token_seconds_count{engine="0",model_name="m"} 4.0',
    ])))
    assert s["kv_cache_usage_pct"] == 25.0 and s["prefix_cache_hit_rate"] == 0.4
    assert s["itl_count"] == 4 and s["mean_itl_ms"] == 50.0
    assert s["ttft_count"] is None and s["mean_ttft_ms"] is None and s["kv_cache_tokens"] is None


def test_summary_of_nothing_is_all_none():
    s = summarize_metrics({})
    assert s and all(v is None for v in s.values())


# ---------------------------------------------------------------------------------------------------------------
# Scraping
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def metrics_endpoint():
    """The synthetic /metrics text over real HTTP (vLLM itself cannot run here): tests the URL handling."""
    body = fixture("synthetic-metrics-after.txt").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/metrics"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.end_headers()
            self.wfile.write(body if ok else b"not found")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_scrape_takes_the_api_base_or_the_root(metrics_endpoint, suffix):
    m = scrape_metrics(metrics_endpoint + suffix, timeout=5)
    assert summarize_metrics(m)["prompt_tokens"] == 4098.0


def test_scrape_of_a_closed_port_is_metrics_unavailable(metrics_endpoint):
    with pytest.raises(MetricsUnavailable, match="could not be read"):
        scrape_metrics("http://127.0.0.1:9/v1", timeout=2)


def test_transformers_serve_has_no_metrics(start_tiny_server):
    rec = start_tiny_server()
    with pytest.raises(MetricsUnavailable, match="HTTP 404"):
        scrape_metrics(rec.base_url, timeout=10)
    assert asdict(rec)["base_url"].endswith("/v1")
