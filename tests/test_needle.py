"""m3lab.needle: token-exact prompts, needle depth, determinism, scoring, grid planning/validation, and a run
against a scripted in-process completions server."""

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import filler_tokenizer

from m3lab.params import Needle
from m3lab.needle import (
    QUESTION,
    Haystack,
    NeedleTarget,
    NeedleError,
    build_prompt,
    filler_sentences,
    filler_text,
    first_number,
    make_key,
    make_needle,
    max_context_from_config,
    plan_grid,
    run_needle,
    score_completion,
)


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE trained on the filler in-process, adding a BOS like most LLM tokenizers."""
    return filler_tokenizer(add_bos=True)


def n_tokens(tok, text):
    return len(tok(text)["input_ids"])


# -----------------------------------------------------------------------------
# filler


def test_filler_is_deterministic_plain_english():
    a = filler_text(200, seed=7)
    assert a == filler_text(200, seed=7)
    assert a != filler_text(200, seed=8)
    assert not re.search(r"\d", a)  # the key is the only number in a prompt
    gen = filler_sentences(7)
    sents = [next(gen) for _ in range(200)]
    assert " ".join(sents) == a
    assert all(s[0].isupper() and s.endswith(".") for s in sents)
    assert len(set(sents)) > 150  # varied, not a loop of a few sentences


# -----------------------------------------------------------------------------
# prompts


@pytest.mark.parametrize("length", [64, 200, 512, 1000, 3000, 8192])
def test_prompt_length_is_exact(tokenizer, length):
    hay = Haystack(tokenizer, seed=0)
    for depth in (0, 33, 50, 100):
        p = build_prompt(tokenizer, length, depth, "48213", haystack=hay)
        assert abs(n_tokens(tokenizer, p.text) - length) <= 2, (length, depth)
        assert p.n_tokens == n_tokens(tokenizer, p.text)
        assert p.text.count(make_needle("48213")) == 1
        assert p.text.endswith(QUESTION)


@pytest.mark.parametrize("length", [512, 2000, 8192])
@pytest.mark.parametrize("depth", [0, 10, 25, 50, 75, 90, 100])
def test_needle_sits_at_requested_depth(tokenizer, length, depth):
    p = build_prompt(tokenizer, length, depth, make_key(0, length, depth))
    # Independent measure: filler tokens before the needle over all filler tokens (BOS, needle and
    # question excluded), re-tokenized here rather than taken from the prompt's bookkeeping.
    before = p.text[: p.text.index("The pass key is")].rstrip()
    plain = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    haystack = p.n_tokens - 1 - plain(" " + make_needle(p.key)) - plain(" " + QUESTION)
    frac = 100 * plain(before) / haystack
    assert abs(frac - depth) <= 5, (frac, depth)
    # The prompt's own, finer measure (fraction of the filler) is within one sentence.
    assert abs(p.measured_depth - depth) <= 100 * 20 / p.filler_tokens
    if depth == 0:
        assert p.text.startswith("The pass key is")
    if depth == 100:
        assert p.text.endswith(make_needle(p.key) + " " + QUESTION)


def test_prompts_are_deterministic(tokenizer):
    a = build_prompt(tokenizer, 700, 40, make_key(3, 700, 40), seed=3)
    b = build_prompt(tokenizer, 700, 40, make_key(3, 700, 40), seed=3)
    c = build_prompt(tokenizer, 700, 40, make_key(4, 700, 40), seed=4)
    assert a == b and a.text != c.text
    assert make_key(0, 512, 50) == make_key(0, 512, 50.0)
    assert re.fullmatch(r"\d{5}", make_key(0, 512, 50))
    assert len({make_key(0, n, d) for n in (512, 1024) for d in (0, 50, 100)}) == 6  # one key per cell


def test_build_prompt_errors(tokenizer):
    with pytest.raises(ValueError, match="length=10 is too short"):
        build_prompt(tokenizer, 10, 50, "12345")
    with pytest.raises(ValueError, match="depth"):
        build_prompt(tokenizer, 512, 101, "12345")


# -----------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("completion,hit", [
    (" 48213. Remember it.", True),
    ("48213", True),
    (" 48213 and 11111", True),
    (" 11111, no wait, 48213", False),  # only the first number counts
    (" 482130", False),  # exact, not prefix
    (" 4821", False),
    (" forty-eight thousand", False),
    ("", False),
])
def test_score_completion(completion, hit):
    assert score_completion(completion, "48213") is hit


def test_first_number():
    assert first_number("key: 007 and 9") == "007" and first_number("none") is None


# -----------------------------------------------------------------------------
# grid planning and validation


def test_plan_grid_marks_cells_beyond_max_context():
    cells = plan_grid([512, 1024, 4090], [0, 50], max_tokens=8, max_context=4096)
    by = {(c.length, c.depth): c for c in cells}
    assert len(cells) == 6
    assert by[(1024, 50.0)].status == "pending"
    assert by[(4090, 0.0)].status == "not run (exceeds max context 4096)"  # 4090 + 8 > 4096
    assert "4090" in by[(4090, 0.0)].error and "4096" in by[(4090, 0.0)].error
    assert plan_grid([4088], [0], max_tokens=8, max_context=4096)[0].ran  # exactly fits
    with pytest.raises(ValueError, match="max context 4096"):
        plan_grid([5000, 8000], [0], max_tokens=8, max_context=4096)


@pytest.mark.parametrize("kw,match", [
    ({"lengths": []}, "lengths"),
    ({"lengths": [0]}, "lengths"),
    ({"lengths": [512.5]}, "lengths"),
    ({"depths": [-1]}, "depths"),
    ({"depths": [0, 101]}, "depths"),
    ({"depths": []}, "depths"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_grid_validation_is_the_params_schema(kw, match):
    with pytest.raises(ValueError, match=match):
        Needle.model_validate({"lengths": [256], "depths": [0], **kw})


def test_max_context_must_be_positive():
    with pytest.raises(ValueError, match="max_context"):
        NeedleTarget(base_url="http://h:1", model="m", tokenizer_dir="t", max_context=0)


def test_max_context_from_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    assert max_context_from_config(tmp_path) == 4096
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vl", "text_config": {"max_position_embeddings": 8192}}))
    assert max_context_from_config(tmp_path) == 8192
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        max_context_from_config(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        max_context_from_config(tmp_path / "missing")


# -----------------------------------------------------------------------------
# a run against a scripted server: knows the key in short prompts, guesses wrong in long ones


@pytest.fixture
def fake_server():
    seen = []

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            key = re.search(r"The pass key is (\d+)\. Remember it\.", body["prompt"]).group(1)
            text = f" {key}. Remember it." if len(body["prompt"]) < 3000 else " 11111."
            out = json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": "length"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    def kill():
        srv.shutdown()
        srv.server_close()

    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1", seen, kill  # OpenAI-style base URL is accepted
    finally:
        kill()


def test_run_needle_grid(fake_server, tokenizer):
    url, seen, _ = fake_server
    res = run_needle(NeedleTarget(base_url=url, model="m", tokenizer_dir="unused", max_context=4096),
                     Needle(lengths=[256, 2048, 4096], depths=[0, 50, 100], max_tokens=8), tokenizer=tokenizer)
    assert res.matrix == [[1, 1, 1], [0, 0, 0], [None, None, None]]
    assert (res.n_hit, res.n_run) == (3, 6) and res.accuracy == pytest.approx(0.5)
    assert res.cell(4096, 50).status == "not run (exceeds max context 4096)"
    assert res.cell(2048, 0).status == "miss" and res.cell(2048, 0).completion == " 11111."
    c = res.cell(256, 100)
    assert c.status == "hit" and c.n_tokens == 256 and c.measured_depth == 100.0
    assert len(seen) == 6 and all(b["temperature"] == 0.0 and b["max_tokens"] == 8 for b in seen)
    d = json.loads(json.dumps(res.to_dict()))  # JSON-able as is
    assert d["accuracy"] == 0.5 and d["cells_total"] == 9 and d["cells_run"] == 6 and d["hits"] == 3
    assert d["matrix"][2] == [None, None, None] and len(d["cells"]) == 9


def test_run_needle_dead_server_raises_naming_url(tokenizer):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = NeedleTarget(base_url=f"http://127.0.0.1:{port}", model="m", tokenizer_dir="unused", max_context=1024)
    with pytest.raises(NeedleError, match=f"127.0.0.1:{port}/v1/completions"):
        run_needle(target, Needle(lengths=[128], depths=[0, 100]), tokenizer=tokenizer)


def test_run_needle_server_dies_mid_grid(fake_server, tokenizer, monkeypatch):
    """Cells before the death keep their scores; later ones are errors (misses), not even sent."""
    import m3lab.needle as needle_mod

    url, seen, kill = fake_server
    real, calls = needle_mod.build_prompt, []

    def build_then_kill(*a, **kw):  # the server dies right before the third request
        calls.append(1)
        if len(calls) == 3:
            kill()
        return real(*a, **kw)

    monkeypatch.setattr(needle_mod, "build_prompt", build_then_kill)
    res = run_needle(NeedleTarget(base_url=url, model="m", tokenizer_dir="unused", max_context=1024),
                     Needle(lengths=[128, 256], depths=[0, 100]), tokenizer=tokenizer)
    assert [c.status for c in res.cells] == ["hit", "hit", "error", "error"]
    assert "not sent" in res.cells[3].error and res.accuracy == 0.5 and len(seen) == 2


@pytest.mark.parametrize("stage", ["needle", "benchmark"])
def test_a_server_that_died_in_an_earlier_stage_is_serverdied_with_its_log(stage, tmp_path):
    """The as-shipped vLLM 0.25.1 run crashed in correctness's concurrent batch; the needle then said only
    "Connection refused". A dead server must be named, with the decisive line of its log."""
    import importlib
    import subprocess
    from types import SimpleNamespace

    from m3lab.params import load_params
    from m3lab.procs import ServerDied

    log = tmp_path / "server.log"
    log.write_text("INFO started\nRuntimeError: CUDA error: an illegal memory access was encountered\n")
    gone = subprocess.Popen(["true"])
    gone.wait()
    server = {"engine": "vllm", "base_url": "http://127.0.0.1:9/v1", "model": "m3", "pid": gone.pid,
              "log_path": str(log)}
    params = load_params("cpu-tiny").model_dump(mode="json")
    ctx = SimpleNamespace(params={"needle": params["needle"], "model": params["model"],
                                  "benchmark": params["benchmark"]},
                          upstream=lambda name: {"server": server, "tokenizer_dir": str(tmp_path)},
                          stage_dir=tmp_path)
    with pytest.raises(ServerDied, match="illegal memory access"):
        importlib.import_module(f"m3lab.{stage}").run_stage(ctx)
