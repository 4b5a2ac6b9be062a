"""Turn raw MiniMax-M3 generations into OpenAI chat messages: reasoning, content and tool calls.

M3 writes its chain of thought as <mm:think>...</mm:think> and calls tools with namespaced XML, where
`]<]minimax[>[` (special token 200058 upstream, an ordinary visible token in m3lab's tiny tokenizer) precedes
every tag and each argument is a bare tag named after it:

    ]<]minimax[>[<tool_call>
    ]<]minimax[>[<invoke name="get_weather">]<]minimax[>[<city>Tokyo]<]minimax[>[</city>]<]minimax[>[</invoke>
    ]<]minimax[>[</tool_call>

Nested arguments are nested tags, lists are repeated <item> tags (m3lab.tinymodel.CHAT_TEMPLATE writes them
the same way). Everything here is text-only and never raises on model output: what cannot be parsed stays
in `content` and is reported in `warnings`.

    from m3lab.parsers import parse_assistant_message
    msg = parse_assistant_message(generated_text, tools=request_tools)
    msg["reasoning_content"], msg["content"], msg["tool_calls"]
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["NS", "FunctionCall", "ToolCall", "ReasoningSplit", "ParsedToolCalls",
           "split_reasoning", "parse_tool_calls", "parse_assistant_message"]

NS = "]<]minimax[>["  # the namespace marker before every tool-call tag; never part of any value
THINK_TAGS = (("<mm:think>", "</mm:think>"), ("<think>", "</think>"))  # M3's first, then other models'

_NS = re.escape(NS)
_BLOCK_OPEN = re.compile(rf"(?:{_NS})?<tool_call>")
_BLOCK_CLOSE = re.compile(rf"(?:{_NS})?</tool_call>")
_INVOKE_OPEN = re.compile(rf"(?:{_NS})?<invoke\b([^<>]*)>")
_INVOKE_NAME = re.compile(r"""\bname\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_TAG_NAME = r"[^\s<>/=\"']+"  # JSON keys may be anything; this is what can sit inside <...> unambiguously
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_SKIP = {NS: re.compile(rf"(?:\s|{_NS}(?=\s|$))*"), "": re.compile(r"\s*")}  # between elements


# ---------------------------------------------------------------------------------------------------
# Results. The two splitters return tuple subclasses: they unpack (and compare) as the plain pairs the API
# promises, and still carry the flag / warnings a caller may want.

@dataclass
class FunctionCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it: clients json.loads it themselves


@dataclass
class ToolCall:
    """One OpenAI-shaped tool call; `asdict(call)` / `call.to_dict()` is the wire format."""

    function: FunctionCall
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")  # unique across turns too
    type: str = "function"

    @property
    def name(self) -> str:
        return self.function.name

    @property
    def arguments(self) -> dict[str, Any]:
        return json.loads(self.function.arguments)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "function": asdict(self.function)}


class ReasoningSplit(tuple):
    """`(reasoning_content, content)`; `.unterminated` is True when a think block was never closed."""

    unterminated: bool

    def __new__(cls, reasoning_content: str | None, content: str, unterminated: bool = False):
        self = super().__new__(cls, (reasoning_content, content))
        self.unterminated = unterminated
        return self

    def __getnewargs__(self):  # keeps copy/pickle working with the extra field
        return (self[0], self[1], self.unterminated)

    reasoning_content = property(lambda self: self[0])
    content = property(lambda self: self[1])


class ParsedToolCalls(tuple):
    """`(content, tool_calls)`; `.warnings` says what looked like a tool call but was left in content."""

    warnings: list[str]

    def __new__(cls, content: str, tool_calls: list[ToolCall], warnings: list[str] | None = None):
        self = super().__new__(cls, (content, tool_calls))
        self.warnings = list(warnings or [])
        return self

    def __getnewargs__(self):
        return (self[0], self[1], self.warnings)

    content = property(lambda self: self[0])
    tool_calls = property(lambda self: self[1])


