"""m3lab's reference server (m3lab.refserver), started for real through `m3lab.serve.start_server("reference")`
on the tiny trained M3, checked against offline transformers on the same checkpoint: greedy tokens, prompt
logprobs and perplexity, streaming, vLLM's error answers (a NaN logprob among them), and m3lab's own clients
(m3lab.evals.ppl, m3lab.benchmark) working against it unchanged.

Two servers per module, started side by side: the trained checkpoint, and a copy with NaN in one layer."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
import torch

from m3lab import serve, transport
from m3lab.benchmark import SSEDecoder, Target, parse_completion_event, run_sweep
from m3lab.checkpoint import read_tensors, text_only, write_tensors
from m3lab.evals.ppl import perplexity, plan_windows, server_perplexity
from m3lab.needle import filler_text
from m3lab.params import Benchmark, Serve
from m3lab.registry import ENGINES
from m3lab.stage import read_json

from conftest import CPU_SERVE

REF_SERVE = {**CPU_SERVE, "engine": "reference"}  # CPU_SERVE's `--device cpu` and OMP_NUM_THREADS=1 carry over
NAN_KEY = "model.layers.1.self_attn.o_proj.weight"
GREEDY_PROMPTS = ["The pass key is", "Remember it.", "Hello"]  # "Hello" ends at EOS within 40 tokens


@pytest.fixture(scope="module")
def text_ckpt(trained_checkpoint, tmp_path_factory) -> Path:
    return text_only(trained_checkpoint, tmp_path_factory.mktemp("ref") / "x.text-transformers", flavor="transformers")


@pytest.fixture(scope="module")
def nan_ckpt(text_ckpt) -> Path:
    """A copy whose layer-1 attention output projection is all NaN (the planted-fault way: read, edit, write)."""
    dst = text_ckpt.with_name("x.text-transformers.nan")
    shutil.copytree(text_ckpt, dst)
    shard = dst / "model.safetensors"
    tensors = dict(read_tensors(shard))
    tensors[NAN_KEY] = torch.full_like(tensors[NAN_KEY], float("nan"))
    write_tensors(tensors, shard)
    return dst


@pytest.fixture(scope="module")
def servers(text_ckpt, nan_ckpt, tmp_path_factory):
    """{"ok": ServerRecord, "nan": ServerRecord}: both started at once (each load is mostly one core's imports)."""
    run_dir = tmp_path_factory.mktemp("ref-run")
    jobs = {"ok": text_ckpt, "nan": nan_ckpt}
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(serve.start_server, "reference", str(d), REF_SERVE, run_dir, name=k)
                   for k, d in jobs.items()}
        try:
            import transformers.models.auto  # noqa: F401 - this process's own import, while the servers load
            recs = {k: f.result() for k, f in futures.items()}
        except BaseException:
            for f in futures.values():
                if f.exception() is None:
                    serve.stop_server(asdict(f.result()), grace_s=5)
            raise
    yield recs
    for rec in (run_dir / "servers").glob("*.json"):
        if not rec.name.endswith(".stopped.json"):
            serve.stop_server(read_json(rec), grace_s=5)


@pytest.fixture(scope="module")
def server(servers) -> dict:
    return asdict(servers["ok"])


@pytest.fixture(scope="module")
def offline(text_ckpt):
    """The same checkpoint in this process, on one thread (the 2 cores are shared with the servers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield (AutoModelForCausalLM.from_pretrained(str(text_ckpt)).eval(),
           AutoTokenizer.from_pretrained(str(text_ckpt)))
    torch.set_num_threads(threads)


def post(server: dict, body: dict) -> tuple[int, dict]:
    return transport.post_json(f"{server['base_url']}/completions", {"model": server["model"], **body}, 120)


def ok(server: dict, body: dict) -> dict:
    status, answer = post(server, body)
    assert status == 200, answer
    return answer


def log_line(rec: serve.ServerRecord, pattern: str, wait_s: float = 10.0) -> str:
    """The server's log line matching `pattern` (written just after the answer goes out, so wait a moment)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = re.search(pattern, Path(rec.log_path).read_text())
        if found or time.monotonic() > deadline:
            assert found, f"no log line matches {pattern!r} in {rec.log_path}"
            return found.group(0)
        time.sleep(0.05)


