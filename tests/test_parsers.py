"""m3lab.parsers: M3 reasoning and tool-call output -> OpenAI messages (text only, fast).

Part 1 ports vLLM's own test cases for its `minimax_m3` parsers, as data: their inputs and their expected
outputs, run against m3lab.parsers. Part 2 is m3lab's own tests.
"""

from __future__ import annotations

import copy
import json
import pickle
import random
from typing import Any

import pytest
from transformers.utils.chat_template_utils import render_jinja_template  # what apply_chat_template runs

from m3lab.parsers import (NS, TOOL_CALL_END, TOOL_CALL_START, Delta, ParsedToolCalls, ReasoningSplit,
                           ReasoningStream, ToolCall, ToolCallStream, count_reasoning_tokens,
                           parse_assistant_message, parse_tool_calls, reasoning_ended, split_reasoning)
from m3lab.tinymodel import CHAT_TEMPLATE

# =====================================================================================================
# Part 1: vLLM's test cases. The fixtures below are quoted from these files of vllm-project/vllm
# (Apache-2.0, Copyright contributors to the vLLM project); each case is named after the vLLM test it ports.
VLLM_TOOL_TESTS = "tests/tool_parsers/test_minimax_m3_tool_parser.py @ 06726266c0e0000947fca394f70a1148fda0ac46"
VLLM_REASONING_TESTS = "tests/reasoning/test_minimax_m3_reasoning_parser.py @ 0429c5c02ce6edd5fe2528d452f68d7e48e3d27c"
VLLM_RUST_TESTS = "rust/src/tool-parser/src/minimax_m3.rs @ 0b2052159fa7d39077ee50efbe7151dc9dacbfcf (#[cfg(test)])"
# vLLM's `test_..._registered` / `test_parser_registration` cases check vLLM's plugin registry and have no
# counterpart here. Streaming cases run through ToolCallStream / ReasoningStream; token-id cases run on
# the token texts (m3lab is text-only): extract_content_ids -> split_reasoning(...).content (None for []),
# is_reasoning_end -> reasoning_ended, count_reasoning_tokens -> count_reasoning_tokens.

NEW_REQUEST = object()  # in a chunk list: vLLM starts a new request on the same parser (previous text "")
UNCHECKED = object()  # an output the vLLM test does not check


def _stream_tools(chunks: list, tools: list | None, finish: bool) -> tuple[str, list[ToolCall], list[Delta]]:
    """Feed `chunks` to one ToolCallStream; joined content and calls since the last NEW_REQUEST."""
    stream, deltas = ToolCallStream(tools), []
    for chunk in chunks:
        if chunk is NEW_REQUEST:
            stream.reset()
            deltas = []
        else:
            deltas.append(stream.feed(chunk))
    if finish:
        deltas.append(stream.finish())
    return "".join(d.content or "" for d in deltas), [c for d in deltas for c in d.tool_calls], deltas


# --- tests/tool_parsers/test_minimax_m3_tool_parser.py ----------------------------------------------

ORDER_TOOLS = [{"type": "function", "function": {"name": "create_order", "parameters": {  # sample_tools()
    "type": "object",
    "properties": {
        "user_id": {"type": "integer"},
        "urgent": {"type": "boolean"},
        "note": {"type": "string"},
        "shipping": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}}},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer"}}}},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "duplicate_demo": {"type": "object"},
    },
}}}]


def build_order_call() -> str:
    return (
        f"{NS}<tool_call>\n"
        f'{NS}<invoke name="create_order">'
        f"{NS}<user_id>42{NS}</user_id>"
        f"{NS}<urgent>true{NS}</urgent>"
        f"{NS}<note>Please leave at front desk.{NS}</note>"
        f"{NS}<shipping>"
        f"{NS}<city>Singapore{NS}</city>"
        f"{NS}<zip>018956{NS}</zip>"
        f"{NS}</shipping>"
        f"{NS}<items>"
        f"{NS}<item>{NS}<sku>book-001{NS}</sku>{NS}<qty>2{NS}</qty>{NS}</item>"
        f"{NS}<item>{NS}<sku>pen-007{NS}</sku>{NS}<qty>5{NS}</qty>{NS}</item>"
        f"{NS}</items>"
        f"{NS}<metadata>"
        f"{NS}<source>mobile{NS}</source>"
        f"{NS}<campaign>may-launch{NS}</campaign>"
        f"{NS}</metadata>"
        f"{NS}<duplicate_demo>"
        f"{NS}<tag>a{NS}</tag>"
        f"{NS}<tag>b{NS}</tag>"
        f"{NS}</duplicate_demo>"
        f"{NS}</invoke>\n"
        f"{NS}</tool_call>"
    )


def build_order_invocation(user_id: int) -> str:
    return f'{NS}<invoke name="create_order">{NS}<user_id>{user_id}{NS}</user_id>{NS}</invoke>'


def build_multiple_order_call() -> str:
    return f"{NS}<tool_call>\n{build_order_invocation(1)}\n{build_order_invocation(2)}\n{NS}</tool_call>"


ORDER_ARGUMENTS = {
    "user_id": 42,
    "urgent": True,
    "note": "Please leave at front desk.",
    "shipping": {"city": "Singapore", "zip": 18956},
    "items": [{"sku": "book-001", "qty": 2}, {"sku": "pen-007", "qty": 5}],
    "metadata": {"source": "mobile", "campaign": "may-launch"},
    "duplicate_demo": {"tag": ["a", "b"]},
}
PARTIAL_START = f"plain {NS}<tool_ca"
FIRST_INVOCATION = build_order_invocation(1)
SECOND_SUFFIX = f'\n{NS}<invoke name="create_order">{NS}<user_id>2'
RECOVERY_TEXT = f"plain {NS}<tool_call>\n{FIRST_INVOCATION}{SECOND_SUFFIX}"
INVALID_BLOCK = f"{NS}<tool_call>\n{NS}</user_id>"
ORDER_CALL = build_order_call()

# Non-streaming: extract_tool_calls(text) -> (tools_called, content, [(name, arguments)]).
VLLM_TOOL_EXTRACT_CASES = [
    ("test_non_streaming_nested_tool_call", "I will create it.\n" + ORDER_CALL,
     True, "I will create it.\n", [("create_order", ORDER_ARGUMENTS)]),
    ("test_non_streaming_without_tool_call_keeps_content", "plain response", False, "plain response", []),
    ("test_non_streaming_multiple_tool_calls", build_multiple_order_call(),
     True, None, [("create_order", {"user_id": 1}), ("create_order", {"user_id": 2})]),
    ("test_streaming_flushes_partial_tool_start_as_text", PARTIAL_START, False, PARTIAL_START, []),
]