class _Malformed(ValueError):
    """Internal: this block is not a well-formed tool call (turned into a warning, never raised out)."""


# ---------------------------------------------------------------------------------------------------
# Reasoning

def split_reasoning(text: str, *, started_in_reasoning: bool | None = None) -> ReasoningSplit:
    """Split a generation into `(reasoning_content, content)`.

    `<mm:think>R</mm:think>C` (or `<think>`) gives `(R, C)`. M3's template may already have opened the block in
    the prompt (thinking_mode="enabled"), so the generation holds only the closer: `R</mm:think>C`. With
    `started_in_reasoning=None` that is inferred from a closer with no opener before it; `True` also treats a
    tag-less text as reasoning; `False` leaves a lone closer in content (only a leading one is dropped, what
    M3 emits when thinking was disabled). A block never closed (generation cut off) makes everything after
    the opener reasoning, with `.unterminated` set. Whitespace at the tag seams is trimmed.
    """
    open_, close = next(((o, c) for o, c in THINK_TAGS if o in text or c in text), THINK_TAGS[0])
    if started_in_reasoning and not text.lstrip().startswith(open_):
        text = open_ + text  # the prompt opened it: restore the opener so one code path handles both
    start, end = text.find(open_), text.find(close)
    if start == -1 and end == -1:
        return ReasoningSplit(None, text)  # no markup: unchanged
    if start != -1 and (end == -1 or start < end):
        before, after = text[:start], text[start + len(open_):]
        end = after.find(close)
        if end == -1:
            return ReasoningSplit(_clean_reasoning(after), before, unterminated=True)
        return ReasoningSplit(_clean_reasoning(after[:end]), before + after[end + len(close):].lstrip())
    # a closer before any opener
    if started_in_reasoning is False:
        stripped = text.lstrip()
        return ReasoningSplit(None, stripped[len(close):].lstrip() if stripped.startswith(close) else text)
    return ReasoningSplit(_clean_reasoning(text[:end]), text[end + len(close):].lstrip())


def _clean_reasoning(text: str) -> str | None:
    text = text.replace(NS, "").strip()  # a marker in the thoughts is a leak, not reasoning
    return text or None


# ---------------------------------------------------------------------------------------------------
# Tool calls

def parse_tool_calls(text: str, tools: list[dict[str, Any]] | None = None) -> ParsedToolCalls:
    """Extract M3 tool calls: `(content, tool_calls)` plus `.warnings`.

    Each `<tool_call>` block (several are fine) holds one or more `<invoke name="...">` with `<key>value</key>`
    arguments. A block is all or nothing: if any part is malformed (unclosed block or invoke, missing name,
    stray text) it stays in content, verbatim except for the markers, with a warning. Values are strings
    unless they look like JSON numbers, booleans, objects or arrays; `tools` (the request's OpenAI tool list)
    overrides that per parameter: a parameter declared "string" stays a string, an empty array/object
    parameter becomes []/{}. Markers are removed from content; text with no markup comes back unchanged.
    """
    if NS not in text and "<tool_call>" not in text and "<invoke" not in text:
        return ParsedToolCalls(text, [])
    schemas = _parameter_schemas(tools)
    pieces: list[str] = []
    outside: list[str] = []  # the pieces that were never inside a block
    calls: list[ToolCall] = []
    warnings: list[str] = []
    pos = 0
    while (m := _BLOCK_OPEN.search(text, pos)) is not None:
        pieces.append(text[pos:m.start()])
        outside.append(pieces[-1])
        close = _find_tag(text, m, "</tool_call>", _BLOCK_CLOSE)
        reopened = _find_tag(text, m, "<tool_call>", _BLOCK_OPEN)
        if reopened and (close is None or reopened.start() < close.start()):
            warnings.append(f"<tool_call> at offset {m.start()} opened again before closing; left as content")
            pieces.append(text[m.start():reopened.start()])
            pos = reopened.start()
            continue
        if close is None:
            warnings.append(f"<tool_call> at offset {m.start()} is never closed (generation cut off?); "
                            f"left as content")
            pieces.append(text[m.start():])
            pos = len(text)
            break
        try:
            calls.extend(_parse_block(text[m.end():close.start()], schemas))
        except (_Malformed, RecursionError) as e:
            why = "arguments nested too deeply" if isinstance(e, RecursionError) else str(e)
            warnings.append(f"tool_call block at offset {m.start()}: {why}; left as content")
            pieces.append(text[m.start():close.end()])
        pos = close.end()
    pieces.append(text[pos:])
    outside.append(pieces[-1])
    content = "".join(pieces).replace(NS, "")
    if calls:
        content = content.strip()  # the block sat between paragraphs; its surrounding newlines go with it
    if any(_INVOKE_OPEN.search(p) for p in outside):
        warnings.append("<invoke> outside any <tool_call> block; left as content")
    return ParsedToolCalls(content, calls, warnings)


