"""m3lab.parsers: M3 reasoning and tool-call output -> OpenAI messages (text only, fast)."""

from __future__ import annotations

import copy
import json
import pickle
import random

import pytest
from transformers.utils.chat_template_utils import render_jinja_template  # what apply_chat_template runs

from m3lab.parsers import (NS, ParsedToolCalls, ReasoningSplit, ToolCall, parse_assistant_message,
                           parse_tool_calls, split_reasoning)
from m3lab.tinymodel import CHAT_TEMPLATE

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


# --- the card's format ------------------------------------------------------------------------------

def test_card_example_verbatim():
    content, calls = parse_tool_calls(CARD_EXAMPLE)
    assert content == ""
    assert len(calls) == 1 and isinstance(calls[0], ToolCall)
    wire = calls[0].to_dict()
    assert wire["type"] == "function" and wire["id"].startswith("call_")
    assert wire["function"] == {"name": "FUNC", "arguments": '{"param": "value"}'}
    assert parse_tool_calls(CARD_EXAMPLE).warnings == []


def test_card_example_without_markers_parses_the_same():
    # a skip_special_tokens decode of the real tokenizer drops token 200058
    content, calls = parse_tool_calls(CARD_EXAMPLE.replace(NS, ""))
    assert (content, calls[0].name, calls[0].arguments) == ("", "FUNC", {"param": "value"})


def test_text_without_markup_passes_through_unchanged():
    for text in ["", "Hello, world.", "  spaced \n\n", "a < b and c > d", "日本の首都は東京です。",
                 "use <b>bold</b> and <invoke> words", "I was thinking about </ things"]:
        assert parse_tool_calls(text) == (text, [])
        assert split_reasoning(text) == (None, text)
        msg = parse_assistant_message(text)
        assert msg["content"] == (text if text.strip() else None)
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
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [call("do_it", arguments)]}]
    text = assistant_part(messages)
    assert text.startswith("Let me check." + NS + "<tool_call>\n")
    msg = parse_assistant_message(text)
    assert "warnings" not in msg
    assert msg["content"] == "Let me check."
    [tc] = msg["tool_calls"]
    assert tc["function"]["name"] == "do_it"
    expected = copy.deepcopy(arguments)
    if "rows" in expected:
        expected["rows"][1]["v"] = ""  # an empty list renders as nothing: without a schema it reads back ""
    assert json.loads(tc["function"]["arguments"]) == expected


def test_round_trip_with_schema_keeps_declared_strings_and_empty_arrays():
    arguments = {"city": "Tokyo", "zip": "100", "days": 3, "tags": []}
    text = assistant_part([{"role": "user", "content": "go"},
                           {"role": "assistant", "content": "", "tool_calls": [call("get_weather", arguments)]}])
    assert parse_tool_calls(text)[1][0].arguments["zip"] == 100  # no schema: a number-looking value is a number
    [tc] = parse_tool_calls(text, tools=[WEATHER_TOOL])[1]
    assert tc.arguments == arguments


def test_round_trip_of_json_string_arguments():
    # Clients send history back with OpenAI's JSON-string arguments; the template writes that string as is.
    arguments = json.dumps({"city": "大阪", "days": 2}, ensure_ascii=False)
    text = assistant_part([{"role": "user", "content": "go"},
                           {"role": "assistant", "content": None, "tool_calls": [call("get_weather", arguments)]}])
    [tc] = parse_tool_calls(text)[1]
    assert tc.arguments == {"city": "大阪", "days": 2}


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
    assert split_reasoning(generated) == ("The user greets me.", "Hello!")
    assert split_reasoning(generated, started_in_reasoning=True) == ("The user greets me.", "Hello!")
    cut = split_reasoning("The user greets", started_in_reasoning=True)
    assert cut == ("The user greets", "") and cut.unterminated


# --- reasoning ------------------------------------------------------------------------------------

def test_think_blocks_mm_and_plain():
    assert split_reasoning("<mm:think>\nplan\n</mm:think>\n\nAnswer.") == ("plan", "Answer.")
    assert split_reasoning("<think>plan</think>Answer.") == ("plan", "Answer.")
    assert split_reasoning("<mm:think></mm:think>Answer.") == (None, "Answer.")
    assert not split_reasoning("<mm:think>plan</mm:think>Answer.").unterminated


def test_unterminated_think_block_is_all_reasoning_and_flagged():
    split = split_reasoning("<mm:think>I need to think about 日本 and")
    assert split == ("I need to think about 日本 and", "") and split.unterminated
    msg = parse_assistant_message("<mm:think>I need to think")
    assert msg["reasoning_content"] == "I need to think" and msg["content"] is None
    assert "never closed" in msg["warnings"][0]


def test_lone_closer_when_thinking_was_disabled():
    assert split_reasoning("</mm:think>Hi", started_in_reasoning=False) == (None, "Hi")
    assert split_reasoning("Hi</mm:think>there", started_in_reasoning=False) == (None, "Hi</mm:think>there")
    assert split_reasoning("</mm:think>Hi") == (None, "Hi")


def test_tool_markup_inside_reasoning_is_not_a_call():
    text = f"<mm:think>maybe {NS}<tool_call>{NS}<invoke name=\"x\">{NS}</invoke>{NS}</tool_call></mm:think>No."
    msg = parse_assistant_message(text)
    assert msg["tool_calls"] == [] and msg["content"] == "No."
    assert NS not in msg["reasoning_content"]


# --- tool calls -----------------------------------------------------------------------------------