# Streaming: chunks (then finish_streaming() if `finish`) -> joined content, [(name, arguments)].
VLLM_TOOL_STREAM_CASES = [
    ("test_streaming_without_tool_call_emits_text", ["plain ", "response"], False, "plain response", []),
    ("test_streaming_flushes_partial_tool_start_as_text", [PARTIAL_START[:8], PARTIAL_START[8:]], True,
     PARTIAL_START, []),
    ("test_streaming_error_recovery_keeps_committed_tool_call_structured",
     [RECOVERY_TEXT[:8], RECOVERY_TEXT[8:len(RECOVERY_TEXT) - 7], RECOVERY_TEXT[-7:]], True,
     "plain " + SECOND_SUFFIX, [("create_order", {"user_id": 1})]),
    ("test_streaming_parse_error_emits_buffer_and_later_deltas", [INVALID_BLOCK, " after error"], False,
     f"\n{NS}</user_id> after error", []),
    ("test_streaming_parser_reuse_after_parse_error",
     [INVALID_BLOCK, " after error", NEW_REQUEST, "next request text"], False, "next request text", []),
    ("test_delegating_parser_flushes_partial_tool_start_on_finish", [PARTIAL_START[:8], PARTIAL_START[8:]],
     True, PARTIAL_START, []),  # vLLM's DelegatingParser with finished=True on the last delta
    ("test_streaming_nested_tool_call",
     ["I will create it.\n", ORDER_CALL[:5], ORDER_CALL[5:17], ORDER_CALL[17:120], ORDER_CALL[120:], ""],
     False, "I will create it.\n", [("create_order", ORDER_ARGUMENTS)]),
]


@pytest.mark.parametrize("name, text, tools_called, content, calls", VLLM_TOOL_EXTRACT_CASES,
                         ids=[c[0] for c in VLLM_TOOL_EXTRACT_CASES])
def test_vllm_tool_parser_extract(name, text, tools_called, content, calls):
    parsed = parse_tool_calls(text, ORDER_TOOLS)
    assert parsed.tools_called is tools_called
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls


@pytest.mark.parametrize("name, chunks, finish, content, calls", VLLM_TOOL_STREAM_CASES,
                         ids=[c[0] for c in VLLM_TOOL_STREAM_CASES])
def test_vllm_tool_parser_streaming(name, chunks, finish, content, calls):
    got_content, got_calls, deltas = _stream_tools(chunks, ORDER_TOOLS, finish)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert all(c.id for c in got_calls)
    if name == "test_streaming_error_recovery_keeps_committed_tool_call_structured":
        assert FIRST_INVOCATION not in got_content
    if name == "test_streaming_nested_tool_call":  # the call arrives whole, in a delta without content
        last = [d for d in deltas if d.content or d.tool_calls][-1]
        assert last.content is None and last.tool_calls[0].arguments["items"][1]["qty"] == 5


# --- tests/reasoning/test_minimax_m3_reasoning_parser.py -------------------------------------------

# extract_reasoning(text), thinking_mode="enabled" or not -> (reasoning, content).
VLLM_REASONING_EXTRACT_CASES = [
    ("test_nonstreaming_extracts_explicit_reasoning_block", "<mm:think>plan</mm:think>answer", False,
     "plan", "answer"),
    ("test_nonstreaming_without_start_tag_is_content", "plain answer", False, None, "plain answer"),
    ("test_nonstreaming_drops_leading_end_tag", "</mm:think>answer", False, None, "answer"),
    ("test_nonstreaming_non_leading_end_tag_is_content", "XXX</mm:think>YYY", False, None, "XXX</mm:think>YYY"),
    ("test_nonstreaming_enabled_mode_starts_in_reasoning", "plan</mm:think>answer", True, "plan", "answer"),
    ("test_nonstreaming_open_reasoning_block", "<mm:think>still thinking", False, "still thinking", None),
]

# Streaming: chunks -> joined reasoning, joined content, is_reasoning_end_streaming after each chunk
# (None where vLLM does not check it). The "split marker" cases differ in vLLM only in how its fake
# tokenizer splits the markers into token ids; as text they are the same.
VLLM_REASONING_STREAM_CASES = [
    ("test_streaming_reasoning_tags_are_not_returned", ["<mm:think>", "plan", "</mm:think>", "answer"], False,
     "plan", "answer", [False, False, True, True]),
    ("test_streaming_boundary_can_emit_reasoning_and_content", ["<mm:think>plan</mm:think>answer"], False,
     "plan", "answer", [True]),
    ("test_streaming_drops_leading_end_tag", ["</mm:think>", "answer"], False, None, "answer", [True, True]),
    ("test_streaming_non_leading_end_tag_is_content", ["XXX</mm:think>YYY"], False,
     None, "XXX</mm:think>YYY", [True]),
    ("test_streaming_enabled_mode_starts_in_reasoning", ["plan", "</mm:think>", "answer"], True,
     "plan", "answer", [False, True, True]),
    ("test_streaming_plain_content_ends_reasoning_phase", ["plain ", "answer"], False,
     None, "plain answer", [True, True]),
    ("test_streaming_split_marker_tokens_are_not_returned",
     ["<mm:think>", "Reasoning", " content", "</mm:think>", "content"], False,
     "Reasoning content", "content", [False, False, False, True, True]),
    ("test_streaming_split_marker_text_drives_end_state", ["<mm:think>", "Reasoning", " content", "</mm:think>"],
     False, "Reasoning content", None, [None, None, None, True]),
    ("test_streaming_split_end_marker_content_ids_are_stripped", ["<mm:think>Reasoning", "</mm:think>content"],
     False, "Reasoning", "content", [None, True]),  # the second delta's content is exactly "content"
    ("test_streaming_split_marker_tokens_enabled_mode", ["Reasoning", " content", "</mm:think>", "content"], True,
     "Reasoning content", "content", [False, False, True, True]),
    ("test_streaming_split_marker_text_across_deltas",
     ["<mm:", "think>", "Reasoning", " content", "</mm:", "think>", "content"], False,
     "Reasoning content", "content", [False, False, False, False, False, True, True]),
    ("test_streaming_split_leading_end_marker_text_across_deltas", ["</mm:", "think>", "content"], False,
     None, "content", [False, True, True]),
]


