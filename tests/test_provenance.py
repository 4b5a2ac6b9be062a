"""provenance.json ties a run to its code: the real commit (or "unknown" and why), never the word HEAD."""

from __future__ import annotations

import re
import subprocess

from m3lab import report


def test_in_a_checkout_the_commit_is_the_real_sha_with_a_dirty_flag():
    state = report.git_state()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=report.REPO_ROOT, capture_output=True, text=True)
    if head.returncode != 0:  # a CI copy without .git: the other tests cover that case
        assert state["commit"] == "unknown"
        return
    assert re.fullmatch(r"[0-9a-f]{40}", state["commit"]) and state["commit"] == head.stdout.strip()
    assert isinstance(state["dirty"], bool) and state["source"] == "git"


def test_outside_a_checkout_it_says_unknown_and_why(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "REPO_ROOT", tmp_path)
    monkeypatch.delenv("M3LAB_GIT_COMMIT", raising=False)
    state = report.git_state()
    assert state["commit"] == "unknown" and state["dirty"] is None
    assert str(tmp_path) in state["reason"] and "git" in state["reason"].lower()


def test_a_copy_sent_to_a_gpu_host_takes_the_commit_it_was_made_from(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("M3LAB_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567-dirty")
    state = report.git_state()
    assert state == {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True,
                     "source": "M3LAB_GIT_COMMIT (set by the launcher)"}


def test_the_launchers_commit_wins_over_a_stale_git_in_the_copy(monkeypatch):
    # The lent GPU host's copy carried an older .git: git said 94a9c5e (dirty) for code that was b3ffa14.
    monkeypatch.setenv("M3LAB_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    state = report.git_state()
    assert state["commit"] == "0123456789abcdef0123456789abcdef01234567" and state["dirty"] is False
    if "git_here" in state:  # in a checkout: what its own git said is kept beside
        assert state["git_here"]["source"] == "git" and state["git_here"]["commit"] != state["commit"]
