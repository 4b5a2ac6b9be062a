"""Small process helpers every engine uses: free ports, detached children, readiness, clean stops.

Servers are started in their own session (process group), so that stopping one stops everything it spawned
(vLLM's engine core and workers included), and so that a server outlives the notebook kernel that started it
until the runner stops it.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from m3lab import transport

__all__ = [
    "ensure_alive",
    "ServerDied",
    "free_port",
    "port_is_free",
    "start_detached",
    "pid_alive",
    "wait_for_server_ready",
    "stop_process_tree",
    "log_tail",
]


class ServerDied(RuntimeError):
    """The server process exited or never became healthy; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise


def log_tail(path: str | Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def start_detached(cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
                   cwd: str | Path | None = None) -> subprocess.Popen:
    """Start `cmd` in a new session with stdout+stderr to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )


def pid_alive(pid: int) -> bool:
    try:
        # Reap it if it is our own child, so a dead server is not mistaken for a live zombie.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie that is not our child still answers kill(0); /proc tells the truth on Linux.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def ensure_alive(server: dict[str, Any], settle_s: float = 2.0) -> None:
    """Raise ServerDied with the log tail if the server process is gone (call it when a request fails).

    A killed server's socket closes a moment before its pid is reaped, so give a dying process `settle_s` to
    finish dying before calling it alive; only requests that failed against a live server pay that wait."""
    if "pid" not in server:
        return  # a server m3lab did not start (an endpoint given by URL): nothing to check
    deadline = time.monotonic() + settle_s
    while pid_alive(server["pid"]):
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    raise ServerDied(f"the {server['engine']} server (pid {server['pid']}, {server['base_url']}) died; "
                     f"log tail of {server['log_path']}:\n{log_tail(server['log_path'])}")


def wait_for_server_ready(url: str, pid: int, timeout_s: float, log_path: Path, poll_s: float = 0.5) -> float:
    """Poll `url` until it answers 200; returns seconds waited. Fails fast if the process exits."""
    t0 = time.monotonic()
    while True:
        if not pid_alive(pid):
            raise ServerDied(f"server (pid {pid}) exited before it became healthy; log tail of {log_path}:\n"
                             f"{log_tail(log_path)}")
        try:
            if transport.get_text(url, 5.0)[0] == 200:
                return time.monotonic() - t0
        except transport.TransportError:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise ServerDied(f"server (pid {pid}) not healthy at {url} after {timeout_s:g}s; "
                             f"log tail of {log_path}:\n{log_tail(log_path)}")
        time.sleep(poll_s)


def stop_process_tree(pid: int, grace_s: float = 15.0) -> bool:
    """SIGTERM the process group led by `pid`, then SIGKILL after `grace_s`. True if something was running."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        # The leader is gone (an OOM-killed API server, say); the group it led may not be (vLLM's engine core).
        pgid = pid
        if not _group_alive(pgid):
            return False
    if pgid != pid:  # not a group leader we started: signal only the process itself
        pgid = None
    sig_target = (lambda s: os.killpg(pgid, s)) if pgid else (lambda s: os.kill(pid, s))
    try:
        sig_target(signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not pid_alive(pid) and not (pgid and _group_alive(pgid)):
            return True
        time.sleep(0.2)
    try:
        sig_target(signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(50):
        if not pid_alive(pid) and not (pgid and _group_alive(pgid)):
            break
        time.sleep(0.1)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Members may be zombies awaiting their (dead) parent's reaping by init; count only live ones.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(") ", 1)[1].split()
        except (FileNotFoundError, IndexError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