def _special_marker_tokens(text: str) -> list[str]:
    """vLLM's MiniMaxM3Tokenizer: the two markers are single tokens, everything else one per character."""
    tokens, pos = [], 0
    while pos < len(text):
        marker = next((m for m in ("<mm:think>", "</mm:think>") if text.startswith(m, pos)), text[pos])
        tokens.append(marker)
        pos += len(marker)
    return tokens


TOKENIZERS = {"MiniMaxM3Tokenizer": _special_marker_tokens, "SplitMiniMaxM3Tokenizer": list}

# Token-id helpers on one text: is_reasoning_end, extract_content_ids (as text; None for []), and
# count_reasoning_tokens (None where vLLM does not check it).
VLLM_REASONING_TOKEN_CASES = [
    ("test_token_id_helpers_with_split_marker_tokens", "SplitMiniMaxM3Tokenizer", "<mm:think>abc</mm:think>def",
     False, True, "def", 3),
    ("test_token_id_helpers_with_split_marker_tokens", "SplitMiniMaxM3Tokenizer", "<mm:think>abc",
     False, False, None, None),
    ("test_token_id_helpers_with_split_marker_tokens", "SplitMiniMaxM3Tokenizer", "plain", False, False, "plain", None),
    ("test_token_id_helpers", "MiniMaxM3Tokenizer", "<mm:think>abc</mm:think>def", False, True, "def", 3),
    ("test_token_id_helpers", "MiniMaxM3Tokenizer", "<mm:think>abc", False, False, None, None),
    ("test_token_id_helpers", "MiniMaxM3Tokenizer", "plain", False, False, "plain", None),
    ("test_token_id_helpers_enabled_mode", "MiniMaxM3Tokenizer", "abc</mm:think>def", True, True, "def", 3),
    ("test_token_id_helpers_enabled_mode", "MiniMaxM3Tokenizer", "abc", True, False, None, 3),
    ("test_is_reasoning_end_ignores_paired_prompt_examples_with_thinking_enabled", "MiniMaxM3Tokenizer",
     "Use <mm:think></mm:think> for reasoning.", True, False, UNCHECKED, None),
]


@pytest.mark.parametrize("name, text, enabled, reasoning, content", VLLM_REASONING_EXTRACT_CASES,
                         ids=[c[0] for c in VLLM_REASONING_EXTRACT_CASES])
def test_vllm_reasoning_parser_extract(name, text, enabled, reasoning, content):
    assert split_reasoning(text, started_in_reasoning=enabled) == (reasoning, content)


@pytest.mark.parametrize("name, chunks, enabled, reasoning, content, ended", VLLM_REASONING_STREAM_CASES,
                         ids=[c[0] for c in VLLM_REASONING_STREAM_CASES])
def test_vllm_reasoning_parser_streaming(name, chunks, enabled, reasoning, content, ended):
    stream = ReasoningStream(started_in_reasoning=enabled)
    deltas, states = [], []
    for chunk in chunks:
        deltas.append(stream.feed(chunk))
        states.append(stream.ended)
    assert ("".join(d.reasoning or "" for d in deltas) or None) == reasoning
    assert ("".join(d.content or "" for d in deltas) or None) == content
    assert [s if want is not None else None for s, want in zip(states, ended)] == ended
    if name == "test_streaming_split_end_marker_content_ids_are_stripped":
        assert deltas[-1].content == "content"


@pytest.mark.parametrize("name, tokenizer, text, enabled, ended, content, count", VLLM_REASONING_TOKEN_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in VLLM_REASONING_TOKEN_CASES])
def test_vllm_reasoning_parser_token_helpers(name, tokenizer, text, enabled, ended, content, count):
    assert reasoning_ended(text, started_in_reasoning=enabled) is ended
    if content is not UNCHECKED:
        assert split_reasoning(text, started_in_reasoning=enabled).content == content
    if count is not None:
        assert count_reasoning_tokens(TOKENIZERS[tokenizer](text), started_in_reasoning=enabled) == count


# --- rust/src/tool-parser/src/minimax_m3.rs (the Rust parser vLLM's minimax_m3 tool parser runs) ----

def element(name: str, body: str) -> str:
    return f"{NS}<{name}>{body}{NS}</{name}>"


def invoke(function_name: str, body: str) -> str:
    return f'{NS}<invoke name="{function_name}">{body}{NS}</invoke>'


def build_tool_block(*invokes: tuple[str, str]) -> str:
    return f"{TOOL_CALL_START}\n" + "\n".join(invoke(n, b) for n, b in invokes) + f"\n{TOOL_CALL_END}"


def split_by_chars(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def _fn(name: str, properties: dict) -> dict:
    return {"name": name, "parameters": {"type": "object", "properties": properties}}


RUST_TOOLS = [  # test_utils.rs test_tools() + m3_test_tools()'s create_order
    _fn("get_weather", {**{k: {"type": "string"} for k in ("location", "city", "state", "unit", "date")},
                        "days": {"type": "integer"}}),
    _fn("add", {"x": {"type": "integer"}, "y": {"type": "integer"}}),
    _fn("convert", {"whole": {"type": "number"}, "flag": {"type": "boolean"}, "payload": {"type": "object"},
                    "items": {"type": "array"}, "empty": {"type": "string"}}),
    _fn("calculate_area", {"shape": {"type": "string"}, "dimensions": {"type": "object"},
                           "precision": {"type": "integer"}}),
    _fn("update_record", {"data": {"anyOf": [{"type": "object"}, {"type": "null"}]}}),
    _fn("create_order", {
        "user_id": {"type": "integer"}, "urgent": {"type": "boolean"}, "note": {"type": "string"},
        "shipping": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}}},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer"}}}},
        "metadata": {"type": "object", "additionalProperties": {"type": "integer"}},
        "duplicate_demo": {"type": "object", "properties": {"tag": {"type": "string"}}},
        "schema_mismatch_array": {"type": "array", "items": {"type": "integer"}},
    }),
]
RUST_ORDER_ARGUMENTS = "".join([
    element("user_id", "42"), element("urgent", "true"), element("note", "Please leave at front desk."),
    element("shipping", element("city", "Singapore") + element("zip", "018956")),
    element("items", element("item", element("sku", "book-001") + element("qty", "2"))
            + element("item", element("sku", "pen-007") + element("qty", "5"))),
    element("metadata", element("score", "42") + element("rank", "7")),
    element("duplicate_demo", element("tag", "a") + element("tag", "b")),
    element("schema_mismatch_array", element("x", "1") + element("x", "2")),
    element("unknown_struct", element("a", "1") + element("a", "2")),
])
SEATTLE = ("get_weather", element("city", "Seattle"))
OPEN_INVOKE = f'{TOOL_CALL_START}{NS}<invoke name="get_weather">'