def stream(server: dict, body: dict) -> list[dict | str]:
    """The SSE payloads of one streamed completion, parsed (the [DONE] marker kept as the string)."""
    dec = SSEDecoder()
    payloads: list[str] = []
    with httpx.Client(trust_env=False, timeout=120) as c:
        with c.stream("POST", f"{server['base_url']}/completions",
                      json={"model": server["model"], "stream": True, **body}) as r:
            assert r.status_code == 200, r.read()
            for chunk in r.iter_raw():
                payloads += dec.feed(chunk)
    return [p if p == "[DONE]" else json.loads(p) for p in payloads + dec.flush()]


# ---------------------------------------------------------------------------------------------------------------
# Against offline transformers
# ---------------------------------------------------------------------------------------------------------------

def test_greedy_continuation_is_generates_token_for_token(server, offline):
    model, tok = offline
    finish_reasons = set()
    for prompt in GREEDY_PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            want = model.generate(ids, do_sample=False, max_new_tokens=40)[0, ids.shape[1]:].tolist()
        got = ok(server, {"prompt": prompt, "max_tokens": 40, "temperature": 0, "return_token_ids": True})
        choice = got["choices"][0]
        assert choice["prompt_token_ids"] == ids[0].tolist()
        assert choice["token_ids"] == want, prompt
        ended = want[-1] == tok.eos_token_id
        assert choice["finish_reason"] == ("stop" if ended else "length")
        finish_reasons.add(choice["finish_reason"])
        assert choice["text"] == tok.decode(want[:-1] if ended else want, skip_special_tokens=True)
        assert got["usage"] == {"prompt_tokens": ids.shape[1], "completion_tokens": len(want),
                                "total_tokens": ids.shape[1] + len(want), "prompt_tokens_details": None}
    assert finish_reasons == {"stop", "length"}  # one of them really does end at EOS


def test_prompt_logprobs_are_offline_log_softmax_and_perplexity_matches(server, offline):
    model, tok = offline
    ids = tok(filler_text(30, seed=3), add_special_tokens=False)["input_ids"][:150]
    with torch.inference_mode():
        lp = model(torch.tensor([ids[:64]])).logits[0].float().log_softmax(-1)
    got = ok(server, {"prompt": ids[:64], "max_tokens": 1, "prompt_logprobs": 2})["choices"][0]["prompt_logprobs"]
    assert len(got) == 64 and got[0] is None
    for pos in range(1, 64):
        row, token = lp[pos - 1], ids[pos]
        entry = got[pos]
        assert abs(entry[str(token)]["logprob"] - row[token].item()) < 1e-4, pos
        assert entry[str(token)]["rank"] == int((row > row[token]).sum()) + 1
        assert entry[str(token)]["decoded_token"] == tok.decode([token])
        top = row.topk(2).indices.tolist()
        assert all(str(t) in entry for t in top) and set(entry) <= {str(token), *map(str, top)}
        assert all(entry[str(t)]["rank"] == r + 1 for r, t in enumerate(top))

    # card 002's method through m3lab.evals.ppl, unchanged: windows of 48 with one token of carried context
    result = server_perplexity(server, ids, window_tokens=48, concurrency=2)
    scored: list[float] = []
    for w in plan_windows(len(ids), 48):
        with torch.inference_mode():
            wl = model(torch.tensor([ids[w.start:w.end]])).logits[0].float().log_softmax(-1)
        scored += [wl[i - w.start - 1, ids[i]].item() for i in range(w.score_from, w.end)]
    assert result.scored_tokens == len(ids) - 1 == len(scored) and result.windows == 4
    assert result.ppl == pytest.approx(perplexity(scored), rel=1e-4)


def test_logprobs_of_generated_tokens(server, offline):
    model, tok = offline
    ids = tok("The pass key is")["input_ids"]
    got = ok(server, {"prompt": ids, "max_tokens": 3, "logprobs": 2, "return_token_ids": True})["choices"][0]
    new = got["token_ids"]
    with torch.inference_mode():  # the same path: prefill, then one cached step per token (raw logits)
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=3, output_logits=True,
                             return_dict_in_generate=True)
    assert out.sequences[0, len(ids):].tolist() == new
    want = [step[0].float().log_softmax(-1)[t].item() for step, t in zip(out.logits, new)]
    assert got["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-4)
    assert got["logprobs"]["tokens"] == [tok.decode([t]) for t in new]
    assert all(len(top) >= 2 for top in got["logprobs"]["top_logprobs"])
    offsets = got["logprobs"]["text_offset"]
    assert offsets[0] == 0 and offsets[1] == len(got["logprobs"]["tokens"][0])


# ---------------------------------------------------------------------------------------------------------------
# Streaming, lengths, sampling
# ---------------------------------------------------------------------------------------------------------------

def test_stream_yields_the_same_text_one_chunk_per_token_and_a_usage_chunk(server):
    for body in ({"prompt": "The pass key is", "max_tokens": 20},
                 {"prompt": "The pass key is", "max_tokens": 20, "stop": [" Remember"]}):
        plain = ok(server, body)
        events = stream(server, {**body, "stream_options": {"include_usage": True}})
        assert events[-1] == "[DONE]"
        *token_chunks, usage_chunk, _ = events
        assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]
        assert len(token_chunks) == plain["usage"]["completion_tokens"]
        assert "".join(c["choices"][0]["text"] for c in token_chunks) == plain["choices"][0]["text"]
        assert [c["choices"][0]["finish_reason"] for c in token_chunks][-1] == plain["choices"][0]["finish_reason"]
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["choices"][0]["stop_reason"] == " Remember"
    assert " Remember" not in plain["choices"][0]["text"]  # stop strings are cut, as vLLM does
    assert "usage" not in stream(server, {"prompt": "Hi", "max_tokens": 2})[-2]  # only when asked


