"""The one way m3lab talks HTTP to a server, with one proxy policy: a loopback address never goes through a
proxy (an `http_proxy` set for the outside world must not swallow requests to our own 127.0.0.1 server), and
any other address uses the environment's proxy settings as usual.

Two calls, both returning instead of raising on an HTTP error status, so each caller decides what an error
means: `post_json` (a JSON body; the answer parsed as JSON where it is JSON) and `get_text`. A connection that
cannot be made or breaks raises `TransportError`.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

import httpx

__all__ = ["TransportError", "is_loopback", "post_json", "get_text"]


class TransportError(ConnectionError):
    """No answer: refused, reset, timed out, or not reachable."""


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _request(method: str, url: str, timeout_s: float, **kw: Any) -> httpx.Response:
    try:
        with httpx.Client(trust_env=not is_loopback(url), timeout=timeout_s) as c:
            return c.request(method, url, **kw)
    except httpx.HTTPError as e:  # connect/read errors and timeouts; HTTP statuses are answers, not errors
        raise TransportError(f"{method} {url}: {type(e).__name__}: {e}") from None


def post_json(url: str, body: dict[str, Any], timeout_s: float) -> tuple[int, Any]:
    """(HTTP status, the answer as JSON, or its text when it is not JSON)."""
    r = _request("POST", url, timeout_s, content=json.dumps(body), headers={"Content-Type": "application/json"})
    try:
        return r.status_code, r.json()
    except ValueError:  # not JSON: an engine (or proxy) answering in some other shape
        return r.status_code, r.text[:2000]


def get_text(url: str, timeout_s: float) -> tuple[int, str]:
    r = _request("GET", url, timeout_s)
    return r.status_code, r.text
