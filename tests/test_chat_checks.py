"""Chat checks (correctness.chat): reasoning and tool calls, judged on the parsed message.

Real parts: the trained tiny M3 (text-only) on `transformers serve` at 127.0.0.1, which returns M3's raw
`<mm:think>` and namespaced tool-call text, parsed by m3lab.parsers, with the embedded profile's own checks. The
engine-parsed path (vLLM's minimax_m3 parsers fill `tool_calls` and `reasoning_content` themselves) cannot run
here; a stand-in answers in that shape, and says so.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import CPU_SERVE, StandIn

from m3lab import serve
from m3lab.checkpoint import text_only
from m3lab.correctness import run_chat_check
from m3lab.params import load_params

CHECKS = {c["id"]: c for c in load_params("cpu-tiny").model_dump(mode="json")["correctness"]["chat"]}


@pytest.fixture(scope="module")
def server(trained_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    served = text_only(trained_checkpoint, root / "m.text-transformers", flavor="transformers")
    rec = serve.start_server("transformers", str(served), CPU_SERVE, root / "run")
    yield rec.__dict__
    serve.stop_all(root / "run")


def test_the_profiles_checks_pass_through_m3labs_parser(server):
    for check in CHECKS.values():
        r = run_chat_check(server, check)
        assert r["passed"], (check["id"], r["problems"], r["raw"])
        assert r["parser"] == "m3lab.parsers"  # transformers serve parses neither
    tool = run_chat_check(server, CHECKS["tool-call"])
    assert "]<]minimax[>[<invoke" in tool["raw"] and tool["message"]["content"] is None
    assert json.loads(tool["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    think = run_chat_check(server, CHECKS["reasoning"])
    assert "<mm:think>" in think["raw"] and "<mm:think>" not in think["message"]["content"]


def test_a_wrong_argument_or_a_missing_call_fails_and_says_which(server):
    wrong = copy.deepcopy(CHECKS["tool-call"])
    wrong["expect_tool"]["arguments"] = {"city": "Rome"}
    r = run_chat_check(server, wrong)
    assert not r["passed"] and r["problems"] == ["get_weather.city is 'Paris', expected 'Rome'"]
    no_tools = {**copy.deepcopy(CHECKS["reasoning"]), "expect_tool": {"name": "get_weather", "arguments": {}}}
    r = run_chat_check(server, no_tools)  # no tools offered: the model answers instead of calling
    assert not r["passed"] and r["problems"][0].startswith("no call to get_weather")


def test_an_engine_that_parsed_itself_is_read_as_it_answered():
    """Stand-in (a mock: vLLM cannot run here) answering as vLLM's minimax_m3 parsers do."""
    answer = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "reasoning_content": "I should call get_weather for Paris.",
        "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}}]}

    with StandIn(lambda body, n: (200, answer)) as s:
        r = run_chat_check(s.server, CHECKS["tool-call"])
    assert r["passed"] and r["parser"] == "the engine's"
