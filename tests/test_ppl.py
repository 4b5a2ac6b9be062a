"""Perplexity through prompt_logprobs: the math, the windows, vLLM's response shape, and an engine without it.

vLLM cannot run here. Its answer is a recorded-shape fixture (tests/fixtures/vllm/
synthetic-completions-prompt-logprobs.json, written from vLLM's CompletionResponse protocol), and the
end-to-end windowing test talks to a small stand-in that answers in that same shape. The engine that does exist
here, transformers serve, is started for real to check PPLNotSupported."""

from __future__ import annotations

import http.server
import itertools
import json
import math
import re
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

from m3lab.evals.ppl import (PPLConfig, PPLNotSupported, PPLResponseError, Window, corpus_perplexity,
                       detokenize_wikitext, perplexity, plan_windows, read_wikitext, server_perplexity,
                       token_logprobs, tokenize)

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"


# ---------------------------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------------------------

def test_perplexity_is_exp_of_the_mean_negative_logprob():
    assert perplexity([-1.0, -2.0, -3.0]) == pytest.approx(math.e ** 2)
    assert perplexity([math.log(1 / 50)] * 10) == pytest.approx(50.0)  # uniform over 50 tokens → PPL 50
    assert perplexity([0.0]) == 1.0  # certain
    with pytest.raises(ValueError):
        perplexity([])


def scored_positions(windows: list[Window]) -> list[int]:
    return [i for w in windows for i in range(w.score_from, w.end)]


@pytest.mark.parametrize("n,window,stride", [
    (1000, 128, None), (1000, 128, 1), (1000, 128, 64), (1000, 128, 127), (129, 128, None), (128, 128, None),
    (50, 128, None), (2, 2, None), (2, 2, 1), (997, 10, 3),
])
def test_windows_score_every_token_after_the_first_exactly_once(n, window, stride):
    windows = plan_windows(n, window, stride)
    assert scored_positions(windows) == list(range(1, n))  # each once, in order, token 0 never
    for w in windows:
        assert w.token_count <= window
        assert w.start < w.score_from < w.end  # at least one token of context inside the request
    step = window - 1 if stride is None else stride
    assert [w.start for w in windows] == [k * step for k in range(len(windows))]


def test_stride_equal_to_the_window_is_refused():
    with pytest.raises(ValueError, match="ppl.stride"):
        plan_windows(1000, 128, 128)
    with pytest.raises(ValueError, match="ppl.window_tokens"):
        plan_windows(1000, 1)


def test_max_windows_bounds_the_cost():
    windows = plan_windows(10_000, 100, None, max_windows=3)
    assert len(windows) == 3 and windows[-1].end == 2 * 99 + 100
    assert scored_positions(windows) == list(range(1, windows[-1].end))
    assert plan_windows(1, 100) == [] and plan_windows(0, 100) == []


# ---------------------------------------------------------------------------------------------------------------
# vLLM's response shape
# ---------------------------------------------------------------------------------------------------------------

def recorded() -> tuple[list[int], dict]:
    data = json.loads((FIXTURES / "synthetic-completions-prompt-logprobs.json").read_text())
    return data["request"]["prompt"], data["response"]


def test_response_parsing_on_the_recorded_shape():
    ids, response = recorded()
    logprobs = token_logprobs(response["choices"][0]["prompt_logprobs"], ids)
    assert logprobs[0] is None and len(logprobs) == len(ids) == response["usage"]["prompt_tokens"]
    assert logprobs[1:] == pytest.approx([-7.812511444091797, -5.062503814697266, -6.937507629394531,
                                          -1.3203125, -0.0625])
    assert perplexity(logprobs[1:]) == pytest.approx(math.exp(21.195335388183594 / 5))


def test_parsing_finds_the_prompt_token_among_top_k_alternatives():
    # prompt_logprobs=2: each dict also holds the two likeliest tokens; the prompt token is looked up by id
    entries = [None, {"7": {"logprob": -0.1, "rank": 1}, "42": {"logprob": -3.0, "rank": 9},
                      "8": {"logprob": -2.5, "rank": 2}},
               {9: {"logprob": -0.5, "rank": 1}, 11: {"logprob": -1.5, "rank": 2}}]  # int keys (in-process)
    assert token_logprobs(entries, [5, 42, 11]) == [None, -3.0, -1.5]


@pytest.mark.parametrize("entries,ids,match", [
    ([None, {"5": {"logprob": -1.0}}], [1, 5, 6], "2 entries for 3 prompt tokens"),
    ([None, {"6": {"logprob": -1.0}}], [1, 5], "no entry for the prompt token 5"),
    ([None, None], [1, 5], r"prompt_logprobs\[1\] is null"),
    ([None, {"5": {"rank": 1}}], [1, 5], "no numeric logprob"),
    ({"0": None}, [1], "not a list"),
])
def test_parsing_rejects_shapes_it_cannot_trust(entries, ids, match):
    with pytest.raises(PPLResponseError, match=match):
        token_logprobs(entries, ids)


# ---------------------------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def wikitext_slice(tmp_path) -> Path:
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} is not present")
    lines = WIKITEXT.read_text(encoding="utf-8").splitlines(keepends=True)[:40]
    dst = tmp_path / "wikitext-2" / "test.txt"
    dst.parent.mkdir()
    dst.write_text("".join(lines), encoding="utf-8")
    return dst


def test_wikitext_is_read_as_the_file_has_it(wikitext_slice):
    text = read_wikitext(wikitext_slice)
    assert "<unk>" in text and " @-@ " in text and text.startswith(" \n = Robert <unk> = \n")
    assert read_wikitext(wikitext_slice, max_chars=100) == text[:100]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_wikitext(wikitext_slice.parent / "missing.txt")


