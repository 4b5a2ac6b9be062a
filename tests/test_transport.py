"""One HTTP policy: loopback never goes through a proxy; other hosts use the environment's proxy settings.

A real HTTP server on 127.0.0.1 plays both the target and, for the second test, the proxy (so no request ever
leaves this machine)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from m3lab import transport


@pytest.fixture
def local_server():
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(self.path)  # a proxied request carries the absolute URL here
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            out = json.dumps({"path": self.path, "echo": body.decode() or None}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _answer

        def log_message(self, *a):  # keep pytest output clean
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    srv.shutdown()


def test_loopback_ignores_a_proxy_set_for_the_outside_world(local_server, monkeypatch):
    url, seen = local_server
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there: via the proxy it would fail
    status, answer = transport.post_json(f"{url}/v1/completions", {"prompt": "hi"}, 5.0)
    assert status == 200 and answer["path"] == "/v1/completions" and json.loads(answer["echo"]) == {"prompt": "hi"}


def test_other_hosts_go_through_the_environments_proxy(local_server, monkeypatch):
    url, seen = local_server
    monkeypatch.setenv("HTTP_PROXY", url)  # our local server is the proxy: nothing leaves the machine
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    status, text = transport.get_text("http://m3lab-test.invalid/metrics", 5.0)
    assert status == 200 and seen[-1] == "http://m3lab-test.invalid/metrics"


def test_no_answer_is_a_transport_error_naming_the_url():
    with pytest.raises(transport.TransportError, match=r"GET http://127\.0\.0\.1:9/health"):
        transport.get_text("http://127.0.0.1:9/health", 2.0)


@pytest.mark.parametrize("url, loopback", [("http://127.0.0.1:8000/v1", True), ("http://localhost:1/x", True),
                                           ("http://[::1]:8/x", True), ("http://10.0.0.1/x", False),
                                           ("https://huggingface.co", False)])
def test_is_loopback(url, loopback):
    assert transport.is_loopback(url) is loopback