def _find_tag(text: str, opened: re.Match, tag: str, pattern: re.Pattern) -> re.Match | None:
    """The next `tag` after a block opener. A marked opener pairs with marked tags first, so a literal
    "</tool_call>" or "<tool_call>" inside an argument value neither ends nor restarts the block."""
    if opened.group().startswith(NS):
        i = text.find(NS + tag, opened.end())
        if i != -1:
            return pattern.match(text, i)
        if not tag.startswith("</"):
            return None  # a bare <tool_call> inside a marked block is text
    return pattern.search(text, opened.end())  # bare tags, or a marked block closed by a bare closer


def _parse_block(body: str, schemas: dict[str, Any]) -> list[ToolCall]:
    calls = []
    i = 0
    while True:
        i = _SKIP[NS].match(body, i).end()
        if i == len(body):
            break
        m = _INVOKE_OPEN.match(body, i)
        if m is None:
            raise _Malformed(f"expected <invoke name=...>, found {body[i:i + 30]!r}")
        name = _INVOKE_NAME.search(m.group(1))
        name = name and (name.group(1) if name.group(1) is not None else name.group(2)).strip()
        if not name:
            raise _Malformed(f"invoke without a name: {m.group().replace(NS, '')!r}")
        end = body.find(NS + "</invoke>", m.end()) if m.group().startswith(NS) else -1
        end = end if end != -1 else body.find("</invoke>", m.end())
        if end == -1:
            raise _Malformed(f"<invoke name={name!r}> is never closed")
        inner = body[m.end():end]
        arguments = _arguments(inner, schemas.get(name))
        calls.append(ToolCall(FunctionCall(name, json.dumps(arguments, ensure_ascii=False))))
        i = body.index("</invoke>", end) + len("</invoke>")
    if not calls:
        raise _Malformed("no <invoke> inside")
    return calls


def _arguments(body: str, schema: Any) -> dict[str, Any]:
    plain = body.replace(NS, "").strip()
    if not plain:
        return {}
    if plain.startswith("{"):  # arguments already a JSON string (what the template writes for one)
        try:
            obj = json.loads(plain)
            if isinstance(obj, dict):
                return obj
        except ValueError:
            pass
    # Marked text first: only marker-prefixed tags are structure, so "<b>x</b>" in a value stays text. Then
    # markers on openers only (closers written bare). Last, markers gone (a skip_special_tokens decode).
    attempts = [(body, NS, False), (body, NS, True)] if NS in body else []
    attempts.append((body.replace(NS, ""), "", False))
    for s, ns, lenient in attempts:
        kids = _elements(s, ns, lenient)
        if kids:
            return _object(kids, ns, lenient, schema)
    raise _Malformed(f"arguments are not <key>value</key> tags: {plain[:40]!r}")


