"""`m3lab run` stopped the way schedulers stop jobs (SIGTERM, SIGHUP) ends like Ctrl-C: servers stopped, status
`interrupted`, summary written, nothing left running; and a second concurrent run of a profile is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from m3lab import procs
from m3lab.dag import RunLocked, _run_lock, run
from m3lab.params import PARAMS_DIR

REPO = Path(__file__).resolve().parent.parent


def _quick_profile(tmp_path: Path) -> Path:
    """cpu-tiny without the quantizer (pass-through), so a server is up within seconds; no baseline (it would be
    the served checkpoint itself, which params refuse)."""
    p = tmp_path / "sig.yaml"
    p.write_text(yaml.safe_dump({"extends": str(PARAMS_DIR / "cpu-tiny.yaml"), "profile": "sig",
                                 "quantize": {"recipe": "none"}, "correctness": {"baseline": None},
                                 "claims": []}))
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_mid_run_stops_the_server_and_writes_an_interrupted_summary(tmp_path, sig):
    results = tmp_path / "results"
    env = {**os.environ, "M3LAB_RESULTS": str(results), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "m3lab", "run", str(_quick_profile(tmp_path))], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        record = None
        while time.monotonic() < deadline and proc.poll() is None:  # until serve is done: a healthy server
            found = list(results.glob("sig/*/servers/server.json"))
            if found and list(results.glob("sig/*/serve/status.json")):
                record = json.loads(found[0].read_text())
                break
            time.sleep(0.2)
        assert record is not None, "the server never came up"
        assert procs.pid_alive(record["pid"])
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted — stopping servers" in out and "stopped 1 server(s)" in out
    assert not procs.pid_alive(record["pid"])
    (run_dir,) = results.glob("sig/2*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert "interrupted" in {s["status"] for s in summary["stages"].values()}


def test_a_second_concurrent_run_is_refused_naming_the_first(tmp_path):
    profile_dir = tmp_path / "results" / "sig"
    with _run_lock(profile_dir):
        with pytest.raises(RunLocked, match=rf"another m3lab run holds .*\.run\.lock \(pid {os.getpid()}, started"):
            run(_quick_profile(tmp_path), root=tmp_path / "results")
    assert [p.name for p in profile_dir.iterdir()] == [".run.lock"]  # no run folder was made


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path):
    profile_dir = tmp_path / "results" / "sig"
    profile_dir.mkdir(parents=True)
    (profile_dir / ".run.lock").write_text("pid 999999, started long ago")  # its holder died: no flock held
    with _run_lock(profile_dir):
        assert f"pid {os.getpid()}" in (profile_dir / ".run.lock").read_text()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost one, on purpose
def test_a_sigterm_lost_in_a_del_is_delivered_again():
    """A KeyboardInterrupt raised while Python runs a __del__ or weakref callback is printed as "Exception
    ignored" and lost (a real SIGTERM mid-run was lost that way). The runner delivers it again until it is
    caught."""
    from m3lab import dag

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside __del__: its exception is lost
            time.sleep(0.05)

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with dag._signals_as_interrupt():
            Finalised()
            time.sleep(10)  # re-delivered within about a second
    assert time.monotonic() - t0 < 5