# parse_complete(text) -> (content, [(name, arguments)]); vLLM's bridge turns empty normal_text into None.
VLLM_RUST_COMPLETE_CASES = [
    ("minimax_m3_parse_complete_without_tool_call_keeps_text", "Hello, world!", "Hello, world!", []),
    ("minimax_m3_parse_complete_extracts_single_tool_call",
     build_tool_block(("get_weather", element("city", "Seattle") + element("days", "5"))),
     None, [("get_weather", {"city": "Seattle", "days": 5})]),
    ("minimax_m3_parse_complete_preserves_prefix_and_ignores_trailing_text",
     f"Let me check. {build_tool_block(SEATTLE)} This trailing text is ignored.",
     "Let me check. ", [("get_weather", {"city": "Seattle"})]),
    ("minimax_m3_parse_complete_extracts_multiple_invokes",
     build_tool_block(SEATTLE, ("get_weather", element("city", "NYC"))),
     None, [("get_weather", {"city": "Seattle"}), ("get_weather", {"city": "NYC"})]),
    ("minimax_m3_invoke_body_junk_drops_rest_of_invoke",
     build_tool_block(("get_weather", element("city", "Seattle") + "I need to use the city above."
                       + element("days", "5"))),
     None, [("get_weather", {"city": "Seattle"})]),
    ("minimax_m3_parse_complete_converts_schema_types",
     build_tool_block(("convert", element("whole", "5.0") + element("flag", "true")
                       + element("payload", '{"nested":true}') + element("items", "[1,2]")
                       + element("empty", "42"))),
     None, [("convert", {"whole": 5.0, "flag": True, "payload": {"nested": True}, "items": [1, 2],
                         "empty": "42"})]),
    ("minimax_m3_parse_complete_converts_nested_arguments", build_tool_block(("create_order", RUST_ORDER_ARGUMENTS)),
     None, [("create_order", {
         "user_id": 42, "urgent": True, "note": "Please leave at front desk.",
         "shipping": {"city": "Singapore", "zip": 18956},
         "items": [{"sku": "book-001", "qty": 2}, {"sku": "pen-007", "qty": 5}],
         "metadata": {"score": 42, "rank": 7},
         "duplicate_demo": {"tag": ["a", "b"]},
         "schema_mismatch_array": [1, 2],
         "unknown_struct": {"a": ["1", "2"]}})]),
    ("minimax_m3_parse_complete_handles_multiline_leaf_parameters",
     build_tool_block(("calculate_area", element("shape", "\nrectangle\n")
                       + element("dimensions", '{"width":10,"height":20}') + element("precision", "2"))),
     None, [("calculate_area", {"shape": "\nrectangle\n", "dimensions": {"width": 10, "height": 20},
                                "precision": 2})]),
    ("minimax_m3_finish_recovers_completed_invoke_with_whitespace_tail",
     f"{TOOL_CALL_START}\n{invoke(*SEATTLE)}\n  \n", None, [("get_weather", {"city": "Seattle"})]),
    ("minimax_m3_mixed_content_is_preserved_as_text_field",
     build_tool_block(("convert", element("payload", f"text before {element('child', 'value')} text after"))),
     None, [("convert", {"payload": {"child": "value", "$text": "text before  text after"}})]),
    ("minimax_m3_mixed_text_field_avoids_child_name_collision",
     build_tool_block(("convert", element("payload", "text" + element("$text", "child text")
                                          + element("child", "value")))),
     None, [("convert", {"payload": {"$text": "child text", "$$text": "text", "child": "value"}})]),
]

# Streaming: chunks (then finish() if `finish`) -> joined content, number of calls, where the parse
# fails ("feed", "finish" or None; m3lab reports it as a warning instead of raising).
VLLM_RUST_STREAM_CASES = [
    ("minimax_m3_streaming_extracts_single_tool_call", [TOOL_CALL_START, invoke(*SEATTLE), TOOL_CALL_END], True,
     "", 1, None),
    ("minimax_m3_streaming_preserves_prefix_text",
     ["Let me check. ", TOOL_CALL_START, invoke(*SEATTLE), TOOL_CALL_END], True, "Let me check. ", 1, None),
    ("minimax_m3_streaming_without_tool_call_emits_text_incrementally", ["Hello, ", "world!"], True,
     "Hello, world!", 0, None),
    ("minimax_m3_streaming_handles_marker_split_across_chunks", split_by_chars(build_tool_block(SEATTLE), 3), True,
     "", 1, None),
    ("minimax_m3_streaming_extracts_multiple_invokes_in_order",
     split_by_chars(build_tool_block(SEATTLE, ("get_weather", element("city", "NYC"))), 7), True, "", 2, None),
    ("minimax_m3_streaming_does_not_emit_incomplete_tool_call", [OPEN_INVOKE], False, "", 0, None),
    ("minimax_m3_streaming_ignores_text_after_tool_block", split_by_chars(build_tool_block(SEATTLE) + " ignored", 5),
     True, "", 1, None),
    ("minimax_m3_finish_fails_incomplete_tool_call", [OPEN_INVOKE], True, None, 0, "finish"),
    ("minimax_m3_finish_recovers_after_bare_tool_block_start", [TOOL_CALL_START], True, "", 0, None),
    ("minimax_m3_finish_fails_partial_outer_end_marker",
     [f"{TOOL_CALL_START}\n{invoke(*SEATTLE)}\n{TOOL_CALL_END[:3]}"], True, None, 1, "finish"),
    ("minimax_m3_malformed_tool_call_fails_fast", [f"{TOOL_CALL_START}{NS}<bad>{TOOL_CALL_END}"], False,
     None, 0, "feed"),
]


