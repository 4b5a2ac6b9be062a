"""Numerics checks (m3lab.numerics): each must fire on a broken server and stay green on an intact one.

Real parts where they can exist here: the trained tiny M3 served by `transformers serve` on 127.0.0.1, with the
planted faults of m3lab.faults (`nan_routed_expert`: NaN logits, the signature vLLM 0.25.1 showed; and
`zero_shared_experts`), against offline transformers on the intact checkpoint, as the correctness stage runs
them. Two behaviours cannot be produced by any engine that runs on this CPU — a server whose greedy answers change
from request to request, and one whose prefix cache serves other numbers than a cold pass — so those two
detectors are tested against small stand-in servers that do exactly that, and say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import CPU_SERVE, StandIn
from transformers import AutoTokenizer

from m3lab import numerics, serve
from m3lab.params import Numerics
from m3lab.registry import ENGINES

CFG = {**Numerics().model_dump(), "lengths": [60, 127, 129], "edges": [], "max_tokens": 6, "repeats": 2,
       "batch": 3}


def test_nan_errors_are_recognised_and_other_errors_are_not():
    vllm = {"object": "error", "message": "Out of range float values are not JSON compliant: nan", "code": 400}
    assert numerics.is_nan_error(400, vllm)
    assert not numerics.is_nan_error(400, {"message": "max_tokens must be at least 1"})
    assert not numerics.is_nan_error(400, {"message": "finance is not a model"})
    assert not numerics.is_nan_error(500, vllm)


def test_the_nan_signature_is_a_run_of_token_zero():
    assert numerics.zero_token_run([0, 0, 0])
    assert not numerics.zero_token_run([0])  # one token 0 can be a real answer
    assert not numerics.zero_token_run([0, 5, 0])
    assert numerics.nan_signature("", [], "length", 8)  # token 0 is special: it decodes to nothing
    assert numerics.nan_signature("<unk><unk>", [0, 0], "stop", 8)
    assert not numerics.nan_signature("", [], "stop", 8)  # an answer that ended at once, on EOS
    assert not numerics.nan_signature(" 48213.", [5, 6, 7], "length", 8)


def test_probe_lengths_and_spread():
    assert numerics.probe_lengths([512, 4096], [127, 128, 512], 4000) == [127, 128, 512]
    assert numerics.spread([1, 2, 3, 4, 5], 3) == [1, 3, 5]
    assert numerics.spread([1, 2], 4) == [1, 2]


class Served:
    """One server per (engine, fault), started on first use, with the intact checkpoint's offline model."""

    def __init__(self, checkpoint: Path, root: Path) -> None:
        self.checkpoint, self.root = checkpoint, root
        self.live: tuple[tuple[str, str], Any] | None = None
        self.offline: numerics.OfflineModel | None = None

    def run(self, fault: str, engine: str = "transformers") -> dict[str, Any]:
        if self.live is None or self.live[0] != (engine, fault):
            self.close()
            served = serve.served_checkpoint(engine, str(self.checkpoint), text_only=True, fault=fault)
            self.live = ((engine, fault), serve.start_server(engine, served, CPU_SERVE, self.root / engine / fault))
        tok = AutoTokenizer.from_pretrained(self.live[1].model_dir)
        if self.offline is None:
            self.offline = numerics.OfflineModel(str(self.checkpoint), tok)
        meta = ENGINES.get(engine).meta
        return numerics.run_checks(self.live[1].__dict__, CFG, meta, tok, lambda: self.offline, [512], 4096)

    def close(self) -> None:
        if self.live is not None:
            engine, fault = self.live[0]
            serve.stop_all(self.root / engine / fault)
            self.live = None


@pytest.fixture(scope="module")
def served(trained_checkpoint, tmp_path_factory):
    s = Served(trained_checkpoint, tmp_path_factory.mktemp("numerics"))
    yield s
    s.close()


def test_an_intact_server_passes_every_check_that_can_run(served):
    r = served.run("none")
    assert r["lengths"] == [60, 127, 129]
    assert r["nonfinite"]["verdict"] == "pass" and r["nonfinite"]["findings"] == []
    assert r["determinism"]["verdict"] == "pass" and r["determinism"]["mismatch_rate"] == 0.0
    assert r["determinism"]["requests"] == 3 * (2 + 1)
    assert r["parity"]["verdict"] == "pass" and "greedy" in r["parity"]["method"]
    assert all(row["token_match_rate"] == 1.0 for row in r["parity"]["rows"])
    assert r["prefix_cache"] == {"verdict": "not run", "reason": "the engine has no prefix cache"}
    assert r["verdict"] == "pass"


