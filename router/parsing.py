"""Split EXAONE output text into reasoning, content and tool calls, incrementally. No torch.

With thinking on, the prompt ends in ``<think>\\n``, so output starts as reasoning and
``</think>`` switches to content (the template's ``\\n\\n`` after it is dropped). Tool calls are
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (hermes style, as LG serves with);
each is checked as JSON when it closes. A malformed or unterminated call is reported as an
error event with the raw text, never raised.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

THINK_END = "</think>"
CALL_START, CALL_END = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON object text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:16]}")


@dataclass(frozen=True)
class ToolCallError:
    raw: str
    reason: str


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_errors: list[ToolCallError] = field(default_factory=list)

    def __iadd__(self, other: ParsedDelta) -> ParsedDelta:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls
        self.tool_call_errors += other.tool_call_errors
        return self


def parse_tool_call(raw: str) -> ToolCall | ToolCallError:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return ToolCallError(raw, f"not valid JSON: {e}")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return ToolCallError(raw, 'expected an object with a string "name"')
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            return ToolCallError(raw, f'"arguments" is a string but not JSON: {e}')
    if not isinstance(args, dict):
        return ToolCallError(raw, '"arguments" must be a JSON object')
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _partial_marker(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a marker."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class OutputParser:
    """Feed text deltas; get ParsedDelta events. ``finish()`` flushes at the end.

    Held back while streaming: a suffix that may be the start of a marker, the newline before
    ``</think>``, and trailing whitespace of content (dropped if a tool call follows).
    """

    def __init__(self, thinking: bool = True, tools: bool = True):
        self.state = "reasoning" if thinking else "content"
        self.tools = tools
        self.buffer = ""  # text not yet classified
        self.strip_newlines = 0  # newlines still to drop at the start of content
        self.saw_call = False

    def _markers(self) -> tuple[str, ...]:
        if self.state == "reasoning":
            return (THINK_END,)
        if self.state == "call":
            return (CALL_END,)
        return (CALL_START,) if self.tools else ()

    def feed(self, text: str, final: bool = False) -> ParsedDelta:
        out = ParsedDelta()
        self.buffer += text
        while hits := [(i, m) for m in self._markers() if (i := self.buffer.find(m)) >= 0]:
            index, marker = min(hits)
            before, self.buffer = self.buffer[:index], self.buffer[index + len(marker) :]
            if self.state == "call":
                result = parse_tool_call(before)
                if isinstance(result, ToolCall):
                    out.tool_calls.append(result)
                else:
                    out.tool_call_errors.append(result)
                self.state = "content"
            elif marker == THINK_END:
                out.reasoning += before.removesuffix("\n")
                self.state, self.strip_newlines = "content", 2
            else:  # CALL_START: content before it, minus the whitespace separating calls
                out.content += self._content(before.rstrip())
                self.state, self.saw_call = "call", True
        if final:
            if self.state == "call":
                out.tool_call_errors.append(ToolCallError(self.buffer, "unterminated <tool_call>"))
            elif self.state == "reasoning":
                out.reasoning += self.buffer
            else:
                out.content += self._content(self.buffer.rstrip() if self.saw_call else self.buffer)
            self.buffer = ""
            return out
        if self.state == "call":
            return out
        keep = _partial_marker(self.buffer, self._markers())
        ready = self.buffer[: len(self.buffer) - keep]
        ready = ready.rstrip("\n") if self.state == "reasoning" else ready.rstrip()
        self.buffer = self.buffer[len(ready) :]
        if self.state == "reasoning":
            out.reasoning += ready
        else:
            out.content += self._content(ready)
        return out

    def finish(self) -> ParsedDelta:
        return self.feed("", final=True)

    def _content(self, text: str) -> str:
        while self.strip_newlines and text.startswith("\n"):
            text, self.strip_newlines = text[1:], self.strip_newlines - 1
        if text:
            self.strip_newlines = 0
        return text


def parse_output(text: str, thinking: bool = True, tools: bool = True) -> ParsedDelta:
    """Whole-text convenience: everything at once."""
    parser = OutputParser(thinking, tools)
    out = parser.feed(text)
    out += parser.finish()
    return out
