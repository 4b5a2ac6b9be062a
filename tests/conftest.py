"""Shared fixtures: the tiny M3 checkpoint (built once per session) and real `transformers serve` servers
started through `m3lab.serve.start_server`, always stopped at teardown."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from m3lab import serve
from m3lab.stage import read_json
from m3lab.checkpoint import text_only
from m3lab.tinymodel import build_tiny_checkpoint

# The cpu-tiny profile's serve section, with a short startup timeout (the tiny model is healthy in ~6 s).
CPU_SERVE: dict[str, Any] = {
    "engine": "transformers",
    "host": "127.0.0.1",
    "port": None,
    "served_model_name": "m3",
    "startup_timeout_s": 120.0,
    "args": {"--device": "cpu"},
    "env": {"OMP_NUM_THREADS": "1"},  # 2 cores shared with the test client
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The embedded tiny MiniMax-M3 (VL hub layout, random weights, ~3 s to build). Serving needs no trained
    weights, so these tests do not depend on the committed ones."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-m3") / "vl", weights="random")


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """The embedded tiny MiniMax-M3 with its committed trained weights (VL hub layout)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-m3-trained") / "vl")


@pytest.fixture(scope="session")
def tiny_text_checkpoint(tiny_checkpoint) -> Path:
    """Its transformers text-only variant, where `serve.served_checkpoint` would put it."""
    return text_only(tiny_checkpoint, Path(f"{tiny_checkpoint}.text-transformers"), flavor="transformers")


@pytest.fixture
def start_tiny_server(tiny_text_checkpoint, tmp_path) -> Callable[..., serve.ServerRecord]:
    """`start(run_dir=None, model_dir=None, name="server", **serve_overrides)` → ServerRecord. At teardown,
    every server still recorded under a run_dir it used (default `tmp_path / "run"`, also swept when a test
    starts its server another way, e.g. `serve.run_stage`) is stopped."""
    run_dirs: list[Path] = [tmp_path / "run"]

    def start(run_dir: Path | None = None, model_dir: str | Path | None = None, name: str = "server",
              **overrides: Any) -> serve.ServerRecord:
        run_dir = Path(run_dir or run_dirs[0])
        run_dirs.append(run_dir)
        return serve.start_server("transformers", str(model_dir or tiny_text_checkpoint),
                                  {**CPU_SERVE, **overrides}, run_dir, name=name)

    yield start
    for run_dir in run_dirs:  # records the test did not stop itself (stop_all would also revisit *.stopped.json)
        for rec in (run_dir / "servers").glob("*.json"):
            if not rec.name.endswith(".stopped.json"):
                serve.stop_server(read_json(rec), grace_s=5)


def filler_tokenizer(add_bos: bool = False):
    """A small byte-level BPE tokenizer trained in-process on the needle filler (no download, ~20 ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from m3lab.needle import filler_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([filler_text(50, s) for s in range(20)], trainer)
    if add_bos:  # like most LLM tokenizers
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


class StandIn:
    """A JSON server on 127.0.0.1 standing in for an engine behaviour nothing on this machine can produce (a
    nondeterministic GPU engine, vLLM's own parsers, a model whose answers a test dictates). Tests that use it
    say so. `answer(body, n)` → (HTTP status, JSON payload) for the n-th POST (from 1); `server` is a record
    in the serve stage's shape (no pid: m3lab did not start it)."""

    def __init__(self, answer: Callable[[dict[str, Any], int], tuple[int, Any]]) -> None:
        import http.server
        import json
        import threading

        seen = {"n": 0}
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    seen["n"] += 1
                    n = seen["n"]
                status, reply = answer(body, n)
                payload = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.server = {"base_url": f"http://127.0.0.1:{self.httpd.server_address[1]}/v1", "model": "m3",
                       "engine": "stand-in"}

    def __enter__(self) -> "StandIn":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
