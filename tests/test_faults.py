"""Fault injection: a server broken the way a naive loader breaks it must be reported broken, and the intact
model must pass, by each check on its own: the prompt suite, serving parity and the needle.

Real parts throughout: the trained tiny M3, `transformers serve` on 127.0.0.1, the stages' own functions, run
with the cpu-tiny profile's own settings (its prompts, token budgets, needle grid and context) and judged by its
own claims ledger (`m3lab.claims.judge`), so "red" here is the red of the embedded run's report. The broken copy
is what the serve stage serves with `serve.fault`; parity compares it against the intact checkpoint on disk,
exactly as in a DAG run.

Measured on the trained tiny model (2-core CPU):

  fault                  prompts   parity (mean)   needle (cpu-tiny grid, 20 cells)
  none                   4/4       1.0             20/20 = 1.0
  zero_shared_experts    2/4       0.278           11/20 = 0.55

The needle needs the profile's grid. Without its shared experts the model still copies most of a key: its 9
misses are keys with one or two wrong digits (92013 for 92041, 45777 for 45787), scattered over lengths and
depths. The 2-cell grid this test used before (1024 tokens at depths 25 and 75) holds two of its hits, so there
the zeroed model scored 2/2 and the needle looked green.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import CPU_SERVE

from m3lab import serve
from m3lab.claims import judge
from m3lab.correctness import run_parity, run_suite
from m3lab.faults import apply_fault
from m3lab.needle import NeedleTarget, run_needle
from m3lab.params import load_params

PROFILE = load_params("cpu-tiny")
PROMPTS = [p.model_dump() for p in PROFILE.correctness.prompts]
CLAIMS = {c.id: c for c in PROFILE.claims}


class FaultRuns:
    """One server per fault, started on first use (one at a time), each check measured once and cached."""

    def __init__(self, checkpoint: Path, root: Path) -> None:
        self.checkpoint, self.root = checkpoint, root
        self.live: tuple[str, Any, str] | None = None  # (fault, ServerRecord, served folder)
        self.cache: dict[tuple[str, str], float] = {}

    def _server(self, fault: str) -> tuple[Any, str]:
        if self.live is None or self.live[0] != fault:
            self.close()
            served = serve.served_checkpoint("transformers", str(self.checkpoint), text_only=True, fault=fault)
            self.live = (fault, serve.start_server("transformers", served, CPU_SERVE, self.root / fault), served)
        return self.live[1], self.live[2]

    def close(self) -> None:
        if self.live is not None:
            serve.stop_all(self.root / self.live[0])
            self.live = None

    def measure(self, fault: str, check: str) -> float:
        """The number the stage reports for `check`: correctness.pass_rate, correctness.parity.match_rate (the
        mean over prompts), needle.accuracy."""
        if (fault, check) not in self.cache:
            rec, served = self._server(fault)
            server = rec.__dict__
            if check == "correctness":
                suite = run_suite(server, PROMPTS, PROFILE.correctness.max_tokens)
                value = sum(r.passed for r in suite) / len(suite)
            elif check == "parity":
                par = PROFILE.correctness.parity
                rows = run_parity(server, str(self.checkpoint), [p["prompt"] for p in PROMPTS], par.max_tokens,
                                  par.min_match_rate)
                value = round(sum(r.match_rate for r in rows) / len(rows), 4)
            else:
                target = NeedleTarget(base_url=rec.base_url, model=rec.model, tokenizer_dir=served,
                                      max_context=PROFILE.model.max_model_len)
                value = run_needle(target, PROFILE.needle).accuracy
            self.cache[(fault, check)] = value
        return self.cache[(fault, check)]

    def green(self, fault: str, check: str, claim: str) -> tuple[bool, float]:
        """(the profile's claim is reproduced, the measured value)."""
        c = CLAIMS[claim]
        value = self.measure(fault, check)
        return judge(c.claimed, value, c.tolerance.model_dump(exclude_none=True))[0], value


@pytest.fixture(scope="module")
def runs(trained_checkpoint, tmp_path_factory):
    r = FaultRuns(trained_checkpoint, tmp_path_factory.mktemp("fault-runs"))
    yield r
    r.close()


def test_the_claims_the_checks_are_judged_by():
    # what "red" means below: the embedded report's own thresholds
    assert CLAIMS["tiny-correctness"].measure == "pass_rate" and CLAIMS["tiny-correctness"].stage == "correctness"
    assert CLAIMS["tiny-parity"].measure == "parity.match_rate"
    assert CLAIMS["tiny-needle"].measure == "accuracy" and CLAIMS["tiny-needle"].stage == "needle"
    assert len(PROFILE.needle.lengths) * len(PROFILE.needle.depths) >= 20  # the full grid, not a 2-cell sample


# --------------------------------------------------------------------------------------------------------------
# The intact trained model: every check green (they must not fire)


def test_intact_model_passes_correctness(runs):
    ok, value = runs.green("none", "correctness", "tiny-correctness")
    assert ok and value == 1.0, value


def test_intact_model_passes_parity(runs):
    ok, value = runs.green("none", "parity", "tiny-parity")
    assert ok and value == 1.0, value


def test_intact_model_passes_the_needle(runs):
    ok, value = runs.green("none", "needle", "tiny-needle")
    assert ok, value


# --------------------------------------------------------------------------------------------------------------
# Shared experts loaded as zeros (card 002's silent failure): each check red on its own


def test_zero_shared_experts_turns_correctness_red(runs):
    ok, value = runs.green("zero_shared_experts", "correctness", "tiny-correctness")
    assert not ok and value < 1.0, f"the prompt suite must fail; pass rate {value}"


def test_zero_shared_experts_turns_parity_red(runs):
    ok, value = runs.green("zero_shared_experts", "parity", "tiny-parity")
    assert not ok and value < 1.0, f"serving parity must show the server no longer computes the checkpoint; {value}"


def test_zero_shared_experts_turns_the_needle_red(runs):
    ok, value = runs.green("zero_shared_experts", "needle", "tiny-needle")
    assert not ok, f"the needle must miss keys; accuracy {value} on the cpu-tiny grid"


# --------------------------------------------------------------------------------------------------------------


def test_wrong_rope_theta_is_caught_by_the_needle(runs):
    # One check, named: the needle's long prompts are where the RoPE base matters. Teacher-forced parity
    # catches it on its own too (tests/test_numerics.py).
    ok, value = runs.green("wrong_rope_theta", "needle", "tiny-needle")
    assert not ok, f"the needle must miss keys with the wrong RoPE base; accuracy {value}"


def test_faults_break_a_copy_never_the_checkpoint(trained_checkpoint, tmp_path):
    before = {p.name: p.read_bytes() for p in trained_checkpoint.iterdir() if p.is_file()}
    served = serve.served_checkpoint("transformers", str(trained_checkpoint), text_only=True,
                                     fault="zero_shared_experts")
    assert served.endswith(".text-transformers.fault-zero_shared_experts")
    assert {p.name: p.read_bytes() for p in trained_checkpoint.iterdir() if p.is_file()} == before
    with pytest.raises(ValueError, match="unknown fault 'nope'"):
        apply_fault(tmp_path, "nope")
