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


def startup_facts(log_text: str) -> dict[str, Any] | None:
    return None