@pytest.mark.parametrize("name, text, content, calls", VLLM_RUST_COMPLETE_CASES,
                         ids=[c[0] for c in VLLM_RUST_COMPLETE_CASES])
def test_vllm_rust_tool_parser_complete(name, text, content, calls):
    parsed = parse_tool_calls(text, RUST_TOOLS)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls


@pytest.mark.parametrize("name, chunks, finish, content, n_calls, fails", VLLM_RUST_STREAM_CASES,
                         ids=[c[0] for c in VLLM_RUST_STREAM_CASES])
def test_vllm_rust_tool_parser_streaming(name, chunks, finish, content, n_calls, fails):
    got_content, calls, deltas = _stream_tools(chunks, RUST_TOOLS, finish)
    assert len(calls) == n_calls
    failed_at = next((("finish" if finish and i == len(deltas) - 1 else "feed") for i, d in enumerate(deltas)
                      if any(not w.startswith("text after </tool_call>") for w in d.warnings)), None)
    assert failed_at == fails
    if content is not None:  # where Rust fails, vLLM's bridge flushes the unparsed text as content instead
        assert got_content == content
    if name == "minimax_m3_streaming_extracts_multiple_invokes_in_order":
        assert [c.arguments for c in calls] == [{"city": "Seattle"}, {"city": "NYC"}]


# =====================================================================================================
# Part 2: m3lab's own tests. Where one contradicted vLLM's behaviour it now follows vLLM and says so.

# Verbatim from the MiniMax-M3-oQ4 model card (seed 003), "Tool-call format".
CARD_EXAMPLE = ("]<]minimax[>[<tool_call>]<]minimax[>[<invoke name=\"FUNC\">]<]minimax[>[<param>value]<]minimax[>["
                "</param>]<]minimax[>[</invoke>]<]minimax[>[</tool_call>")

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string"}, "zip": {"type": "string"}, "days": {"type": "integer"},
                   "tags": {"type": "array", "items": {"type": "string"}}},
}}}


def assistant_part(messages: list[dict], **kwargs) -> str:
    """Render through the tiny model's template and keep what the model itself would have generated."""
    rendered, _ = render_jinja_template([messages], chat_template=CHAT_TEMPLATE, **kwargs)
    text = rendered[0]
    start = text.rindex("]~b]ai\n") + len("]~b]ai\n")
    return text[start:text.index("[e~[", start)]


def call(name: str, arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def schema_of(value: Any) -> dict:
    """A JSON schema that `value` satisfies (lists: the union of their items' schemas)."""
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, (int, float, str)):
        return {"type": {int: "integer", float: "number", str: "string"}[type(value)]}
    if isinstance(value, dict):
        return {"type": "object", "properties": {k: schema_of(v) for k, v in value.items()}}
    items: list[dict] = []
    for item in value:
        if (s := schema_of(item)) not in items:
            items.append(s)
    return {"type": "array", **({"items": items[0] if len(items) == 1 else {"anyOf": items}} if items else {})}


# --- the card's format ------------------------------------------------------------------------------

def test_card_example_verbatim():
    content, calls = parse_tool_calls(CARD_EXAMPLE)
    assert content is None  # vLLM: no text before the block -> None (m3lab used to give "")
    assert len(calls) == 1 and isinstance(calls[0], ToolCall)
    wire = calls[0].to_dict()
    assert wire["type"] == "function" and wire["id"].startswith("call_")
    assert wire["function"] == {"name": "FUNC", "arguments": '{"param":"value"}'}  # compact, as vLLM writes it
    assert parse_tool_calls(CARD_EXAMPLE).warnings == []


def test_card_example_without_markers_is_plain_text():
    # A skip_special_tokens decode of the real tokenizer drops token 200058. vLLM's parser needs the marked
    # opener, so this is content (m3lab used to parse it); the warning says why nothing was called.
    text = CARD_EXAMPLE.replace(NS, "")
    parsed = parse_tool_calls(text)
    assert parsed == (text, []) and "opener" in parsed.warnings[0]


def test_text_without_markup_passes_through_unchanged():
    for text in ["", "Hello, world.", "  spaced \n\n", "a < b and c > d", "日本の首都は東京です。",
                 "use <b>bold</b> and <invoke> words", "I was thinking about </ things"]:
        assert parse_tool_calls(text) == (text, [])
        assert split_reasoning(text) == (None, text)
        msg = parse_assistant_message(text)
        assert msg["content"] == text  # as vLLM: whitespace is content too (m3lab used to give None)
        assert msg["reasoning_content"] is None and msg["tool_calls"] == []


# --- round trips through m3lab's own chat template ----------------------------------------------------

@pytest.mark.parametrize("arguments", [
    {"city": "Tokyo"},
    {"city": "東京", "note": "日本語の値 🙂", "days": 3, "ratio": 0.25, "metric": True, "exact": False},
    {"filter": {"min": -2, "max": 1e-3, "unit": {"name": "celsius"}}, "ids": [1, 2, 3]},
    {"rows": [{"k": "a", "v": [True, "x"]}, {"k": "b", "v": []}], "grid": [[1, 2], [3]]},
    {"code": "if a < b:\n    print('<b>x</b>')\n", "html": "<p>hi</p>", "spaces": "  padded  "},
    {"raw_json": {"nested": {"deep": [{"x": 1}]}}},
])
def test_template_rendering_round_trips(arguments):
    # As in vLLM, values are typed by the tool's schema only (m3lab used to guess types without one).
    tools = [{"type": "function", "function": {"name": "do_it", "parameters": schema_of(arguments)}}]
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [call("do_it", arguments)]}]
    text = assistant_part(messages)
    assert text.startswith("Let me check." + NS + "<tool_call>\n")
    msg = parse_assistant_message(text, tools=tools)
    assert "warnings" not in msg
    assert msg["content"] == "Let me check."
    [tc] = msg["tool_calls"]
    assert tc["function"]["name"] == "do_it"
    assert json.loads(tc["function"]["arguments"]) == arguments  # an empty list reads back as [] by its schema


