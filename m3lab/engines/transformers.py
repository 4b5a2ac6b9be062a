"""`transformers serve` (CPU): the embedded default's engine.

It loads the text-only model (the VL processor would need torchvision), answers with the folder it loaded as
the model name, ignores logprobs, and rejects fields outside the OpenAI schema (`ignore_eos`) with HTTP 422.
"""

from __future__ import annotations

import json
from typing import Any

from m3lab.engines import flags

PACKAGE = "transformers"
MODULE = "transformers.cli.transformers"


def command(model_dir: str, serve: dict[str, Any], port: int) -> list[str]:
    return ["transformers", "serve", model_dir, "--host", serve["host"], "--port", str(port)] + flags(
        serve.get("args") or {})


def checkpoint_flavor(text_only: bool) -> str | None:
    return "transformers"  # always text-only


def request_model(serve: dict[str, Any], model_dir: str) -> str:
    return model_dir


def force_output_len(body: dict[str, Any], n: int) -> dict[str, Any] | None:
    # No ignore_eos (a 422), but it takes a generation_config as a JSON string. That config replaces the model's
    # instead of merging into it, and the request's temperature then sets do_sample only when it is 0, so the
    # JSON says do_sample itself. Fine for benchmarking, where only the length matters.
    sample = float(body.get("temperature") or 0.0) > 0
    return {**body, "max_tokens": n,
            "generation_config": json.dumps({"min_new_tokens": n, "max_new_tokens": n, "do_sample": sample})}


def startup_facts(log_text: str) -> dict[str, Any] | None:
    return None