def test_multiple_invokes_and_blocks_with_text_around():
    text = (f"Checking both.\n{NS}<tool_call>\n{NS}<invoke name=\"a\">{NS}<x>1{NS}</x>{NS}</invoke>\n"
            f"{NS}<invoke name=\"b\">{NS}<y>two{NS}</y>{NS}</invoke>\n{NS}</tool_call>\n"
            f"Then more.\n{NS}<tool_call>{NS}<invoke name=\"c\">{NS}</invoke>{NS}</tool_call>")
    content, calls = parse_tool_calls(text)
    assert content == "Checking both.\n\nThen more."
    assert [(c.name, c.arguments) for c in calls] == [("a", {"x": 1}), ("b", {"y": "two"}), ("c", {})]


def test_unicode_values():
    text = (f"{NS}<tool_call>{NS}<invoke name=\"翻訳\">{NS}<text>日本の首都は東京です。{NS}</text>{NS}</invoke>"
            f"{NS}</tool_call>")
    [tc] = parse_tool_calls(text)[1]
    assert tc.name == "翻訳" and tc.arguments == {"text": "日本の首都は東京です。"}
    assert "日本" in tc.function.arguments  # not \\u-escaped on the wire


def test_value_typing():
    body = "".join(f"{NS}<{k}>{v}{NS}</{k}>" for k, v in [
        ("i", "42"), ("f", "-1.5e3"), ("b", "true"), ("obj", '{"a": [1]}'), ("arr", "[1, 2]"),
        ("lead0", "007"), ("word", "True"), ("broken", "{not json"), ("null", "null"), ("huge", "1e999")])
    [tc] = parse_tool_calls(f"{NS}<tool_call>{NS}<invoke name=\"t\">{body}{NS}</invoke>{NS}</tool_call>")[1]
    assert tc.arguments == {"i": 42, "f": -1500.0, "b": True, "obj": {"a": [1]}, "arr": [1, 2], "lead0": "007",
                            "word": "True", "broken": "{not json", "null": "null", "huge": "1e999"}


def test_literal_tags_in_values_stay_text_when_markers_are_present():
    value = "<tool_call>x</tool_call> and </invoke> and <b>bold</b>"
    text = f"{NS}<tool_call>{NS}<invoke name=\"w\">{NS}<s>{value}{NS}</s>{NS}</invoke>{NS}</tool_call>"
    content, [tc] = parse_tool_calls(text)
    assert content == "" and tc.arguments == {"s": value}


def test_bare_closers_after_marked_openers():
    # seen in the wild: markers on the openers only
    text = (f"我再查几条。{NS}<tool_call>\n{NS}<invoke name=\"search\">{NS}<query>字节 AI 新闻</query>"
            f"{NS}<limit>6</limit>{NS}</invoke>\n{NS}</tool_call>")
    content, [tc] = parse_tool_calls(text)
    assert content == "我再查几条。" and tc.arguments == {"query": "字节 AI 新闻", "limit": 6}


def test_repeated_keys_keep_every_value():
    text = f"{NS}<tool_call>{NS}<invoke name=\"r\">{NS}<k>1{NS}</k>{NS}<k>2{NS}</k>{NS}</invoke>{NS}</tool_call>"
    assert parse_tool_calls(text)[1][0].arguments == {"k": [1, 2]}


@pytest.mark.parametrize("text, why", [
    (f"Hi {NS}<tool_call>{NS}<invoke name=\"f\">{NS}<a>1{NS}</a>{NS}</tool_call>", "never closed"),  # unclosed invoke
    (f"Hi {NS}<tool_call>{NS}<invoke>{NS}<a>1{NS}</a>{NS}</invoke>{NS}</tool_call>", "without a name"),
    (f"Hi {NS}<tool_call>{NS}<invoke name=\"\">{NS}</invoke>{NS}</tool_call>", "without a name"),
    (f"Hi {NS}<tool_call>{NS}<invoke name=\"f\">{NS}<a>1{NS}</a>", "never closed"),  # generation cut off
    (f"Hi {NS}<tool_call>{NS}<invoke name=\"f\">{NS}<a>1{NS}</b>{NS}</invoke>{NS}</tool_call>", "not <key>"),
    (f"Hi {NS}<tool_call>just words{NS}</tool_call>", "expected <invoke"),
    (f"Hi {NS}<tool_call>{NS}</tool_call>", "no <invoke>"),
    (f"Hi {NS}<tool_call>{NS}<invoke name=\"f\">{NS}</invoke> chatter {NS}</tool_call>", "expected <invoke"),
])
def test_malformed_markup_stays_in_content_with_a_warning(text, why):
    parsed = parse_tool_calls(text)
    content, calls = parsed
    assert calls == [] and content == text.replace(NS, "")
    assert len(parsed.warnings) == 1 and why in parsed.warnings[0]
    msg = parse_assistant_message(text)
    assert msg["tool_calls"] == [] and msg["content"] == content and msg["warnings"] == parsed.warnings


def test_a_malformed_block_does_not_spoil_a_good_one():
    good = f"{NS}<tool_call>{NS}<invoke name=\"ok\">{NS}<a>1{NS}</a>{NS}</invoke>{NS}</tool_call>"
    bad = f"{NS}<tool_call>{NS}<invoke>{NS}</invoke>{NS}</tool_call>"
    parsed = parse_tool_calls(good + "\n" + bad)
    assert [c.name for c in parsed.tool_calls] == ["ok"]
    assert parsed.content == bad.replace(NS, "") and len(parsed.warnings) == 1


def test_invoke_outside_a_block_is_content():
    text = '<invoke name="f"><a>1</a></invoke>'
    parsed = parse_tool_calls(text)
    assert parsed == (text, []) and "outside" in parsed.warnings[0]


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
