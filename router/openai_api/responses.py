"""exaone.v1 responses -> OpenAI's JSON objects: chunks, choices, logprobs, usage. No torch.

One ``ChoiceState`` per choice follows that choice's stream: it turns each Delta into the
choice's part of a chunk (``delta_part``) and remembers what a non-streaming answer returns
(``message``/``text``), the finish reason and the usage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from protos.exaone.v1 import generation_pb2 as pb
from router.parsing import CALL_END, CALL_START

FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


def _logprob(value: float) -> float:
    """A log-probability JSON can hold: -inf (a token the filters ruled out) as -9999.0, as
    vLLM's server writes it (strict JSON has no Infinity)."""
    return value if math.isfinite(value) else -9999.0


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="surrogatepass"))


def chat_logprobs(entries) -> list[dict[str, Any]]:
    """TokenLogprobs -> chat's ``logprobs.content`` entries."""
    return [
        {
            "token": e.token,
            "logprob": _logprob(e.logprob),
            "bytes": _bytes(e.token),
            "top_logprobs": [
                {"token": t.token, "logprob": _logprob(t.logprob), "bytes": _bytes(t.token)}
                for t in e.top
            ],
        }
        for e in entries
    ]


_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


@dataclass
class CompletionLogprobs:
    """Completions' logprobs object, grown delta by delta (text_offset counts characters of
    the tokens' text from the start of the choice's text)."""

    offset: int = 0
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, entries) -> dict[str, Any]:
        """Append entries; -> the object for just these (a streamed chunk's)."""
        part: dict[str, list[Any]] = {key: [] for key in _KEYS}
        for e in entries:
            top = {t.token: _logprob(t.logprob) for t in e.top}
            values = (e.token, _logprob(e.logprob), top, self.offset)
            for key, value in zip(_KEYS, values, strict=True):
                part[key].append(value)
                getattr(self, key).append(value)
            self.offset += len(e.token)
        return part

    def as_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _KEYS}


def usage_so_far(states: list[ChoiceState], n: int) -> dict[str, Any]:
    """The usage of a request still streaming (continuous_usage_stats): each prompt's tokens
    once, the tokens every choice generated so far."""
    prompt = sum(s.prompt_tokens for i, s in enumerate(states) if i % n == 0)
    completion = sum(s.completion_tokens for s in states)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def usage_of(finals: list[pb.Final | None], n: int) -> dict[str, Any]:
    """Usage of a request's choices (prompt-major, n per prompt): each prompt's tokens counted
    once, every choice's output; the MTP draft counts are our extension."""
    done = [f for f in finals if f is not None]
    firsts = [f for i, f in enumerate(finals) if f is not None and i % n == 0]
    prompt = sum(f.usage.prompt_tokens for f in firsts)
    completion = sum(f.usage.completion_tokens for f in done)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": sum(f.usage.cached_prompt_tokens for f in firsts)
        },
        "accepted_draft_tokens": sum(f.usage.accepted_draft_tokens for f in done),
        "drafted_tokens": sum(f.usage.drafted_tokens for f in done),
    }


class ChoiceState:
    """One choice's stream, as OpenAI shows it."""

    def __init__(self, index: int, chat: bool, logprobs: bool, echo: str = ""):
        self.index, self.chat, self.logprobs = index, chat, logprobs
        self.echo = echo
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.chat_logprobs: list[dict[str, Any]] = []
        self.completion_logprobs = CompletionLogprobs()
        self.final: pb.Final | None = None
        self.prompt_tokens = 0
        """Known once the service accepted the request."""
        self.completion_tokens = 0
        """Tokens generated so far."""

    # ---- streaming ------------------------------------------------------------------------------
    def delta_part(self, d: pb.Delta) -> dict[str, Any] | None:
        """The choice's entry of a chunk for this delta; None when it shows nothing: for chat,
        text the parser or a stop string holds back, with no logprobs to send (vLLM's server
        skips those too); a completion sends every delta that carries tokens."""
        self.completion_tokens += len(d.token_ids)
        if self.chat:
            delta: dict[str, Any] = {}
            if d.reasoning:
                delta["reasoning_content"] = d.reasoning
                self.reasoning.append(d.reasoning)
            content = d.content + "".join(
                # A call the model wrote that is not valid: its text, as the model wrote it.
                f"{CALL_START}{e.raw}{CALL_END if not e.reason.startswith('unterminated') else ''}"
                for e in d.tool_call_errors
            )
            if content:
                delta["content"] = content
                self.text.append(content)
            calls = []
            for c in d.tool_calls:
                call = {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments_json},
                }
                calls.append({"index": len(self.tool_calls), **call})
                self.tool_calls.append(call)
            if calls:
                delta["tool_calls"] = calls
            logprobs = None
            if self.logprobs and d.logprobs:
                entries = chat_logprobs(d.logprobs)
                self.chat_logprobs += entries
                logprobs = {"content": entries}
            if not delta and logprobs is None:
                return None
            return {
                "index": self.index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": None,
            }
        text = (self.echo if not self.text and self.echo else "") + d.text
        logprobs = None
        if self.logprobs and d.logprobs:
            logprobs = self.completion_logprobs.add(d.logprobs)
        if not text and logprobs is None and not d.token_ids:
            return None
        # A token whose text is held back (part of a UTF-8 character, or of a stop string) still
        # gets its chunk, with empty text, as vLLM's server sends it: clients time tokens by
        # chunks (TTFT, inter-token latency) and count them with continuous_usage_stats.
        self.text.append(text)
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": None}

    def role_part(self) -> dict[str, Any]:
        """Chat's first chunk entry of a choice: the role."""
        return {
            "index": self.index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def finish(self, final: pb.Final) -> dict[str, Any]:
        """-> the choice's last chunk entry (its finish reason)."""
        self.final = final
        if self.chat:
            return {
                "index": self.index,
                "delta": {},
                "logprobs": None,
                "finish_reason": self.finish_reason,
                "stop_reason": stop_reason(final),
            }
        text = self.echo if not self.text and self.echo else ""
        self.text.append(text)
        return {
            "index": self.index,
            "text": text,
            "logprobs": None,
            "finish_reason": self.finish_reason,
            "stop_reason": stop_reason(final),
        }

    @property
    def finish_reason(self) -> str | None:
        if self.final is None:
            return None
        reason = FINISH.get(self.final.finish_reason, "stop")
        return "tool_calls" if reason == "stop" and self.tool_calls else reason

    # ---- the whole answer -----------------------------------------------------------------------
    def choice(self) -> dict[str, Any]:
        stop = stop_reason(self.final) if self.final is not None else None
        if self.chat:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(self.text) if self.text or not self.tool_calls else None,
                "reasoning_content": "".join(self.reasoning) or None,
            }
            if self.tool_calls:
                message["tool_calls"] = self.tool_calls
            return {
                "index": self.index,
                "message": message,
                "logprobs": {"content": self.chat_logprobs} if self.logprobs else None,
                "finish_reason": self.finish_reason,
                "stop_reason": stop,
            }
        return {
            "index": self.index,
            "text": "".join(self.text),
            "logprobs": self.completion_logprobs.as_dict() if self.logprobs else None,
            "finish_reason": self.finish_reason,
            "stop_reason": stop,
        }


def stop_reason(final: pb.Final) -> str | int | None:
    """vLLM's stop_reason: the stop string or the caller's stop token id that ended the choice;
    None when the model's end-of-turn token or a length limit did."""
    if final.stop_string:
        return final.stop_string
    return final.stop_token_id if final.HasField("stop_token_id") else None
