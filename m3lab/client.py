"""A minimal OpenAI-compatible client (stdlib only) for the stages that send one request at a time.

When a request fails, the server record is checked: a dead server becomes `ServerDied` with its log tail,
not a bare connection error.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from m3lab.serve import ensure_alive

__all__ = ["complete", "endpoint_url", "RequestFailed"]


def endpoint_url(base_url: str, endpoint: str) -> str:
    """Join a server URL and an endpoint path; accepts the server root ("http://h:p", what vLLM's bench takes)
    as well as the OpenAI-style base ("http://h:p/v1", what the serve stage records)."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and endpoint.startswith("/v1/"):
        base = base[: -len("/v1")]
    return base + endpoint


class RequestFailed(RuntimeError):
    """The server answered with an error (it is alive, but said no)."""


def complete(server: dict[str, Any], prompt: str, max_tokens: int, temperature: float = 0.0,
             timeout_s: float = 300.0, **extra: Any) -> dict[str, Any]:
    """POST /v1/completions; returns the response JSON. Greedy by default."""
    body = {"model": server["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            **extra}
    req = urllib.request.Request(f"{server['base_url']}/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:500]
        raise RequestFailed(f"{server['base_url']}/completions answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        ensure_alive(server)  # raises ServerDied with the log tail if the process is gone
        raise RequestFailed(f"{server['base_url']}/completions failed: {e}") from None