def test_ignore_eos_and_min_tokens_give_exactly_the_length_asked(server):
    prompt = "The grass is green."  # the tiny model answers EOS at once
    first = ok(server, {"prompt": prompt, "max_tokens": 8})
    assert first["usage"]["completion_tokens"] == 1 and first["choices"][0]["finish_reason"] == "stop"
    forced = ENGINES.load("reference").force_output_len({"prompt": prompt, "max_tokens": 2}, 8)
    got = ok(server, forced)
    assert got["usage"]["completion_tokens"] == 8 and got["choices"][0]["finish_reason"] == "length"
    got = ok(server, {"prompt": prompt, "max_tokens": 8, "min_tokens": 5, "return_token_ids": True})
    assert len(got["choices"][0]["token_ids"]) >= 5 and 2 not in got["choices"][0]["token_ids"][:5]


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(server):
    body = {"prompt": "Remember it.", "max_tokens": 12, "temperature": 1.5, "top_p": 0.95, "top_k": 50,
            "seed": 7, "ignore_eos": True, "return_token_ids": True}
    a, b = (ok(server, body)["choices"][0]["token_ids"] for _ in range(2))
    others = [ok(server, {**body, "seed": s})["choices"][0]["token_ids"] for s in (8, 9)]
    assert a == b and any(o != a for o in others)


def test_health_and_models_answer_while_a_request_generates(servers, server):
    rec = servers["ok"]
    first_chunk = threading.Event()
    events: list = []

    def long_stream() -> None:  # 150 tokens: over a second of decoding after its first chunk
        dec = SSEDecoder()
        with httpx.Client(trust_env=False, timeout=120) as c, c.stream("POST", f"{rec.base_url}/completions", json={
                "model": "m3", "prompt": "The", "max_tokens": 150, "ignore_eos": True, "stream": True}) as r:
            for chunk in r.iter_raw():
                events.extend(dec.feed(chunk))
                first_chunk.set()

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        assert first_chunk.wait(60)
        t0 = time.monotonic()
        assert transport.get_text(f"http://{rec.host}:{rec.port}/health", 5)[0] == 200
        status, text = transport.get_text(f"{rec.base_url}/models", 5)
        assert time.monotonic() - t0 < 1 and t.is_alive()  # answered mid-generation, not after it
    finally:
        t.join()
    assert events[-1] == "[DONE]" and len(events) == 151
    models = json.loads(text)
    assert status == 200 and models["object"] == "list" and models["data"][0]["id"] == "m3"
    assert models["data"][0]["object"] == "model"
    facts = ENGINES.load("reference").startup_facts(Path(rec.log_path).read_text())
    assert facts["port"] == rec.port and facts["dtype"] == "bfloat16" and facts["max_model_len"] == 4096
    assert facts["served_model_name"] == "m3" and facts["threads"] == 1  # OMP_NUM_THREADS=1 from CPU_SERVE
    log_line(rec, r"POST /v1/completions 200 prompt_tokens=\d+ completion_tokens=150 seconds=[\d.]+ stream=True")


# ---------------------------------------------------------------------------------------------------------------
# NaN, as vLLM 0.25.1 answers it
# ---------------------------------------------------------------------------------------------------------------