def test_round_trip_with_schema_keeps_declared_strings_and_empty_arrays():
    arguments = {"city": "Tokyo", "zip": "100", "days": 3, "tags": []}
    text = assistant_part([{"role": "user", "content": "go"},
                           {"role": "assistant", "content": "", "tool_calls": [call("get_weather", arguments)]}])
    # Without a schema every leaf is its text, as in vLLM (m3lab used to read "100" and "3" as numbers).
    assert parse_tool_calls(text)[1][0].arguments == {"city": "Tokyo", "zip": "100", "days": "3", "tags": ""}
    [tc] = parse_tool_calls(text, tools=[WEATHER_TOOL])[1]
    assert tc.arguments == arguments


def test_round_trip_of_json_string_arguments():
    # Clients send history back with OpenAI's JSON-string arguments; the template writes that string as is.
    # vLLM reads an invoke body that is not argument tags as no arguments (m3lab used to json.loads it).
    arguments = json.dumps({"city": "大阪", "days": 2}, ensure_ascii=False)
    text = assistant_part([{"role": "user", "content": "go"},
                           {"role": "assistant", "content": None, "tool_calls": [call("get_weather", arguments)]}])
    [tc] = parse_tool_calls(text, tools=[WEATHER_TOOL])[1]
    assert tc.name == "get_weather" and tc.arguments == {}


def test_round_trip_with_reasoning_and_several_calls():
    calls = [call("get_weather", {"city": "Tokyo"}), call("get_weather", {"city": "Kyoto"}),
             call("calculator", {"expression": "12 * 7"})]
    messages = [{"role": "user", "content": "Weather in Tokyo and Kyoto, and 12*7?"},
                {"role": "assistant", "reasoning_content": "Three calls are needed.", "content": "",
                 "tool_calls": calls}]
    text = assistant_part(messages)
    assert text.startswith("<mm:think>Three calls are needed.</mm:think>" + NS)
    msg = parse_assistant_message(text)
    assert msg["reasoning_content"] == "Three calls are needed." and msg["content"] is None
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]]
    assert got == [("get_weather", {"city": "Tokyo"}), ("get_weather", {"city": "Kyoto"}),
                   ("calculator", {"expression": "12 * 7"})]
    assert len({c["id"] for c in msg["tool_calls"]}) == 3


def test_generation_prompt_opens_the_think_block():
    # thinking_mode="enabled" prefills <mm:think>: the generation holds only the closer
    prompt, _ = render_jinja_template([[{"role": "user", "content": "hi"}]], chat_template=CHAT_TEMPLATE,
                                      add_generation_prompt=True, thinking_mode="enabled")
    assert prompt[0].endswith("<mm:think>")
    generated = "The user greets me.</mm:think>Hello!"
    assert split_reasoning(generated, started_in_reasoning=True) == ("The user greets me.", "Hello!")
    # Not told about the prefill, vLLM reads a closer after text as content (m3lab used to infer the prefill).
    assert split_reasoning(generated) == (None, generated)
    cut = split_reasoning("The user greets", started_in_reasoning=True)
    assert cut == ("The user greets", None) and cut.unterminated


# --- reasoning ------------------------------------------------------------------------------------

def test_think_blocks_are_split_verbatim():
    # vLLM trims nothing, keeps an empty block's reasoning as "" and knows only M3's own tags (m3lab used
    # to strip the seams, give None for an empty block and also accept <think>).
    assert split_reasoning("<mm:think>\nplan\n</mm:think>\n\nAnswer.") == ("\nplan\n", "\n\nAnswer.")
    assert split_reasoning("<mm:think></mm:think>Answer.") == ("", "Answer.")
    assert split_reasoning("<think>plan</think>Answer.") == (None, "<think>plan</think>Answer.")
    assert split_reasoning("Intro <mm:think>plan</mm:think> end") == ("plan", "Intro  end")
    assert not split_reasoning("<mm:think>plan</mm:think>Answer.").unterminated


def test_unterminated_think_block_is_all_reasoning_and_flagged():
    split = split_reasoning("<mm:think>I need to think about 日本 and")
    assert split == ("I need to think about 日本 and", None) and split.unterminated
    msg = parse_assistant_message("<mm:think>I need to think")
    assert msg["reasoning_content"] == "I need to think" and msg["content"] is None
    assert "never closed" in msg["warnings"][0]


def test_lone_closer_when_thinking_was_disabled():
    assert split_reasoning("</mm:think>Hi", started_in_reasoning=False) == (None, "Hi")
    assert split_reasoning("Hi</mm:think>there", started_in_reasoning=False) == (None, "Hi</mm:think>there")
    assert split_reasoning("</mm:think>Hi") == (None, "Hi")
    assert split_reasoning("</mm:think>") == (None, None)


def test_tool_markup_inside_reasoning_is_not_a_call():
    text = f"<mm:think>maybe {NS}<tool_call>{NS}<invoke name=\"x\">{NS}</invoke>{NS}</tool_call></mm:think>No."
    msg = parse_assistant_message(text)
    assert msg["tool_calls"] == [] and msg["content"] == "No."
    # vLLM passes the thoughts on verbatim, markers included (m3lab used to strip them)
    assert msg["reasoning_content"] == text[len("<mm:think>"):text.index("</mm:think>")]


def test_reasoning_ended_and_token_count():
    assert not reasoning_ended("no markers") and not reasoning_ended("", started_in_reasoning=True)
    assert reasoning_ended("<mm:think>a</mm:think>b<mm:think>c</mm:think>")
    assert not reasoning_ended("<mm:think>a</mm:think>b<mm:think>c")
    assert reasoning_ended("a</mm:think>b", started_in_reasoning=True)
    tokens = ["<mm:think>", "ab", "c", "</mm:", "think>", "d"]  # a closer split over two tokens
    assert count_reasoning_tokens(tokens) == 2
    assert count_reasoning_tokens(["x", "y</mm:think>", "z"], started_in_reasoning=True) == 1


def test_reasoning_stream_holds_back_partial_markers():
    stream = ReasoningStream(started_in_reasoning=True)
    assert stream.feed("thinking </mm") == Delta(reasoning="thinking ")
    assert not stream.ended
    assert stream.feed(":think>done") == Delta(content="done")
    assert stream.ended
    stream.reset()
    assert not stream.ended and stream.feed("again") == Delta(reasoning="again")


# --- tool calls -----------------------------------------------------------------------------------

