"""The OpenAI-compatible client for the stages that send one request at a time (the benchmark's streaming load
generator is its own, in `m3lab.benchmark`). Every request goes through `m3lab.transport`: one proxy policy.

When a request gets no answer, the server record is checked: a dead server becomes `ServerDied` with its log
tail, not a bare connection error. An HTTP error from a live server is `RequestFailed` with its status and body.
"""

from __future__ import annotations

import json
from typing import Any

from m3lab import procs, transport

__all__ = ["complete", "post", "endpoint_url", "RequestFailed"]


def endpoint_url(base_url: str, endpoint: str) -> str:
    """Join a server URL and an endpoint path; accepts the server root ("http://h:p", what vLLM's bench takes)
    as well as the OpenAI-style base ("http://h:p/v1", what the serve stage records)."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and endpoint.startswith("/v1/"):
        base = base[: -len("/v1")]
    return base + endpoint


class RequestFailed(RuntimeError):
    """The server answered with an error (it is alive, but said no), or could not be reached."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status, self.body = status, body


def post(server: dict[str, Any], path: str, body: dict[str, Any], timeout_s: float = 300.0) -> tuple[int, Any]:
    """POST `<base_url><path>`; (status, JSON or text). No answer: ServerDied if the server's process is gone
    (when the record has a pid), else RequestFailed."""
    url = f"{server['base_url'].rstrip('/')}{path}"
    try:
        return transport.post_json(url, body, timeout_s)
    except transport.TransportError as e:
        if "pid" in server:
            procs.ensure_alive(server)  # raises ServerDied with the log tail if the process is gone
        raise RequestFailed(f"{url} failed: {e}") from None


def complete(server: dict[str, Any], prompt: str | list[int], max_tokens: int, temperature: float = 0.0,
             timeout_s: float = 300.0, **extra: Any) -> dict[str, Any]:
    """POST /v1/completions; returns the response JSON. Greedy by default."""
    body = {"model": server["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            **extra}
    status, answer = post(server, "/completions", body, timeout_s)
    if status != 200 or not isinstance(answer, dict):
        detail = answer if isinstance(answer, str) else json.dumps(answer)
        raise RequestFailed(f"{server['base_url']}/completions answered HTTP {status}: {detail[:500]}", status, answer)
    return answer
