"""`vllm serve` (GPUs): the cards' engine. Flags come from `serve.args` verbatim, after the served name."""

from __future__ import annotations

import re
from typing import Any

from m3lab.engines import flags
from m3lab.vllm_obs import parse_server_log

PACKAGE = "vllm"
MODULE = "vllm.entrypoints.cli.main"  # the GPU host has no `vllm` script on PATH


def command(model_dir: str, serve: dict[str, Any], port: int) -> list[str]:
    return ["vllm", "serve", model_dir, "--host", serve["host"], "--port", str(port),
            "--served-model-name", serve["served_model_name"]] + flags(serve.get("args") or {})


def checkpoint_flavor(text_only: bool) -> str | None:
    return "vllm" if text_only else None  # the VL checkpoint as is, or text-only in vLLM's layout


def request_model(serve: dict[str, Any], model_dir: str) -> str:
    return serve["served_model_name"]


def force_output_len(body: dict[str, Any], n: int) -> dict[str, Any] | None:
    # vLLM's sampling extension: ignore_eos keeps generating past EOS until max_tokens.
    return {**body, "max_tokens": n, "ignore_eos": True}


def startup_facts(log_text: str) -> dict[str, Any] | None:
    # Weights per GPU, KV-cache capacity, max concurrency: card 002 quotes exactly these
    # ("87.6 GiB per GPU, KV 46,464 tokens").
    facts = parse_server_log(log_text).to_dict()
    # What the m3lab_f2fix plugin (tools/f2/vllm_plugin, via serve.python_path) said in each process it loaded
    # in: "patched …", "M3LAB_F2FIX=0: vLLM left as shipped", or "already handles the buffer layout".
    said = sorted({m.group(1) for m in _F2FIX.finditer(log_text)})
    if said:
        facts["f2fix"] = said
    return facts


_F2FIX = re.compile(r"\[m3lab_f2fix pid=\d+\] ([^\n(]*[^\n( ])")