def test_detokenize_undoes_the_spacing_markers():
    assert detokenize_wikitext(" a guest @-@ starring role , in 1 @,@ 000 ( or 2 @.@ 5 ) . \n") == \
        "a guest-starring role, in 1,000 (or 2.5).\n"
    assert detokenize_wikitext("Teddy 's Story") == "Teddy's Story"


# ---------------------------------------------------------------------------------------------------------------
# A server that answers like vLLM: windows end to end
# ---------------------------------------------------------------------------------------------------------------

def bigram_logprob(prev: int, token: int) -> float:
    """The stand-in's "model": a logprob that depends on the token and its predecessor only, so a correctly
    windowed PPL equals the same formula applied to the whole corpus, whatever the stride."""
    return -0.1 - ((prev * 31 + token * 17) % 23) / 5.0


@pytest.fixture
def vllm_shaped_server():
    """Answers POST /v1/completions with vLLM's prompt_logprobs shape (the recorded fixture's layout)."""
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            ids = body["prompt"]
            entries = [None] + [{str(t): {"logprob": bigram_logprob(p, t), "rank": 1, "decoded_token": f"<{t}>"}}
                                for p, t in itertools.pairwise(ids)]
            out = {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length",
                                "stop_reason": None, "token_ids": None, "prompt_logprobs": entries,
                                "prompt_token_ids": None}],
                   "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids) + 1, "completion_tokens": 1}}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"base_url": f"http://127.0.0.1:{server.server_address[1]}/v1", "model": "m3", "engine": "vllm"}, seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("stride", [None, 1, 5, 16])
def test_server_perplexity_scores_each_token_once_with_its_context(vllm_shaped_server, stride):
    server, seen = vllm_shaped_server
    ids = [(i * 7919) % 1000 for i in range(203)]
    expected = math.exp(-sum(bigram_logprob(p, t) for p, t in itertools.pairwise(ids)) / (len(ids) - 1))
    result = server_perplexity(server, ids, window_tokens=17, stride=stride, concurrency=3)
    assert result.ppl == pytest.approx(expected, rel=1e-12)
    assert result.scored_tokens == len(ids) - 1 and result.corpus_tokens == len(ids) and not result.truncated
    assert result.windows == len(plan_windows(len(ids), 17, stride))
    assert result.stride == (16 if stride is None else stride) and result.clamped_tokens == 0
    probe, *windows = seen
    assert len(windows) == result.windows and len(probe["prompt"]) == 8
    assert all(b["prompt_logprobs"] == 0 and b["max_tokens"] == 1 and isinstance(b["prompt"], list)
               for b in seen)  # token-id prompts, only the prompt token's logprob
    assert json.loads(json.dumps(result.to_dict())) == asdict(result)


def test_max_windows_gives_a_truncated_result(vllm_shaped_server):
    server, _ = vllm_shaped_server
    ids = list(range(100, 400))
    result = server_perplexity(server, ids, window_tokens=32, max_windows=2, concurrency=1)
    assert result.truncated and result.windows == 2 and result.scored_tokens == 31 + 31


def test_corpus_perplexity_tokenizes_with_the_checkpoint_tokenizer(vllm_shaped_server, wikitext_slice,
                                                                  tiny_text_checkpoint):
    server, seen = vllm_shaped_server
    ids = tokenize(read_wikitext(wikitext_slice), str(tiny_text_checkpoint))
    result = corpus_perplexity(server, wikitext_slice, str(tiny_text_checkpoint),
                               PPLConfig(window_tokens=256, max_windows=4))
    assert result.corpus_tokens == len(ids) > 4 * 255 and result.windows == 4
    assert ids[:256] in [b["prompt"] for b in seen]  # one window is the corpus' first 256 tokens (sent in parallel)


# ---------------------------------------------------------------------------------------------------------------
# An engine without prompt_logprobs
# ---------------------------------------------------------------------------------------------------------------

def test_transformers_serve_is_not_supported(start_tiny_server, tiny_text_checkpoint, wikitext_slice):
    # transformers serve (5.x) validates the request body and answers 422 "Unexpected fields in the request:
    # {'prompt_logprobs'}"; an engine that dropped the field silently would fail the same way (no
    # prompt_logprobs in the answer). Either way: one small probe, then PPLNotSupported.
    rec = start_tiny_server()
    with pytest.raises(PPLNotSupported, match="prompt_logprobs") as raised:
        corpus_perplexity(asdict(rec), wikitext_slice, str(tiny_text_checkpoint), PPLConfig(window_tokens=64))
    assert "transformers engine" in str(raised.value)


@pytest.mark.parametrize("spec,match", [
    ("hf:wikitext/wikitext-2-raw-v1/test",
     r"wikitext \(wikitext-2-raw-v1, test split\) is not in the local HF datasets cache.*load_dataset\('wikitext', "
     r"'wikitext-2-raw-v1', split='test'\)"),
    ("hf:wikitext", r"write hf:<dataset>/<config>/<split>"),
])
def test_a_dataset_missing_from_the_local_cache_is_not_run_with_how_to_get_it(spec, match, tmp_path, monkeypatch):
    from m3lab.evals import ppl

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache, offline: nothing may be fetched
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = ppl.run({"id": "wikitext2_ppl", "runner": "prompt_logprobs_ppl", "seeds": [],
                   "args": {"--data": spec, "--window-tokens": 64}},
                  {"base_url": "http://127.0.0.1:9/v1", "model": "m3", "model_dir": str(tmp_path)})
    assert rec["status"] == "not run" and "score" not in rec
    assert re.search(match, rec["reason"]), rec["reason"]
