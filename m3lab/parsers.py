"""Turn raw MiniMax-M3 generations into OpenAI chat messages, the way vLLM's `minimax_m3` parsers do.

One generation, three layers:

    <mm:think>The user wants the weather.</mm:think>Let me check.]<]minimax[>[<tool_call>
    ]<]minimax[>[<invoke name="get_weather">]<]minimax[>[<city>Tokyo]<]minimax[>[</city>]<]minimax[>[</invoke>
    ]<]minimax[>[</tool_call>

1. Reasoning, as vLLM's `MiniMaxM3ReasoningParser` does it. The first `<mm:think>` opens the thoughts
   (text before it is content) and the first `</mm:think>` after it closes them. With thinking_mode="enabled" the chat template already wrote the opener
   into the prompt (`started_in_reasoning=True`), so the generation starts inside the block. A closer at
   the very start of the text is dropped (M3 emits one when thinking is off); one anywhere else, with no
   opener before it, is ordinary content. Nothing is trimmed, and `content` is None when nothing is left.
2. Tool calls, as vLLM's Rust `MinimaxM3ToolParser` and its Python bridge do it. Every structural tag
   carries the namespace marker `]<]minimax[>[` (special token 200058 upstream, plain text in m3lab's tiny
   tokenizer). Text before the first `]<]minimax[>[<tool_call>` is content, kept as is; the block holds one
   or more `<invoke name="...">`; anything after its `</tool_call>` is dropped. An argument is a tag named
   after it, a nested tag makes an object, and a tag repeated inside an object makes a list.
3. Typed arguments. Leaf values are text. The tool's JSON schema decides what each becomes: integer,
   number, boolean, object, array (children in order, whatever their tag), null, or the first type of a
   union that fits; a value that does not fit stays the raw string. Without a schema every leaf is a
   string, except the text "null", which is null.

When a block is malformed or cut off, the non-streaming parser leaves the whole text as content with no
calls, as vLLM does; m3lab never raises on model output and says what went wrong in `warnings`.
`ReasoningStream` and `ToolCallStream` give the deltas of vLLM's streaming paths: a call arrives whole once
its `</invoke>` has been seen, and after a parse error the rest of the stream is passed on as content.
Deliberate differences from vLLM: arguments nested past Python's recursion limit are refused (left as
content), `reasoning_ended` balances a prefilled opener (see there), and m3lab works on text, not token ids.

    from m3lab.parsers import parse_assistant_message
    msg = parse_assistant_message(generated_text, tools=request_tools, started_in_reasoning=True)
    msg["reasoning_content"], msg["content"], msg["tool_calls"]

tests/test_parsers.py ports vLLM's own test cases for both parsers and names the files and commits.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Union

__all__ = ["NS", "THINK_START", "THINK_END", "TOOL_CALL_START", "TOOL_CALL_END",
           "FunctionCall", "ToolCall", "ReasoningSplit", "ParsedToolCalls", "Delta",
           "split_reasoning", "reasoning_ended", "count_reasoning_tokens", "ReasoningStream",
           "parse_tool_calls", "ToolCallStream", "parse_assistant_message"]

NS = "]<]minimax[>["  # the namespace marker before every tool-call tag
THINK_START, THINK_END = "<mm:think>", "</mm:think>"
TOOL_CALL_START, TOOL_CALL_END = NS + "<tool_call>", NS + "</tool_call>"
_INVOKE_START, _INVOKE_END = NS + "<invoke", NS + "</invoke>"
_TAG_START, _CLOSE_TAG_START = NS + "<", NS + "</"
_MIXED_TEXT_KEY = "$text"  # where text beside child tags goes (vLLM's name for it)
_SPACES = " \t\r\n"  # what the tool-call grammar skips between tags
_THINK_MARKER = re.compile(f"{re.escape(THINK_START)}|{re.escape(THINK_END)}")


# ---------------------------------------------------------------------------------------------------
# Results. The two whole-text parsers return tuple subclasses: they unpack (and compare) as the plain pairs
# the API promises, and still carry the flag / warnings a caller may want.

@dataclass
class FunctionCall:
    name: str
    arguments: str  # a JSON object, compact as vLLM writes it; clients json.loads it themselves


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

    def __new__(cls, reasoning_content: str | None, content: str | None, unterminated: bool = False):
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

    def __new__(cls, content: str | None, tool_calls: list[ToolCall], warnings: list[str] | None = None):
        self = super().__new__(cls, (content, tool_calls))
        self.warnings = list(warnings or [])
        return self

    def __getnewargs__(self):
        return (self[0], self[1], self.warnings)

    content = property(lambda self: self[0])
    tool_calls = property(lambda self: self[1])
    tools_called = property(lambda self: bool(self[1]))


@dataclass
class Delta:
    """What one streamed chunk made final: new reasoning text, new content text, completed tool calls."""

    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls or self.warnings)


# ---------------------------------------------------------------------------------------------------
# Reasoning, whole text

def split_reasoning(text: str, *, started_in_reasoning: bool | None = None) -> ReasoningSplit:
    """Split a generation into `(reasoning_content, content)` as vLLM's `extract_reasoning` does.

    `started_in_reasoning=True` is thinking_mode="enabled" (the prompt ends with `<mm:think>`): text up to
    the first `</mm:think>` is reasoning. Otherwise (None or False) only an explicit `<mm:think>` opens a
    block; a leading `</mm:think>` is dropped and any other lone closer is content. An unclosed block makes
    the rest reasoning, with `.unterminated` set. Empty content is None; reasoning may be "".
    """
    if started_in_reasoning:
        return _split_prefilled(text) if THINK_START not in text else _split_opened(text)
    if text.startswith(THINK_END):
        return ReasoningSplit(None, text[len(THINK_END):] or None)
    if THINK_START not in text:
        return ReasoningSplit(None, text)
    return _split_opened(text)


def _split_prefilled(text: str) -> ReasoningSplit:
    reasoning, closer, content = text.partition(THINK_END)
    if not closer:
        return ReasoningSplit(text, None, unterminated=True)
    return ReasoningSplit(reasoning, content or None)


def _split_opened(text: str) -> ReasoningSplit:
    before, _, after = text.partition(THINK_START)
    reasoning, closer, rest = after.partition(THINK_END)
    if not closer:
        return ReasoningSplit(reasoning, before or None, unterminated=True)
    return ReasoningSplit(reasoning, (before + rest) or None)


def reasoning_ended(text: str, *, started_in_reasoning: bool | None = None) -> bool:
    """Whether `text` (a prompt, or prompt plus output) leaves the model past its reasoning block.

    vLLM's `is_reasoning_end`, on text: the last `</mm:think>` comes after the last `<mm:think>`. When the
    template prefilled the opener (`started_in_reasoning`), every closer must also be balanced against it,
    so an `<mm:think></mm:think>` pair quoted in the prompt does not end the block.
    """
    if not started_in_reasoning:
        return text.rfind(THINK_END) > text.rfind(THINK_START)
    depth, closed = 1, False
    for marker in _THINK_MARKER.finditer(text):
        if marker.group() == THINK_START:
            depth += 1
        else:
            depth, closed = max(depth - 1, 0), True
    return closed and depth == 0


def count_reasoning_tokens(tokens: Sequence[str], *, started_in_reasoning: bool | None = None) -> int:
    """How many of `tokens` (decoded token texts, in order) lie inside reasoning, markers excluded.

    vLLM's `count_reasoning_tokens` walks token ids; this walks their text, so a marker counts as a
    marker however the tokenizer split it.
    """
    inside = _reasoning_mask("".join(tokens), started_in_reasoning)
    count = pos = 0
    for token in tokens:
        if token and all(inside[pos:pos + len(token)]):
            count += 1
        pos += len(token)
    return count


def _reasoning_mask(text: str, started_in_reasoning: bool | None) -> list[bool]:
    """Per character of `text`: True inside a reasoning block (the markers themselves are False)."""
    mask = [False] * len(text)
    depth, pos = int(bool(started_in_reasoning)), 0
    for marker in _THINK_MARKER.finditer(text):
        if depth:
            mask[pos:marker.start()] = [True] * (marker.start() - pos)
        depth = depth + 1 if marker.group() == THINK_START else max(depth - 1, 0)
        pos = marker.end()
    if depth:
        mask[pos:] = [True] * (len(text) - pos)
    return mask


# ---------------------------------------------------------------------------------------------------
# Reasoning, streamed

class ReasoningStream:
    """vLLM's streaming reasoning split: feed text as it is generated, get the new reasoning/content back.

    A marker split across chunks is held back until it is complete, so no marker text ever leaks.
    `ended` is vLLM's `is_reasoning_end_streaming`: True once a closer or any content has been seen.
    """

    def __init__(self, *, started_in_reasoning: bool | None = None) -> None:
        self.started_in_reasoning = bool(started_in_reasoning)
        self.reset()

    def reset(self) -> None:
        """Start a new generation (vLLM does this when a request's previous text is empty)."""
        self.text = ""
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    def feed(self, delta: str) -> Delta:
        if not delta:
            return Delta()
        before = _visible_split(self.text, self.started_in_reasoning)
        self.text += delta
        after = _visible_split(self.text, self.started_in_reasoning)
        if THINK_END in self.text or after[1] is not None:
            self._ended = True
        return Delta(reasoning=_grown(before[0], after[0]), content=_grown(before[1], after[1]))


def _visible_split(text: str, prefilled: bool) -> tuple[str | None, str | None]:
    """`(reasoning, content)` of a generation so far, without a trailing half-written marker."""
    if not prefilled:
        if THINK_END.startswith(text):
            return None, None  # (the start of) the closer M3 writes when thinking is off
        if text.startswith(THINK_END):
            text = text[len(THINK_END):]
    if prefilled and THINK_START not in text:
        reasoning, closer, content = text.partition(THINK_END)
        if closer:
            return reasoning or None, content or None
        return _strip_partial(reasoning, THINK_END) or None, None
    if THINK_START not in text:
        return None, _strip_partial(text, THINK_START) or None
    before, _, after = text.partition(THINK_START)
    reasoning, closer, rest = after.partition(THINK_END)
    if closer:
        return reasoning or None, (before + rest) or None
    return _strip_partial(reasoning, THINK_END) or None, before or None


def _strip_partial(text: str, marker: str) -> str:
    """`text` without its longest ending that is the beginning of `marker` (the marker may be arriving)."""
    return text[:len(text) - _partial_prefix_len(text, marker)]


def _partial_prefix_len(text: str, marker: str) -> int:
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _grown(previous: str | None, current: str | None) -> str | None:
    """What `current` adds to `previous` (all of it when it does not extend it)."""
    if not current:
        return None
    if previous and current.startswith(previous):
        return current[len(previous):] or None
    return current


# ---------------------------------------------------------------------------------------------------
# Tool calls: the grammar. A cursor with the two failure kinds of vLLM's parser combinators: `_Need`
# (the text so far could still become valid: wait for more) and `_Bad` (it cannot).

class _Need(Exception):
    """More text is needed before this part can be decided."""


class _Bad(Exception):
    """The text does not fit the grammar here; the message says why."""


class _Cursor:
    """A position in `text`. `partial`: more text may still arrive, so running out means `_Need`."""

    def __init__(self, text: str, partial: bool) -> None:
        self.text, self.pos, self.partial = text, 0, partial

    @property
    def rest(self) -> str:
        return self.text[self.pos:]

    def at(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def literal(self, s: str) -> None:
        if self.at(s):
            self.pos += len(s)
        elif self.partial and s.startswith(self.rest):
            raise _Need
        else:
            raise _Bad(f"expected {s!r}, found {_snippet(self.rest)}")

    def spaces(self, at_least: int = 0) -> None:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _SPACES:
            self.pos += 1
        if self.partial and self.pos == len(self.text):
            raise _Need  # more spaces may follow
        if self.pos - start < at_least:
            raise _Bad(f"expected a space, found {_snippet(self.rest)}")

    def until(self, s: str, at_least: int = 0) -> str:
        """The text before the next `s` (not consumed)."""
        end = self.text.find(s, self.pos)
        if end == -1:
            if self.partial:
                raise _Need
            raise _Bad(f"no {s!r} after {_snippet(self.rest)}")
        if end - self.pos < at_least:
            raise _Bad(f"nothing before {s!r}")
        taken, self.pos = self.text[self.pos:end], end
        return taken


def _snippet(text: str, size: int = 40) -> str:
    return repr(text[:size] + ("…" if len(text) > size else ""))


@dataclass
class _Dropped:
    """Text after the tool-call block: vLLM ignores it."""

    text: str


class _GrammarError(Exception):
    """The tool-call markup is malformed. `events` holds what had been completed before the fault."""

    def __init__(self, why: str, events: list[Any]) -> None:
        super().__init__(why)
        self.events = events


_Param = Union[str, list[tuple[str, "_Param"]]]  # a leaf's text, or a tag's children (name, value) in order


class _ToolGrammar:
    """vLLM's incremental M3 tool-call grammar: content text, then one block of invokes, then nothing.

    `feed` buffers text and returns what became final, in order: content `str`s, `ToolCall`s (an invoke
    counts once its `</invoke>` is in) and `_Dropped` text after the block. Malformed markup raises
    `_GrammarError`; the unparsed buffer then comes back from `reset()`. `finish` ends the text.
    """

    def __init__(self, tool_types: dict[str, dict[str, _Type]]) -> None:
        self.tool_types = tool_types  # function name -> argument name -> type
        self.buffer, self.mode = "", "text"  # mode: "text" -> "block" -> "done"

    def reset(self) -> str:
        """Back to the start; returns the text that was still buffered."""
        left, self.buffer, self.mode = self.buffer, "", "text"
        return left

    def feed(self, chunk: str) -> list[str | ToolCall | _Dropped]:
        self.buffer += chunk
        events: list[str | ToolCall | _Dropped] = []
        while self.buffer:
            cursor = _Cursor(self.buffer, partial=True)
            try:
                event = self._next_event(cursor)
            except _Need:
                break
            except (_Bad, RecursionError) as e:
                why = "arguments nested too deeply" if isinstance(e, RecursionError) else str(e)
                raise _GrammarError(why, events) from None
            self.buffer = self.buffer[cursor.pos:]
            if event is not None:
                events.append(event)
        return events

    def finish(self) -> list[str | ToolCall | _Dropped]:
        """Flush at the end of the generation: buffered plain text is content, a half-made block an error."""
        if self.mode == "block" and self.buffer.strip():
            raise _GrammarError("tool-call block cut off before its </tool_call> (generation ended?)", [])
        events: list[str | ToolCall | _Dropped] = [self.buffer] if self.mode == "text" and self.buffer else []
        self.reset()
        return events

    def _next_event(self, cursor: _Cursor) -> str | ToolCall | _Dropped | None:
        if self.mode == "text":
            return self._text_event(cursor)
        if self.mode == "block":
            return self._block_event(cursor)
        cursor.pos = len(cursor.text)
        return _Dropped(cursor.text)

    def _text_event(self, cursor: _Cursor) -> str | None:
        """Content up to the block opener, holding back an ending that may be the opener's beginning."""
        if cursor.at(TOOL_CALL_START):
            cursor.pos += len(TOOL_CALL_START)
            self.mode = "block"
            return None
        text = cursor.rest
        start = text.find(TOOL_CALL_START)
        size = start if start != -1 else len(text) - _partial_prefix_len(text, TOOL_CALL_START)
        if size == 0:
            raise _Need
        cursor.pos += size
        return text[:size]

    def _block_event(self, cursor: _Cursor) -> ToolCall | None:
        """Inside the block: its closer, or one complete `<invoke name="...">...</invoke>`."""
        start = cursor.pos
        try:
            cursor.spaces()
            cursor.literal(TOOL_CALL_END)
            self.mode = "done"
            return None
        except _Bad:
            cursor.pos = start
        try:
            cursor.spaces()
            cursor.literal(_INVOKE_START)
            cursor.spaces(at_least=1)
            cursor.literal("name=")
            name = _attribute_value(cursor).strip()
            cursor.literal(">")
            body = cursor.until(_INVOKE_END)
            cursor.literal(_INVOKE_END)
        except _Bad:
            found = _snippet(cursor.text[start:].lstrip(_SPACES).replace(NS, ""))
            raise _Bad(f"expected <invoke name=...> or </tool_call> in the tool-call block, found {found}") from None
        try:
            params = _invoke_params(body)
        except _Bad as e:
            raise _Bad(f"malformed arguments of <invoke name={name!r}>: {e}") from None
        return _tool_call(name, params, self.tool_types.get(name, {}))


def _attribute_value(cursor: _Cursor) -> str:
    """`"quoted"`, `'quoted'` or bare up to `>`; an empty quoted value reads as its two quotes, as in vLLM."""
    start = cursor.pos
    for quote in ('"', "'"):
        try:
            cursor.literal(quote)
            value = cursor.until(quote, at_least=1)
            cursor.literal(quote)
            return value
        except _Bad:
            cursor.pos = start
    return cursor.until(">", at_least=1)


def _invoke_params(body: str) -> list[tuple[str, _Param]]:
    """The argument tags of one complete invoke body. Plain text between them ends the arguments."""
    cursor = _Cursor(body, partial=False)
    params = []
    while True:
        cursor.spaces()
        if cursor.pos == len(body):
            return params
        if cursor.at(_TAG_START):
            params.append(_element(cursor))
        elif cursor.at(NS):
            raise _Bad(f"stray marker before {_snippet(cursor.rest[len(NS):])}")
        else:
            return params  # vLLM keeps the arguments before the stray text and drops the rest


def _element(cursor: _Cursor) -> tuple[str, _Param]:
    """`<name>value</name>` (every tag marked); the value is text, or child elements."""
    cursor.literal(_TAG_START)
    name = cursor.until(">", at_least=1)
    cursor.literal(">")
    if name.startswith("/") or not name.strip():
        raise _Bad(f"unexpected tag <{name}>")
    value = _element_body(cursor, name)
    cursor.literal(f"{_CLOSE_TAG_START}{name}>")
    return name, value


def _element_body(cursor: _Cursor, name: str) -> _Param:
    closer = f"{_CLOSE_TAG_START}{name}>"
    texts: list[str] = []
    children: list[tuple[str, _Param]] = []
    while True:
        if cursor.text.find(NS, cursor.pos) == -1:
            raise _Bad(f"<{name}> is never closed")
        texts.append(cursor.until(NS))
        if cursor.at(closer):
            break
        if not cursor.at(_TAG_START):
            raise _Bad(f"stray marker inside <{name}>")
        children.append(_element(cursor))  # a mismatched closer lands here and fails as a tag named "/..."
    text = "".join(texts)
    if not children:
        return text
    if text.strip():  # text beside child tags is kept under "$text" ("$$text" if that name is taken...)
        key = _MIXED_TEXT_KEY
        while any(child == key for child, _ in children):
            key = "$" + key
        children.append((key, text))
    return children


def _tool_call(name: str, params: list[tuple[str, _Param]], types: dict[str, _Type]) -> ToolCall:
    arguments = {key: _convert(types.get(key), value) for key, value in params}  # a repeated key: last wins
    return ToolCall(FunctionCall(name, _to_json(arguments)))


# ---------------------------------------------------------------------------------------------------
# Tool calls: typed arguments. A parameter's JSON schema is first normalized to a `_Type` the way vLLM
# does it (aliases such as "int" or "dict", unions, types inferred from enum/items/properties), then each
# value is converted by it, falling back to the raw text.

@dataclass
class _Type:
    kind: str  # string, integer, number, boolean, object, array, null, or one_of
    properties: dict[str, _Type] = field(default_factory=dict)  # object: declared fields
    additional: _Type | None = None  # object: the type of any other field
    items: _Type | None = None  # array
    options: list[_Type] = field(default_factory=list)  # one_of, tried in order


_TYPE_NAMES = {**dict.fromkeys(("string", "str", "text", "varchar", "char", "enum"), "string"),
               **dict.fromkeys(("integer", "int"), "integer"),
               **dict.fromkeys(("number", "float", "double"), "number"),
               **dict.fromkeys(("boolean", "bool", "binary"), "boolean"),
               **dict.fromkeys(("object", "dict", "map"), "object"),
               **dict.fromkeys(("array", "arr", "list", "sequence"), "array"),
               "null": "null"}
_TYPE_PREFIXES = (("int", "integer"), ("uint", "integer"), ("long", "integer"), ("short", "integer"),
                  ("unsigned", "integer"), ("num", "number"), ("float", "number"), ("dict", "object"),
                  ("list", "array"))


def _tool_types(tools: Iterable[Any] | None) -> dict[str, dict[str, _Type]]:
    """Function name -> parameter name -> `_Type`, from an OpenAI `tools` list (or bare functions)."""
    out = {}
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            out[function["name"]] = _parameter_types(function.get("parameters"))
    return out


def _parameter_types(parameters: Any) -> dict[str, _Type]:
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    if not isinstance(properties, dict):
        return {}  # no schema: every value stays a string
    return {key: t for key, schema in properties.items() if (t := _schema_type(schema)) is not None}


def _schema_type(schema: Any) -> _Type | None:
    if not isinstance(schema, dict):
        return None
    if "type" in schema:
        declared = schema["type"]
        names = [declared] if isinstance(declared, str) else declared if isinstance(declared, list) else []
        return _one_of([t for n in names if isinstance(n, str) and (t := _named_type(n, schema))])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = schema[key] if isinstance(schema[key], list) else []
            return _one_of([t for s in options if (t := _schema_type(s))]) or _object_type(schema)
    if isinstance(schema.get("enum"), list):
        return _one_of([_Type("string"), _Type("null")]) if None in schema["enum"] else _Type("string")
    if "items" in schema:
        return _array_type(schema)
    if "properties" in schema or "additionalProperties" in schema:
        return _object_type(schema)
    return None


def _named_type(name: str, schema: dict[str, Any]) -> _Type | None:
    name = name.strip().lower()
    kind = _TYPE_NAMES.get(name) or next((k for prefix, k in _TYPE_PREFIXES if name.startswith(prefix)), None)
    if kind == "object":
        return _object_type(schema)
    if kind == "array":
        return _array_type(schema)
    return _Type(kind) if kind else None


def _object_type(schema: dict[str, Any]) -> _Type:
    properties = schema.get("properties")
    additional = schema.get("additionalProperties")
    return _Type("object",
                 properties={k: t for k, s in properties.items() if (t := _schema_type(s))}
                 if isinstance(properties, dict) else {},
                 additional=_schema_type(additional) if isinstance(additional, dict) else None)


def _array_type(schema: dict[str, Any]) -> _Type:
    return _Type("array", items=_schema_type(schema.get("items")))


def _one_of(types: list[_Type]) -> _Type | None:
    if not types:
        return None
    return types[0] if len(types) == 1 else _Type("one_of", options=types)


_NO_MATCH: Any = object()  # a conversion that does not fit (None is a real value: JSON null)
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _convert(t: _Type | None, value: _Param) -> Any:
    """One argument's JSON value: typed by `t` when it fits, else the raw text (or an untyped object)."""
    if isinstance(value, str) and _is_null(value) and not (t is not None and t.kind == "string"):
        return None
    if t is not None:
        typed = _typed_text(t, value) if isinstance(value, str) else _typed_children(t, value)
        if typed is not _NO_MATCH:
            return typed
    return value if isinstance(value, str) else _to_object(value, {}, None)


def _typed_text(t: _Type, text: str) -> Any:
    if t.kind == "string":
        return text
    if t.kind == "integer":
        return _int64(text)
    if t.kind == "number":
        return _number(text)
    if t.kind == "boolean":
        return _BOOLEANS.get(text.strip().lower(), _NO_MATCH)
    if t.kind in ("object", "array"):
        return _json_value(text) if text else {} if t.kind == "object" else []  # empty: how [] / {} render
    if t.kind == "null":
        return None if _is_null(text) else _NO_MATCH
    return _first_fit(t.options, lambda option: _typed_text(option, text))


def _typed_children(t: _Type, children: list[tuple[str, _Param]]) -> Any:
    if t.kind == "object":
        return _to_object(children, t.properties, t.additional)
    if t.kind == "array":
        return [_convert(t.items, value) for _, value in children]  # the tag names (<item>...) do not matter
    if t.kind == "one_of":
        return _first_fit(t.options, lambda option: _typed_children(option, children))
    return _NO_MATCH  # a scalar type cannot hold tags


def _to_object(children: list[tuple[str, _Param]], properties: dict[str, _Type],
               additional: _Type | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in children:
        value = _convert(properties.get(key, additional), raw)
        if key not in out:
            out[key] = value
        elif isinstance(out[key], list):  # a repeated tag collects its values in a list
            out[key].append(value)
        else:
            out[key] = [out[key], value]
    return out


def _first_fit(options: list[_Type], convert: Callable[[_Type], Any]) -> Any:
    for option in options:
        if (value := convert(option)) is not _NO_MATCH:
            return value
    return _NO_MATCH


def _is_null(text: str) -> bool:
    return len(text) == 4 and text.isascii() and text.lower() == "null"


def _int64(text: str) -> int:
    """A signed 64-bit integer written plainly ("018956" and "+5" included, " 5" and "5.0" not)."""
    if _INTEGER.fullmatch(text) and -2**63 <= (n := int(text)) < 2**63:
        return n
    return _NO_MATCH


def _number(text: str) -> int | float:
    """A JSON number (spaces around allowed), else a plain integer or decimal ("+1", "5.", ".5")."""
    stripped = text.strip(_SPACES)
    if _JSON_NUMBER.fullmatch(stripped) and (value := _json_number(stripped)) is not _NO_MATCH:
        return value
    if (value := _int64(text)) is not _NO_MATCH:
        return value
    if _DECIMAL.fullmatch(text) and math.isfinite(value := float(text)):
        return value
    return _NO_MATCH


def _json_number(text: str) -> int | float:
    """A JSON number literal as serde_json reads it: 64-bit integers stay integers, all else is a float."""
    if not any(c in text for c in ".eE"):
        n = int(text)
        if -2**63 <= n < 2**64 and not (n == 0 and text.startswith("-")):
            return n
    value = float(text)
    return value if math.isfinite(value) else _NO_MATCH


def _strict_number(text: str) -> int | float:
    if (value := _json_number(text)) is _NO_MATCH:
        raise ValueError(f"number out of range: {text}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_value(text: str) -> Any:
    """Any strict JSON value (vLLM reads an object- or array-typed leaf this way), or no match."""
    try:
        return json.loads(text, parse_int=_strict_number, parse_float=_strict_number, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return _NO_MATCH


def _to_json(value: Any) -> str:
    """Compact JSON, spelled as vLLM's serde_json spells it (non-ASCII kept, floats like 1e-7 or 0.00001)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{_to_json(k)}:{_to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_to_json(v) for v in value) + "]"
    if isinstance(value, float):
        return _float_json(value)
    return json.dumps(value, ensure_ascii=False)


def _float_json(x: float) -> str:
    text = repr(x)  # the shortest digits that round-trip, as serde_json's
    mantissa, _, exponent = text.partition("e")
    if not exponent:
        return text
    power = int(exponent)
    if power == -5:  # Python writes 1e-05, serde_json 0.00001
        return ("-" if x < 0 else "") + "0.0000" + mantissa.lstrip("-").replace(".", "")
    return f"{mantissa}e{'+' if power > 0 else '-'}{abs(power)}"


# ---------------------------------------------------------------------------------------------------
# Tool calls: the public parsers

def parse_tool_calls(text: str, tools: list[dict[str, Any]] | None = None) -> ParsedToolCalls:
    """Extract M3 tool calls from a whole generation: `(content, tool_calls)` plus `.warnings`.

    vLLM's non-streaming `extract_tool_calls`: content is the text before the block (None if empty),
    verbatim; text after the block is dropped. If the block is malformed, cut off or holds no invoke,
    nothing is called and the whole text is the content. `tools` (the request's OpenAI tool list) types
    the arguments; without it every value is a string.
    """
    if TOOL_CALL_START not in text:
        return ParsedToolCalls(text, [], _stray_markup_warnings(text))
    grammar = _ToolGrammar(_tool_types(tools))
    try:
        events = grammar.feed(text) + grammar.finish()
    except _GrammarError as e:
        return ParsedToolCalls(text, [], [f"{e}; no tool call made, the whole text is content"])
    delta = _delta(events)
    if not delta.tool_calls:
        return ParsedToolCalls(text, [], ["the tool-call block holds no <invoke>; the whole text is content"])
    return ParsedToolCalls(delta.content, delta.tool_calls, delta.warnings)


def _stray_markup_warnings(text: str) -> list[str]:
    if NS in text or re.search(r"<(?:tool_call|invoke)\b", text):
        return [f"tool-call markup without the {TOOL_CALL_START!r} opener is plain content"]
    return []


def _delta(events: list[str | ToolCall | _Dropped]) -> Delta:
    dropped = "".join(e.text for e in events if isinstance(e, _Dropped))
    return Delta(content="".join(e for e in events if isinstance(e, str)) or None,
                 tool_calls=[e for e in events if isinstance(e, ToolCall)],
                 warnings=[f"text after </tool_call> is ignored: {_snippet(dropped)}"] if dropped.strip() else [])


class ToolCallStream:
    """vLLM's streaming M3 tool-call parsing: feed generated text as it arrives, get final pieces back.

    Content streams out at once (a possible half-written block opener is held back), each call arrives
    whole when its `</invoke>` is in. On malformed markup the calls already made stand, the unparsed text
    comes back as content and so does every later chunk. Call `finish()` at the end of the generation:
    it flushes held-back text (or a cut-off block, as content) and readies the stream for the next one.
    """

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self._grammar = _ToolGrammar(_tool_types(tools))
        self._failed = False

    def reset(self) -> None:
        """Start a new generation (vLLM does this when a request's previous text is empty)."""
        self._grammar.reset()
        self._failed = False

    def feed(self, delta: str) -> Delta:
        if self._failed:
            return Delta(content=delta or None)
        try:
            return _delta(self._grammar.feed(delta))
        except _GrammarError as e:
            self._failed = True
            out = _delta(e.events)
            out.content = ((out.content or "") + self._grammar.reset()) or None
            out.warnings.append(f"{e}; the rest of the stream is content")
            return out

    def finish(self) -> Delta:
        if self._failed:
            self.reset()
            return Delta()
        try:
            out = _delta(self._grammar.finish())
        except _GrammarError as e:
            out = Delta(content=self._grammar.reset() or None, warnings=[f"{e}; its text is content"])
        self.reset()
        return out


# ---------------------------------------------------------------------------------------------------
# Both together

def parse_assistant_message(text: str, *, tools: list[dict[str, Any]] | None = None,
                            started_in_reasoning: bool | None = None) -> dict[str, Any]:
    """An OpenAI chat `message` dict from one generation, as vLLM's chat endpoint builds it.

    Keys: role, content (None when nothing is left), reasoning_content (None without reasoning),
    tool_calls (a list, maybe empty), and `warnings` only when something was left unparsed. Tool calls
    are looked for in the content only: a call the model merely thought about is not made. (vLLM runs
    its tool parser only for requests with tools; here `tools` only supplies the argument types.)
    """
    split = split_reasoning(text, started_in_reasoning=started_in_reasoning)
    parsed = parse_tool_calls(split.content or "", tools)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": parsed.content if parsed.tools_called else split.content,
        "reasoning_content": split.reasoning_content,
        "tool_calls": [c.to_dict() for c in parsed.tool_calls],
    }
    warnings = (["think block never closed (generation cut off?): all of it is reasoning_content"]
                if split.unterminated else []) + parsed.warnings
    if warnings:
        message["warnings"] = warnings
    return message
