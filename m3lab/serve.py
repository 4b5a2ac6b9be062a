"""Serve stage: start an OpenAI-compatible server for the checkpoint and wait until it answers.

    engine "transformers"  →  transformers serve MODEL --host H --port P [flags]      (CPU, the embedded default)
    engine "vllm"          →  vllm serve MODEL --host H --port P --served-model-name N [flags]   (GPU profiles)
    engine "mlx"           →  mlx_lm.server --model MODEL --host H --port P [flags]               (Apple silicon)

Engine flags come from params verbatim (`serve.args: {"--tensor-parallel-size": 8}`), so the command a card's
author ran is the command we run. The server is a detached process group; its record (pid, command, log) is
written to `<run_dir>/servers/<name>.json` *before* waiting for health, so the runner can stop it whatever
happens afterwards (`stop_all`). Later stages call `ensure_alive` when a request fails, so a server that died
mid-run fails the stage with its log tail instead of a bare connection error.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from m3lab import client, envs, procs
from m3lab.engines import served_checkpoint
from m3lab.registry import ENGINES
from m3lab.stage import REPO_ROOT, StageContext, StageError, read_json, write_json
from m3lab.vllm_obs import decisive_lines

__all__ = ["ServerRecord", "build_command", "display_command", "check_engine", "start_server",
           "stop_server", "stop_all", "run_stage"]


@dataclass
class ServerRecord:
    engine: str
    argv: list[str]  # what was executed
    command: str  # the same, as a user would type it
    host: str
    port: int
    base_url: str  # http://host:port/v1
    model: str  # the name to put in requests
    model_dir: str  # the folder the server loads
    pid: int
    log_path: str
    started_at: float
    startup_s: float | None = None


def build_command(engine: str, model_dir: str, serve: dict[str, Any], port: int) -> list[str]:
    """The server's command line as a user would type it (m3lab.engines.<engine>.command)."""
    return ENGINES.load(engine).command(model_dir, serve, port)


def display_command(argv: list[str]) -> str:
    return shlex.join(argv)


def _executable(engine: str, argv: list[str]) -> list[str]:
    """Run the engine from this interpreter's environment (the GPU host has no `vllm` script on PATH). A command
    already written `python -m MODULE …` keeps its words, with this interpreter for `python`."""
    if argv[:2] == ["python", "-m"]:
        return [sys.executable, *argv[1:]]
    return [sys.executable, "-m", ENGINES.load(engine).MODULE, *argv[1:]]


def check_engine(engine: str, pinned: str | None) -> str:
    """The engine's installed version; a clear error if it is missing or differs from the profile's pin."""
    package = ENGINES.load(engine).PACKAGE
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        raise StageError(f"serve.engine: {engine} is not installed in {sys.executable} "
                         f"(pip install {package}{'==' + pinned if pinned else ''})") from None
    if pinned and version != pinned:
        raise StageError(f"serve.engine_version: the profile pins {package}=={pinned}, "
                         f"but {sys.executable} has {package}=={version}")
    return version


def _pick_port(serve: dict[str, Any]) -> int:
    host, port = serve["host"], serve.get("port")
    if port is None:
        return procs.free_port(host)
    if not procs.port_is_free(host, port):
        raise StageError(f"serve.port: port {port} on {host} is already in use (the profile pins it; "
                         f"free it, or remove serve.port to use a free one)")
    return port


def python_path(serve: dict[str, Any]) -> list[str]:
    """serve.python_path as absolute folders (relative ones are under the repo root)."""
    return [str(Path(p) if Path(p).is_absolute() else REPO_ROOT / p) for p in serve.get("python_path") or []]


def server_env(serve: dict[str, Any]) -> dict[str, str]:
    """serve.env, with serve.python_path in front of the inherited PYTHONPATH."""
    env = dict(serve.get("env") or {})
    extra = python_path(serve)
    if serve.get("environment"):  # m3lab/envs/<name>: its overlay, then the repo root (m3lab from source)
        extra += envs.pythonpath(serve["environment"], "serve.environment").split(os.pathsep)[:2]
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(extra + [p for p in [os.environ.get("PYTHONPATH", "")] if p])
    return env


