"""`mlx_lm.server` (Apple silicon, or `mlx[cpu]` on Linux): card 003's engine, standing in for oMLX."""

from __future__ import annotations

from typing import Any

from m3lab.engines import flags

PACKAGE = "mlx-lm"
MODULE = "mlx_lm.server"


def command(model_dir: str, serve: dict[str, Any], port: int) -> list[str]:
    return ["mlx_lm.server", "--model", model_dir, "--host", serve["host"], "--port", str(port)] + flags(
        serve.get("args") or {})


def checkpoint_flavor(text_only: bool) -> str | None:
    return None


def request_model(serve: dict[str, Any], model_dir: str) -> str:
    return model_dir


def force_output_len(body: dict[str, Any], n: int) -> dict[str, Any] | None:
    # mlx_lm.server has neither ignore_eos nor min_tokens (read from its source, mlx_lm/server.py): it takes the
    # fields it knows with body.get and drops the rest silently, so sending `ignore_eos` would only look as if it
    # worked. Answers may stop at EOS before n tokens; the benchmark records that the length was not forced.
    return None


def startup_facts(log_text: str) -> dict[str, Any] | None:
    return None