def test_nan_logits_are_findings_with_the_prompt_length(served):
    r = served.run("nan_routed_expert")
    assert r["nonfinite"]["verdict"] == "fail"
    assert [f["n_tokens"] for f in r["nonfinite"]["findings"]] == r["measured_tokens"]
    assert all("token id 0" in f["kind"] for f in r["nonfinite"]["findings"])
    assert r["parity"]["verdict"] == "fail" and r["verdict"] == "fail"


def test_zeroed_shared_experts_fail_parity_at_length(served):
    r = served.run("zero_shared_experts")
    assert r["nonfinite"]["verdict"] == "pass"  # finite garbage is not a NaN finding...
    assert r["parity"]["verdict"] == "fail"  # ...but it is not what the checkpoint computes
    assert min(row["token_match_rate"] for row in r["parity"]["rows"]) < 1.0


# m3lab's reference engine returns vLLM's prompt_logprobs: teacher-forced parity for real, on CPU.


def test_teacher_forced_parity_passes_on_the_intact_model(served):
    r = served.run("none", engine="reference")
    assert r["parity"]["verdict"] == "pass" and r["parity"]["method"].startswith("teacher-forced")
    for row in r["parity"]["rows"]:  # same weights, same dtype, one thread: the numbers agree closely
        assert row["mean_abs_delta"] < 1e-3 and row["top1_agreement_sure"] == 1.0 and row["sure_positions"] > 0
    assert r["nonfinite"]["verdict"] == "pass" and r["nonfinite"]["logprobs"] == "requested"


def test_teacher_forced_parity_fails_on_zeroed_shared_experts(served):
    r = served.run("zero_shared_experts", engine="reference")
    assert r["parity"]["verdict"] == "fail"
    assert max(row["mean_abs_delta"] for row in r["parity"]["rows"]) > CFG["max_mean_abs_delta"]


def test_teacher_forced_parity_fails_on_a_wrong_rope_theta(served):
    """A loader that ignores rope_parameters (RoPE base 10,000 for 5,000,000): greedy text can survive it at
    these lengths, the logprobs do not."""
    r = served.run("wrong_rope_theta", engine="reference")
    assert r["parity"]["verdict"] == "fail"
    assert r["nonfinite"]["verdict"] == "pass"


def test_nan_logprobs_are_an_http_400_finding_on_an_engine_that_returns_them(served):
    r = served.run("nan_routed_expert", engine="reference")
    assert r["nonfinite"]["verdict"] == "fail"
    assert {f["kind"] for f in r["nonfinite"]["findings"]} == {"HTTP 400: NaN"}
    assert all(row.get("finding") == "HTTP 400: NaN" for row in r["parity"]["rows"])


# --------------------------------------------------------------------------------------------------------------
# Stand-ins (mocks, said so; conftest.StandIn): behaviours of GPU engines that nothing on this CPU has.


def _completion(text: str, logprobs: list[float] | None = None) -> dict[str, Any]:
    lp = None if logprobs is None else {"tokens": [], "token_logprobs": logprobs, "top_logprobs": [],
                                        "text_offset": []}
    return {"choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": "length"}]}


PROBES = [numerics.Probe(10, 10, "alpha", [1, 2]), numerics.Probe(20, 20, "beta", [3, 4])]


@pytest.mark.parametrize("flaky,verdict", [(False, "pass"), (True, "fail")])
def test_determinism_fires_only_on_answers_that_change(flaky, verdict):
    with StandIn(lambda body, n: (200, _completion(f"{body['prompt']} {n % 2 if flaky else 0}"))) as s:
        r = numerics.check_determinism(s.server, PROBES, 4, repeats=3, timeout_s=10)
    assert r["verdict"] == verdict and (r["mismatch_rate"] > 0) == flaky


@pytest.mark.parametrize("poisoned,verdict", [(False, "pass"), (True, "fail")])
def test_prefix_cache_ab_fires_only_when_cached_answers_differ(poisoned, verdict):
    salts: dict[str, int] = {}

    def answer(body, n):
        salts[body["cache_salt"]] = salts.get(body["cache_salt"], 0) + 1
        hit = salts[body["cache_salt"]] > 1  # a salt seen before: its blocks are cached
        return 200, _completion("0000" if hit and poisoned else "4821.", [-0.1, -0.2])

    with StandIn(answer) as s:
        r = numerics.check_prefix_cache(s.server, PROBES, 4, timeout_s=10)
    assert r["verdict"] == verdict
    assert all(row["same_tokens"] is not poisoned for row in r["rows"])


def test_an_engine_that_refuses_cache_salt_makes_the_ab_not_run_rather_than_red():
    refusal = {"error": {"message": "extra fields not permitted: cache_salt", "code": 400}}
    with StandIn(lambda body, n: (400, refusal)) as s:
        r = numerics.check_prefix_cache(s.server, PROBES, 4, timeout_s=10)
    assert r["verdict"] == "not run" and "refused a cache_salt request (HTTP 400" in r["reason"]