def test_text_around_the_block_and_a_second_block():
    # vLLM keeps the text before the first block verbatim and drops everything after it, a second block
    # included (m3lab used to strip the seams and parse every block); m3lab warns about the dropped text.
    text = (f"Checking both.\n{NS}<tool_call>\n{NS}<invoke name=\"a\">{NS}<x>1{NS}</x>{NS}</invoke>\n"
            f"{NS}<invoke name=\"b\">{NS}<y>two{NS}</y>{NS}</invoke>\n{NS}</tool_call>\n"
            f"Then more.\n{NS}<tool_call>{NS}<invoke name=\"c\">{NS}</invoke>{NS}</tool_call>")
    parsed = parse_tool_calls(text)
    assert parsed.content == "Checking both.\n"
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("a", {"x": "1"}), ("b", {"y": "two"})]
    assert "after </tool_call> is ignored" in parsed.warnings[0]


def test_unicode_values():
    text = (f"{NS}<tool_call>{NS}<invoke name=\"翻訳\">{NS}<text>日本の首都は東京です。{NS}</text>{NS}</invoke>"
            f"{NS}</tool_call>")
    [tc] = parse_tool_calls(text)[1]
    assert tc.name == "翻訳" and tc.arguments == {"text": "日本の首都は東京です。"}
    assert "日本" in tc.function.arguments  # not \\u-escaped on the wire


TYPED_TOOL = {"type": "function", "function": {"name": "t", "parameters": {"type": "object", "properties": {
    "i": {"type": "integer"}, "f": {"type": "number"}, "b": {"type": "boolean"}, "obj": {"type": "object"},
    "arr": {"type": "array"}, "lead0": {"type": "integer"}, "word": {"type": "boolean"},
    "broken": {"type": "object"}, "null": {"type": "string"}, "huge": {"type": "number"}, "none": {"type": "integer"},
}}}}


def test_value_typing():
    # vLLM types values by the schema only: without one, "42" stays "42" (m3lab used to guess JSON types).
    values = [("i", "42"), ("f", "-1.5e3"), ("b", "true"), ("obj", '{"a": [1]}'), ("arr", "[1, 2]"),
              ("lead0", "007"), ("word", "True"), ("broken", "{not json"), ("null", "null"), ("huge", "1e999"),
              ("none", "null")]
    body = "".join(f"{NS}<{k}>{v}{NS}</{k}>" for k, v in values)
    text = f"{NS}<tool_call>{NS}<invoke name=\"t\">{body}{NS}</invoke>{NS}</tool_call>"
    [tc] = parse_tool_calls(text, [TYPED_TOOL])[1]
    assert tc.arguments == {"i": 42, "f": -1500.0, "b": True, "obj": {"a": [1]}, "arr": [1, 2], "lead0": 7,
                            "word": True, "broken": "{not json", "null": "null", "huge": "1e999", "none": None}
    [untyped] = parse_tool_calls(text)[1]
    assert untyped.arguments == {k: None if v == "null" else v for k, v in values}


# (schema, text, value): vLLM's schema-driven conversion, each checked against the compiled Rust parser
# (`vllm._rust_tool_parser`) of the vLLM 0.25.1 build m3lab serves with.
CONVERSIONS = [
    ({"type": "integer"}, "+5", 5), ({"type": "integer"}, " 5", " 5"), ({"type": "integer"}, "5.0", "5.0"),
    ({"type": "number"}, " 5 ", 5), ({"type": "number"}, "5.", 5.0), ({"type": "number"}, ".5", 0.5),
    ({"type": "number"}, "-0", -0.0), ({"type": "number"}, "inf", "inf"),
    ({"type": "boolean"}, " TRUE ", True), ({"type": "boolean"}, "0", False), ({"type": "boolean"}, "yes", "yes"),
    ({"type": "object"}, "42", 42), ({"type": "object"}, "", {}), ({"type": "array"}, "", []),
    ({"type": "object"}, '{"a": NaN}', '{"a": NaN}'),
    ({"type": "string"}, "NULL", "NULL"), ({"type": "integer"}, "null", None),
    ({"enum": ["a", None]}, "null", None), ({"enum": ["a"]}, "null", "null"),
    ({"type": ["string", "integer"]}, "42", "42"), ({"type": ["integer", "string"]}, "42", 42),
    ({"anyOf": [{"type": "mystery"}]}, '{"x":1}', {"x": 1}),
    ({"type": "unsigned_int"}, "7", 7), ({"type": "float64"}, "7.5", 7.5), ({"type": "dict"}, '{"x":1}', {"x": 1}),
    ({"type": "mystery"}, "7", "7"),
]


@pytest.mark.parametrize("schema, text, value", CONVERSIONS)
def test_schema_conversion(schema, text, value):
    tool = {"name": "t", "parameters": {"type": "object", "properties": {"p": schema}}}
    [tc] = parse_tool_calls(f"{TOOL_CALL_START}{invoke('t', element('p', text))}{TOOL_CALL_END}", [tool])[1]
    got = tc.arguments["p"]
    assert got == value and type(got) is type(value)


def test_arguments_json_is_spelled_as_vllm_spells_it():
    tool = {"name": "t", "parameters": {"type": "object", "properties": {
        k: {"type": "number"} for k in ("a", "b", "c", "d", "e")}}}
    body = "".join(element(k, v) for k, v in zip("abcde", ["1e-7", "2.5e-5", "1e16", "100", "3.0"]))
    [tc] = parse_tool_calls(f"{TOOL_CALL_START}{invoke('t', body)}{TOOL_CALL_END}", [tool])[1]
    assert tc.function.arguments == '{"a":1e-7,"b":0.000025,"c":1e+16,"d":100,"e":3.0}'


def test_literal_tags_in_values_stay_text_when_markers_are_present():
    value = "<tool_call>x</tool_call> and </invoke> and <b>bold</b>"
    text = f"{NS}<tool_call>{NS}<invoke name=\"w\">{NS}<s>{value}{NS}</s>{NS}</invoke>{NS}</tool_call>"
    content, [tc] = parse_tool_calls(text)
    assert content is None and tc.arguments == {"s": value}


def test_bare_closers_are_malformed():
    # Markers on the openers only (seen in the wild): vLLM cannot find where <query> ends and makes no call
    # (m3lab used to accept bare closers).
    text = (f"我再查几条。{NS}<tool_call>\n{NS}<invoke name=\"search\">{NS}<query>字节 AI 新闻</query>"
            f"{NS}<limit>6</limit>{NS}</invoke>\n{NS}</tool_call>")
    parsed = parse_tool_calls(text)
    assert parsed == (text, []) and "never closed" in parsed.warnings[0]


