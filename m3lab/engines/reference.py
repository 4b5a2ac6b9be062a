"""m3lab's reference server (`python -m m3lab.refserver`, CPU): transformers forward passes behind /v1/completions
with vLLM's extensions (prompt_logprobs, logprobs, ignore_eos, min_tokens), for fidelity checks where vLLM cannot
run. Not a performance engine: one request at a time (m3lab/refserver.py says what it copies from vLLM)."""

from __future__ import annotations

import json
from typing import Any

from m3lab.engines import flags

PACKAGE = "transformers"  # the server is m3lab's own; the version that decides its numbers is transformers'
MODULE = "m3lab.refserver"


def command(model_dir: str, serve: dict[str, Any], port: int) -> list[str]:
    argv = ["python", "-m", MODULE, model_dir, "--host", serve["host"], "--port", str(port),
            "--served-model-name", serve["served_model_name"]]
    if serve.get("allow_nonlocal_host"):  # the profile opted in (m3lab.params.Serve); the server asks again
        argv.append("--allow-nonlocal-host")
    return argv + flags(serve.get("args") or {})


def checkpoint_flavor(text_only: bool) -> str | None:
    return "transformers"  # always text-only: AutoModelForCausalLM loads the minimax_m3_vl_text checkpoint


def request_model(serve: dict[str, Any], model_dir: str) -> str:
    return serve["served_model_name"]


def force_output_len(body: dict[str, Any], n: int) -> dict[str, Any] | None:
    return {**body, "max_tokens": n, "ignore_eos": True}  # vLLM's extension, which the server implements


def startup_facts(log_text: str) -> dict[str, Any] | None:
    """The server's `m3lab.refserver ready {...}` line (host, port, model, dtype, threads, max_model_len)."""
    from m3lab.refserver import STARTUP_PREFIX

    for line in reversed(log_text.splitlines()):
        if line.startswith(STARTUP_PREFIX):
            try:
                facts = json.loads(line[len(STARTUP_PREFIX):])
            except json.JSONDecodeError:
                return None
            return facts if isinstance(facts, dict) else None
    return None