def start_server(engine: str, model_dir: str, serve: dict[str, Any], run_dir: Path, name: str = "server",
                 model_name: str | None = None) -> ServerRecord:
    """Start the server, record it, wait for /health. On any failure the server is stopped again."""
    port = _pick_port(serve)
    argv = build_command(engine, model_dir, serve, port)
    log_path = run_dir / "servers" / f"{name}.log"
    proc = procs.start_detached(_executable(engine, argv), log_path, env=server_env(serve))
    rec = ServerRecord(
        engine=engine, argv=argv, command=display_command(argv), host=serve["host"], port=port,
        base_url=f"http://{serve['host']}:{port}/v1",
        model=model_name or ENGINES.load(engine).request_model(serve, model_dir),
        model_dir=model_dir, pid=proc.pid, log_path=str(log_path), started_at=time.time(),
    )
    record_path = run_dir / "servers" / f"{name}.json"
    try:
        write_json(record_path, asdict(rec))  # before the wait: the runner must be able to stop it
        rec.startup_s = round(procs.wait_for_server_ready(
            f"http://{serve['host']}:{port}/health", proc.pid, serve["startup_timeout_s"], log_path), 2)
    except BaseException as e:
        procs.stop_process_tree(proc.pid)
        record_path.unlink(missing_ok=True)
        if isinstance(e, procs.ServerDied) and log_path.is_file():
            decisive = decisive_lines(log_path.read_text(errors="replace"))
            if decisive:  # the lines that say why, ahead of the raw tail (vLLM's tracebacks bury them)
                raise procs.ServerDied("decisive log lines:\n" + "\n".join(decisive) + "\n" + str(e)) from None
        raise
    write_json(record_path, asdict(rec))
    return rec


def stop_server(server: dict[str, Any], grace_s: float = 15.0) -> bool:
    return procs.stop_process_tree(server["pid"], grace_s)


def stop_all(run_dir: Path) -> list[str]:
    """Stop every server recorded under `<run_dir>/servers/`; returns the names stopped."""
    stopped = []
    for rec in sorted((Path(run_dir) / "servers").glob("*.json")):
        if rec.name.endswith(".stopped.json"):
            continue  # stopped already: its pid may belong to someone else by now
        server = read_json(rec)
        if stop_server(server):
            stopped.append(rec.stem)
        rec.rename(rec.with_suffix(".stopped.json"))
    return stopped


def _smoke(rec: ServerRecord) -> dict[str, Any]:
    """One greedy completion: proves the server answers, and warms it up before anything is timed."""
    t0 = time.monotonic()
    try:
        out = client.complete(asdict(rec), "Hello", 4)  # a dead server raises ServerDied with its log tail
    except client.RequestFailed as e:
        raise StageError(f"serve: the server at {rec.base_url} is up but /completions failed: {e}") from e
    return {"first_completion_s": round(time.monotonic() - t0, 3), "text": out["choices"][0]["text"]}


def check_context(model_dir: str, max_model_len: int) -> int:
    """The model's own context (config.json `max_position_embeddings`, top level or `text_config`); a profile
    asking for more is an error before any server starts (a 4096-token model must not "hit" an 8192 needle)."""
    path = Path(model_dir) / "config.json"
    cfg = read_json(path)
    limit = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    if limit is None:
        raise StageError(f"serve: {path} states no max_position_embeddings; cannot check model.max_model_len")
    if max_model_len > int(limit):
        raise StageError(f"model.max_model_len {max_model_len} exceeds the checkpoint's max_position_embeddings "
                         f"{limit} ({path}); lower it, or the needle and benchmark would run past the model")
    return int(limit)


def run_stage(ctx: StageContext) -> dict[str, Any]:
    serve, model = ctx.params["serve"], ctx.params["model"]
    engine = serve["engine"]
    version = check_engine(engine, serve.get("engine_version"))
    model_dir = ctx.upstream("quantize")["model_dir"]
    check_context(model_dir, model["max_model_len"])
    served_dir = served_checkpoint(engine, model_dir, serve.get("text_only", False), serve.get("fault", "none"))
    rec = start_server(engine, served_dir, serve, ctx.run_dir)
    smoke = _smoke(rec)
    result = {
        "server": asdict(rec),
        "engine_version": version,
        "tokenizer_dir": served_dir,
        "text_only": bool(serve.get("text_only", False)),
        "python_path": serve.get("python_path") or [],  # engine plugins the profile states (e.g. a vLLM fix)
        "environment": envs.record(serve["environment"]) if serve.get("environment") else None,
        "max_model_len": model["max_model_len"],
        "smoke": smoke,
        "fault": serve.get("fault", "none"),
        # What the profile opted into (off unless it says so; m3lab.params.Serve).
        "opt_ins": {"nonlocal_host": serve["host"] if serve.get("allow_nonlocal_host") else None,
                    "remote_code": bool(serve.get("args", {}).get("--trust-remote-code"))},
    }
    facts = ENGINES.load(engine).startup_facts(Path(rec.log_path).read_text(errors="replace"))
    if facts is not None:
        result[engine] = facts  # what the engine said about itself at start-up
    return result