def test_repeated_keys():
    # vLLM: a repeated top-level argument keeps its last value (m3lab used to collect both); inside an
    # object, repeated tags collect into a list.
    text = (f"{NS}<tool_call>{NS}<invoke name=\"r\">{NS}<k>1{NS}</k>{NS}<k>2{NS}</k>"
            f"{NS}<o>{NS}<t>a{NS}</t>{NS}<t>b{NS}</t>{NS}<t>c{NS}</t>{NS}</o>{NS}</invoke>{NS}</tool_call>")
    assert parse_tool_calls(text)[1][0].arguments == {"k": "2", "o": {"t": ["a", "b", "c"]}}


@pytest.mark.parametrize("text, why", [
    (f"Hi {NS}<tool_call>{NS}<invoke name=\"f\">{NS}<a>1{NS}</a>{NS}</tool_call>", "cut off"),  # unclosed invoke
    (f"Hi {NS}<tool_call>{NS}<invoke>{NS}<a>1{NS}</a>{NS}</invoke>{NS}</tool_call>", "expected <invoke name="),
    (f"Hi {NS}<tool_call>{NS}<invoke name=\"f\">{NS}<a>1{NS}</a>", "cut off"),  # generation cut off
    (f"Hi {NS}<tool_call>{NS}<invoke name=\"f\">{NS}<a>1{NS}</b>{NS}</invoke>{NS}</tool_call>", "unexpected tag"),
    (f"Hi {NS}<tool_call>just words{NS}</tool_call>", "expected <invoke name="),
    (f"Hi {NS}<tool_call>{NS}</tool_call>", "no <invoke>"),
    (f"Hi {NS}<tool_call>{NS}<invoke name=\"f\">{NS}</invoke> chatter {NS}</tool_call>", "expected <invoke name="),
    (f"Hi {NS}<tool_call>{NS}<invoke name=\"f\">{NS}<a>1{NS}</a>{NS}junk{NS}</invoke>{NS}</tool_call>",
     "stray marker"),
])
def test_malformed_markup_stays_in_content_with_a_warning(text, why):
    # vLLM leaves the whole text, markers included, as content (m3lab used to strip the markers).
    parsed = parse_tool_calls(text)
    content, calls = parsed
    assert calls == [] and content == text
    assert len(parsed.warnings) == 1 and why in parsed.warnings[0]
    msg = parse_assistant_message(text)
    assert msg["tool_calls"] == [] and msg["content"] == content and msg["warnings"] == parsed.warnings


def test_vllm_quirks_are_kept():
    # An empty quoted name reads as its two quotes; plain text between arguments ends them.
    text = f'{TOOL_CALL_START}{NS}<invoke name="">{element("a", "1")}{NS}</invoke>{TOOL_CALL_END}'
    assert [(c.name, c.arguments) for c in parse_tool_calls(text)[1]] == [('""', {"a": "1"})]
    text = f'{TOOL_CALL_START}{invoke("f", element("a", "1") + "so" + element("b", "2"))}{TOOL_CALL_END}'
    assert parse_tool_calls(text)[1][0].arguments == {"a": "1"}


def test_invoke_outside_a_block_is_content():
    text = '<invoke name="f"><a>1</a></invoke>'
    parsed = parse_tool_calls(text)
    assert parsed == (text, []) and "opener" in parsed.warnings[0]


def test_stream_agrees_with_the_whole_text_parse():
    text = "Sure.\n" + build_tool_block(SEATTLE, ("add", element("x", "1") + element("y", "2")))
    whole = parse_tool_calls(text, RUST_TOOLS)
    for size in (1, 2, 5, 13, len(text)):
        content, calls, _ = _stream_tools(split_by_chars(text, size), RUST_TOOLS, finish=True)
        assert (content, [(c.name, c.arguments) for c in calls]) == \
            (whole.content, [(c.name, c.arguments) for c in whole.tool_calls])


def test_stream_after_an_error_passes_text_through_until_reset():
    stream = ToolCallStream()
    first = stream.feed(f"ok {TOOL_CALL_START}{invoke('f', element('a', '1'))}{NS}<bad")
    second = stream.feed("> more")
    assert [c.name for c in first.tool_calls] == ["f"] and first.content == f"ok {NS}<bad" and first.warnings
    assert second == Delta(content="> more")
    assert stream.finish() == Delta()
    assert stream.feed("fresh") == Delta(content="fresh")


def test_never_raises_on_garbage():
    pieces = [NS, "<tool_call>", "</tool_call>", '<invoke name="f">', "<invoke>", "</invoke>", "<a>", "</a>",
              "<item>", "</item>", "<mm:think>", "</mm:think>", "x", "{", "\n"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        msg = parse_assistant_message(text)
        assert msg["role"] == "assistant"
        for tc in msg["tool_calls"]:
            assert isinstance(json.loads(tc["function"]["arguments"]), dict)
        stream = ToolCallStream()
        for i in range(0, len(text), 3):
            stream.feed(text[i:i + 3])
        stream.finish()
    # Deliberately unlike vLLM (whose Rust parser would build this): past Python's recursion limit the
    # call is refused and the text stays content.
    deep = f"{NS}<tool_call>{NS}<invoke name=\"d\">" + f"{NS}<a>" * 3000 + "1" + f"{NS}</a>" * 3000
    parsed = parse_tool_calls(deep + f"{NS}</invoke>{NS}</tool_call>")
    assert parsed.tool_calls == [] and "nested too deeply" in parsed.warnings[0]


def test_message_shape_and_result_types():
    text = "<mm:think>r</mm:think>Sure." + CARD_EXAMPLE
    msg = parse_assistant_message(text)
    assert set(msg) == {"role", "content", "reasoning_content", "tool_calls"}
    assert (msg["content"], msg["reasoning_content"]) == ("Sure.", "r")
    assert set(msg["tool_calls"][0]) == {"id", "type", "function"}
    json.dumps(msg)  # JSON-serializable as is
    split, parsed = split_reasoning(text), parse_tool_calls("x")
    assert isinstance(split, ReasoningSplit) and isinstance(parsed, ParsedToolCalls)
    for obj in (split, parsed):
        assert pickle.loads(pickle.dumps(obj)) == obj and copy.copy(obj) == obj
