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
import shutil
from pathlib import Path
from typing import Any

from m3lab.registry import ENGINES

__all__ = ["flags", "served_checkpoint"]


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


def served_checkpoint(engine: str, model_dir: str, text_only: bool, fault: str = "none") -> str:
    """The folder the engine loads. transformers serve needs the text-only model (the VL processor needs
    torchvision); vLLM takes the VL checkpoint as is, or a text-only one in vLLM's layout when asked.
    A planted `fault` (m3lab.faults, for fault-injection tests) breaks a copy, never the checkpoint itself."""
    # Layout conversion needs torch (seconds to import): only here, so `m3lab run` can stop servers without it.
    from m3lab import checkpoint, faults

    flavor = ENGINES.load(engine).checkpoint_flavor(text_only)
    if flavor is None and fault == "none":
        return model_dir
    dst = Path(f"{model_dir.rstrip('/')}" + (f".text-{flavor}" if flavor else "") +
               (f".fault-{fault}" if fault != "none" else ""))
    if not (dst / "config.json").is_file():
        tmp = dst.with_name(f".{dst.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        if flavor:
            checkpoint.text_only(Path(model_dir), tmp, flavor=flavor)
        else:
            shutil.copytree(model_dir, tmp, symlinks=False)
        faults.apply_fault(tmp, fault)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)  # complete or absent: a crash mid-conversion leaves only the .partial folder
    return str(dst)
