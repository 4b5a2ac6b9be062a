"""Serve stage with real processes: `transformers serve` on the tiny M3, and plain process trees.

Start → record → health → greedy answer → stop; a server dying mid-request; a server dying during load; a
readiness timeout; a pinned port already taken; the engine check; process-group stops (children, SIGTERM
ignored, leader gone)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import pytest

from conftest import CPU_SERVE
from m3lab import procs
from m3lab.client import complete
from m3lab.procs import ServerDied, pid_alive, start_detached, stop_process_tree
from m3lab.serve import check_engine, run_stage, stop_all
from m3lab.stage import StageContext, StageError, read_json, write_json

PROMPT = "The capital of France is"


def live_group_members(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes whose process group is `pgid`, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(") ", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        if int(pgrp) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def wait_until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def pid_in(message: str) -> int:
    return int(re.search(r"\(pid (\d+)\)", message).group(1))


def assert_gone(pid: int) -> None:
    """The process and its whole group are gone (SIGKILLed members may need a moment to be reaped)."""
    wait_until(lambda: not pid_alive(pid) and not live_group_members(pid), 5, f"process group {pid} to exit")


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# --------------------------------------------------------------------------------------------------------------
# a real transformers serve


def test_server_is_recorded_before_ready_answers_greedily_and_stop_all_leaves_no_process(
        start_tiny_server, tiny_text_checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    record = run_dir / "servers" / "server.json"
    early = None
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        starting = pool.submit(start_tiny_server, port=None)  # port None: a free one
        while not starting.done():
            if early is None and record.is_file():
                early = read_json(record)  # written before the wait for /health
            time.sleep(0.01)
        rec = starting.result()
    start_s = time.monotonic() - t0

    assert early is not None and early["pid"] == rec.pid and early["startup_s"] is None
    assert read_json(record) == json.loads(json.dumps(asdict(rec)))
    assert 0 < rec.startup_s <= start_s
    assert os.getpgid(rec.pid) == rec.pid  # its own process group
    assert rec.base_url == f"http://127.0.0.1:{rec.port}/v1" and rec.model == str(tiny_text_checkpoint)
    assert rec.command == (f"transformers serve {tiny_text_checkpoint} --host 127.0.0.1 --port {rec.port} "
                           f"--device cpu")
    with urllib.request.urlopen(f"http://127.0.0.1:{rec.port}/health", timeout=5) as r:
        assert r.status == 200

    first, second = (complete(read_json(record), PROMPT, max_tokens=8) for _ in range(2))
    assert first["choices"][0]["text"] == second["choices"][0]["text"]  # greedy: the same answer twice
    assert 0 < first["usage"]["completion_tokens"] <= 8

    t0 = time.monotonic()
    assert stop_all(run_dir) == ["server"]
    stop_s = time.monotonic() - t0
    assert_gone(rec.pid)
    assert refused(rec.port)
    assert not record.exists()
    assert read_json(run_dir / "servers" / "server.stopped.json")["pid"] == rec.pid
    print(f"\n[measured] transformers serve: healthy after {rec.startup_s:.2f} s "
          f"(start_server {start_s:.2f} s), stop_all {stop_s:.2f} s")


def test_server_killed_mid_request_raises_server_died_with_its_log_tail(
        start_tiny_server, tiny_checkpoint, tiny_text_checkpoint, tmp_path):
    # Started by the serve stage itself; later stages get the record from its result.json.
    run_dir = tmp_path / "run"
    write_json(run_dir / "quantize" / "result.json", {"model_dir": str(tiny_checkpoint)})
    ctx = StageContext(stage="serve", profile="test", run_dir=run_dir,
                       params={"serve": CPU_SERVE, "model": {"max_model_len": 4096}})
    result = json.loads(json.dumps(run_stage(ctx)))
    assert result["tokenizer_dir"] == str(tiny_text_checkpoint)  # the session's text-only variant, reused
    assert result["engine_version"] == metadata.version("transformers")
    assert isinstance(result["smoke"]["text"], str) and result["smoke"]["first_completion_s"] > 0
    server = result["server"]
    log = Path(server["log_path"])

    seen = log.read_text().count("[Request received]")  # the stage's smoke request
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(complete, server, PROMPT, max_tokens=2000)  # seconds of decoding
        wait_until(lambda: log.read_text().count("[Request received]") > seen, 30, "the request to arrive")
        time.sleep(0.3)
        assert not pending.done()
        os.kill(server["pid"], signal.SIGKILL)
        pending_error = pending.exception(timeout=60)
    assert_gone(server["pid"])

    with pytest.raises(ServerDied) as died:  # the next request, to a server known to be dead
        complete(server, PROMPT, max_tokens=4)
    msg = str(died.value)
    assert f"the transformers server (pid {server['pid']}, {server['base_url']}) died" in msg
    assert f"log tail of {log}:" in msg and "[Request received]" in msg
    assert msg.endswith(procs.log_tail(log, 3))

    stop_all(run_dir)  # nothing left to stop; the record is retired all the same
    assert not (run_dir / "servers" / "server.json").exists()
    assert (run_dir / "servers" / "server.stopped.json").is_file()

    assert isinstance(pending_error, ServerDied), pending_error  # ensure_alive waits for a dying pid to die
    assert str(pending_error) == msg  # the same log tail: nothing was written after the kill


def test_server_exiting_during_load_raises_with_its_error_and_leaves_nothing(
        start_tiny_server, tiny_text_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_text_checkpoint, broken)
    (broken / "config.json").write_text('{"model_type": ')
    with pytest.raises(ServerDied) as died:
        start_tiny_server(model_dir=broken)
    msg = str(died.value)
    assert "exited before it became healthy" in msg
    assert f"It looks like the config file at '{broken / 'config.json'}' is not a valid JSON file." in msg
    assert_gone(pid_in(msg))
    assert not list((tmp_path / "run" / "servers").glob("*.json"))


def test_readiness_timeout_stops_the_server_and_names_url_and_timeout(start_tiny_server, tmp_path):
    port = procs.free_port()
    t0 = time.monotonic()
    with pytest.raises(ServerDied) as died:
        start_tiny_server(port=port, startup_timeout_s=1)
    assert time.monotonic() - t0 < 10
    msg = str(died.value)
    assert f"not healthy at http://127.0.0.1:{port}/health after 1s" in msg
    assert_gone(pid_in(msg))
    assert refused(port)
    assert not list((tmp_path / "run" / "servers").glob("*.json"))


def test_pinned_port_in_use_is_a_stage_error_naming_port_and_key(start_tiny_server, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(StageError, match=rf"^serve\.port: port {port} on 127\.0\.0\.1 is already in use"):
            start_tiny_server(port=port)
    assert not (tmp_path / "run" / "servers").exists()  # nothing started, nothing recorded


# --------------------------------------------------------------------------------------------------------------
# the engine check


def test_missing_engine_names_the_package_and_the_interpreter():
    assert importlib.util.find_spec("vllm") is None  # vLLM cannot be installed on this CPU box
    with pytest.raises(StageError) as e:
        check_engine("vllm", "0.25.1")
    assert str(e.value) == (f"serve.engine: vllm is not installed in {sys.executable} "
                            f"(pip install vllm==0.25.1)")


def test_engine_pinned_to_another_version_names_both_versions():
    installed = metadata.version("transformers")
    assert check_engine("transformers", None) == installed == check_engine("transformers", installed)
    with pytest.raises(StageError) as e:
        check_engine("transformers", "4.0.0")
    msg = str(e.value)
    assert msg.startswith("serve.engine_version:")
    assert "transformers==4.0.0" in msg and f"transformers=={installed}" in msg and sys.executable in msg


# --------------------------------------------------------------------------------------------------------------
# process trees


def _start_tree(tmp_path: Path, script: str, members: int, ready: str = ""):
    log = tmp_path / "tree.log"
    proc = start_detached(["sh", "-c", script], log)
    wait_until(lambda: len(live_group_members(proc.pid)) == members and ready in log.read_text(), 10,
               f"{members} processes in the group" + (f" and {ready!r} in the log" if ready else ""))
    return proc


IGNORE_TERM = (f"{sys.executable} -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               f"print(\"ignoring SIGTERM\", flush=True); time.sleep(300)'")


def test_stop_process_tree_stops_the_children_a_shell_spawned(tmp_path):
    proc = _start_tree(tmp_path, "sleep 300 & sleep 300 & wait", members=3)
    t0 = time.monotonic()
    assert stop_process_tree(proc.pid, grace_s=5)
    assert time.monotonic() - t0 < 2  # they all honour SIGTERM: no waiting out the grace period
    assert_gone(proc.pid)


@pytest.mark.parametrize("script,members", [
    (f"exec {IGNORE_TERM}", 1),  # the leader itself ignores SIGTERM
    (f"{IGNORE_TERM} & sleep 300 & wait", 3),  # the leader exits at once, a child ignores SIGTERM
], ids=["leader", "child"])
def test_stop_process_tree_sigkills_what_ignores_sigterm_after_the_grace_period(tmp_path, script, members):
    proc = _start_tree(tmp_path, script, members, ready="ignoring SIGTERM")
    t0 = time.monotonic()
    assert stop_process_tree(proc.pid, grace_s=1)
    assert 1 <= time.monotonic() - t0 < 5
    assert_gone(proc.pid)


def test_stop_process_tree_stops_the_group_after_its_leader_died(tmp_path):
    # vLLM's API server killed by the OOM killer leaves its engine-core processes (and the GPU memory) behind.
    proc = _start_tree(tmp_path, "sleep 300 & wait", members=2)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(proc.pid), 5, "the leader to die")
        assert stop_process_tree(proc.pid, grace_s=1)
        assert_gone(proc.pid)
    finally:
        if live_group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def test_stop_all_leaves_stopped_records_alone(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_detached(["sleep", "300"], run_dir / "servers" / "server.log")
    write_json(run_dir / "servers" / "server.json", {"pid": proc.pid})
    assert stop_all(run_dir) == ["server"]
    assert_gone(proc.pid)
    assert stop_all(run_dir) == []
    assert sorted(p.name for p in (run_dir / "servers").iterdir()) == ["server.log", "server.stopped.json"]