def _elements(s: str, ns: str, lenient: bool) -> list[tuple[str, str]] | None:
    """`s` as a run of `<name>value</name>` elements (only whitespace between), or None if it is not one."""
    opener = re.compile(rf"{re.escape(ns)}<({_TAG_NAME})>")
    out = []
    i = 0
    while True:
        i = _SKIP[ns].match(s, i).end()
        if i == len(s):
            return out
        m = opener.match(s, i)
        if m is None:
            return None
        name = re.escape(m.group(1))
        closer = rf"(?:{re.escape(ns)})?</{name}>" if lenient else rf"{re.escape(ns)}</{name}>"
        depth = 1  # the same tag may nest inside itself (a list of lists: <item><item>)
        for t in re.finditer(rf"(?P<open>{re.escape(ns)}<{name}>)|{closer}", s[m.end():]):
            depth += 1 if t.group("open") else -1
            if depth == 0:
                out.append((m.group(1), s[m.end():m.end() + t.start()]))
                i = m.end() + t.end()
                break
        else:
            return None


def _value(raw: str, ns: str, lenient: bool, schema: Any) -> Any:
    if raw.strip().startswith(ns + "<") and (kids := _elements(raw, ns, lenient)):
        types = _types(schema)
        if "array" in types or ("object" not in types and all(k == "item" for k, _ in kids)):
            items = schema.get("items") if isinstance(schema, dict) else None
            return [_value(v, ns, lenient, items) for _, v in kids]
        return _object(kids, ns, lenient, schema)
    return _scalar(raw.replace(NS, ""), schema)


def _object(kids: list[tuple[str, str]], ns: str, lenient: bool, schema: Any) -> dict[str, Any]:
    props = schema.get("properties") if isinstance(schema, dict) else None
    out: dict[str, Any] = {}
    for key, raw in kids:
        value = _value(raw, ns, lenient, props.get(key) if isinstance(props, dict) else None)
        if key in out:  # a repeated key keeps every value rather than silently dropping one
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
        else:
            out[key] = value
    return out


def _scalar(text: str, schema: Any) -> Any:
    types = _types(schema)
    if "string" in types and types <= {"string", "null"}:
        return text  # declared a string: "42" stays "42"
    s = text.strip()
    if not s:
        return [] if "array" in types else {} if "object" in types else text  # how the template writes []/{}
    if _JSON_NUMBER.fullmatch(s) or s in ("true", "false") or (s[0] + s[-1]) in ("{}", "[]"):
        try:
            value = json.loads(s)
        except ValueError:
            return text
        return text if isinstance(value, float) and not math.isfinite(value) else value  # 1e999: not JSON
    return text


def _types(schema: Any) -> set[str]:
    if not isinstance(schema, dict):
        return set()
    t = schema.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    return {"object"} if "properties" in schema else {"array"} if "items" in schema else set()


def _parameter_schemas(tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Function name -> its JSON-schema `parameters`, from an OpenAI `tools` list (or bare functions)."""
    out = {}
    for tool in tools or []:
        f = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(f, dict) and isinstance(f.get("name"), str):
            out[f["name"]] = f.get("parameters")
    return out


# ---------------------------------------------------------------------------------------------------
# Both together

def parse_assistant_message(text: str, *, tools: list[dict[str, Any]] | None = None,
                            started_in_reasoning: bool | None = None) -> dict[str, Any]:
    """An OpenAI chat `message` dict from one generation.

    Keys: role, content (None when only whitespace is left), reasoning_content (None without reasoning),
    tool_calls (a list, maybe empty), and `warnings` only when something was left unparsed. Tool calls are
    looked for in the content only: a call the model merely thought about is not made.
    """
    split = split_reasoning(text, started_in_reasoning=started_in_reasoning)
    parsed = parse_tool_calls(split.content, tools)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": parsed.content if parsed.content.strip() else None,
        "reasoning_content": split.reasoning_content,
        "tool_calls": [c.to_dict() for c in parsed.tool_calls],
    }
    warnings = (["think block never closed (generation cut off?): all of it is reasoning_content"]
                if split.unterminated else []) + parsed.warnings
    if warnings:
        message["warnings"] = warnings
    return message
