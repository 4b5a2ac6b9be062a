"""Fault injection: a server broken the way a naive loader breaks it must be reported broken by the
correctness and parity checks (and the needle for a RoPE fault), while the intact model passes them all.

Real parts throughout: the trained tiny M3, `transformers serve` on 127.0.0.1, the correctness stage's own
functions. The broken copy is what the serve stage serves with `serve.fault`; parity compares it against the
intact checkpoint on disk, exactly as in a DAG run.
"""

import pytest
from conftest import CPU_SERVE

from m3lab import serve
from m3lab.correctness import run_parity, run_suite
from m3lab.faults import apply_fault
from m3lab.needle import NeedleTarget, run_needle
from m3lab.params import Needle, load_params

PROMPTS = [p.model_dump() for p in load_params("cpu-tiny").correctness.prompts]


def verdicts(trained_checkpoint, tmp_path, fault):
    served = serve.served_checkpoint("transformers", str(trained_checkpoint), text_only=True, fault=fault)
    rec = serve.start_server("transformers", served, CPU_SERVE, tmp_path / "run")
    try:
        server = rec.__dict__
        suite = run_suite(server, PROMPTS, max_tokens=12)
        parity = run_parity(server, str(trained_checkpoint), [p["prompt"] for p in PROMPTS], 16, 1.0)
        needle = run_needle(NeedleTarget(base_url=rec.base_url, model=rec.model, tokenizer_dir=served,
                                         max_context=4096), Needle(lengths=[1024], depths=[25, 75], max_tokens=8))
    finally:
        serve.stop_all(tmp_path / "run")
    return (sum(r.passed for r in suite) / len(suite), min(r.match_rate for r in parity), needle.accuracy)


def test_the_intact_trained_model_passes_every_check(trained_checkpoint, tmp_path):
    assert verdicts(trained_checkpoint, tmp_path, "none") == (1.0, 1.0, 1.0)


def test_shared_experts_loaded_as_zeros_are_caught(trained_checkpoint, tmp_path):
    pass_rate, match, _ = verdicts(trained_checkpoint, tmp_path, "zero_shared_experts")
    assert pass_rate < 1.0, "the prompt suite must fail"
    assert match < 1.0, "serving parity must show the server no longer computes the checkpoint"


def test_wrong_rope_theta_is_caught(trained_checkpoint, tmp_path):
    pass_rate, match, needle = verdicts(trained_checkpoint, tmp_path, "wrong_rope_theta")
    assert match < 1.0 or needle < 1.0, (pass_rate, match, needle)


def test_faults_break_a_copy_never_the_checkpoint(trained_checkpoint, tmp_path):
    before = {p.name: p.read_bytes() for p in trained_checkpoint.iterdir() if p.is_file()}
    served = serve.served_checkpoint("transformers", str(trained_checkpoint), text_only=True,
                                     fault="zero_shared_experts")
    assert served.endswith(".text-transformers.fault-zero_shared_experts")
    assert {p.name: p.read_bytes() for p in trained_checkpoint.iterdir() if p.is_file()} == before
    with pytest.raises(ValueError, match="unknown fault 'nope'"):
        apply_fault(tmp_path, "nope")
