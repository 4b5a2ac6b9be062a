"""Serving engines, one module each (registered in `m3lab.registry.ENGINES`).

An engine module says how its OpenAI-compatible server is started and how a benchmark request asks it
for a fixed output length, and nothing else:

    PACKAGE        the distribution whose installed version is checked against `serve.engine_version`
    MODULE         `python -m MODULE …` runs the server from this interpreter's environment
    command(model_dir, serve, port) -> argv    the command line as a user would type it; `serve.args` verbatim
    checkpoint_flavor(text_only) -> str|None   the layout it loads (m3lab.checkpoint.text_only), None: as is
    request_model(serve, model_dir) -> str     the `model` field its requests carry
    startup_facts(log_text) -> dict|None       what it says about itself at start-up (vLLM: memory, KV tokens)
    force_output_len(body, n) -> dict|None     a request body that makes it generate exactly n tokens (the
                                               benchmark's ignore_eos); None: the server has no way to ask
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["flags"]


def flags(args: dict[str, Any]) -> list[str]:
    """{"--block-size": 128, "--enforce-eager": true, "--x": false} → ["--block-size", "128", "--enforce-eager"]."""
    out: list[str] = []
    for flag, value in args.items():
        if value is True or value is None:
            out.append(flag)
        elif value is False:
            continue  # a false boolean flag is simply absent
        elif isinstance(value, (dict, list)):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out