def test_nan_logprobs_are_vllms_400_and_greedy_over_nan_picks_token_0(servers):
    nan = asdict(servers["nan"])
    for body in ({"prompt": [5, 6, 7, 8], "max_tokens": 1, "prompt_logprobs": 0},
                 {"prompt": "Hello", "max_tokens": 2, "logprobs": 0},
                 {"prompt": "Hello", "max_tokens": 2, "prompt_logprobs": 0, "stream": True}):
        status, answer = post(nan, body)
        assert status == 400, body
        assert "Out of range float values are not JSON compliant: nan" in answer["error"]["message"]
        assert answer["error"]["type"] == "BadRequestError" and answer["error"]["code"] == 400
    got = ok(nan, {"prompt": "Hello", "max_tokens": 6, "return_token_ids": True})["choices"][0]
    assert got["token_ids"] == [0] * 6 and got["finish_reason"] == "length"


# ---------------------------------------------------------------------------------------------------------------
# Bad requests
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, named", [
    ({"model": "other", "prompt": "Hi"}, 404, "`other` does not exist"),
    ({"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": [1, 2, 99999]}, 400, "prompt"),
    ({"prompt": [7] * 4090, "max_tokens": 16}, 400, "max_tokens (16)"),
    ({"prompt": [7] * 4097, "max_tokens": 1}, 400, "prompt (4097 tokens)"),
    ({"prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "Hi", "logprobs": -1}, 400, "logprobs"),
    ({"prompt": "Hi", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ({"prompt": "Hi", "echo": True}, 400, "echo"),
    ({"prompt": "Hi", "n": 2}, 400, "n"),
    ({"prompt": "Hi", "stop": [1]}, 400, "stop"),
    ({"prompt": "Hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
])
def test_bad_requests_are_openai_errors_naming_the_field(server, body, status, named):
    got_status, answer = transport.post_json(f"{server['base_url']}/completions", {"model": "m3", **body}, 60)
    assert got_status == status and named in answer["error"]["message"], answer
    assert answer["error"]["code"] == status


def test_malformed_json_unknown_fields_and_the_model_dir_as_name(server, servers):
    url = f"{server['base_url']}/completions"
    r = httpx.post(url, content=b'{"model": "m3", "prompt": "Hi"', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    got = ok(server, {"prompt": "Hi", "max_tokens": 2, "frobnicate": {"x": 1}, "user": "u"})
    assert got["usage"]["completion_tokens"] == 2  # unknown fields are accepted and ignored
    log_line(servers["ok"], r"completion_tokens=2 .* ignored=frobnicate")
    status, _ = transport.post_json(url, {"model": servers["ok"].model_dir, "prompt": "Hi", "max_tokens": 1}, 60)
    assert status == 200


def test_a_nonlocal_host_needs_the_opt_in(text_ckpt):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "m3lab.refserver", str(text_ckpt), "--host", "0.0.0.0", "--port",
                        "1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--allow-nonlocal-host" in p.stderr and "0.0.0.0" in p.stderr
    assert time.monotonic() - t0 < 20  # refused before the model loads
    argv = serve.build_command("reference", "/m", {**REF_SERVE, "host": "0.0.0.0", "allow_nonlocal_host": True}, 1)
    assert "--allow-nonlocal-host" in argv
    assert "--allow-nonlocal-host" not in serve.build_command("reference", "/m", REF_SERVE, 1)


def test_the_engine_is_registered_and_validated_like_the_others():
    assert Serve(engine="reference").engine == "reference"
    assert serve.check_engine("reference", None)  # its PACKAGE is transformers
    argv = serve.build_command("reference", "/m", REF_SERVE, 8123)
    assert argv[:7] == ["python", "-m", "m3lab.refserver", "/m", "--host", "127.0.0.1", "--port"]
    assert argv[-4:] == ["--served-model-name", "m3", "--device", "cpu"]


# ---------------------------------------------------------------------------------------------------------------
# m3lab's benchmark client
# ---------------------------------------------------------------------------------------------------------------

def test_the_benchmark_client_runs_against_it(server, offline, text_ckpt):
    _, tok = offline
    target = Target(base_url=server["base_url"], model=server["model"], tokenizer_dir=str(text_ckpt),
                    engine="reference")
    load = Benchmark(concurrency=[1, 2], num_prompts=2, input_len=16, output_len=6, warmup_factor=0,
                     total_timeout_s=60)
    res = run_sweep(target, load, tokenizer=tok)
    assert res.output_len_forced and not res.timed_out
    for level in res.levels:
        assert (level.metrics.completed, level.metrics.failed) == (2, 0)
        for r in level.records:
            assert r.success and r.output_tokens_source == "usage" and r.output_tokens == 6
            assert r.finish_reason == "length" and r.prompt_len == 16
            assert len(r.chunk_s) == 6  # one SSE event per token
            assert r.generated_text
