"""Turn a stream of token outputs into text deltas: detokenize, apply stop strings, parse.

The token stream is any async iterator of objects with ``new_token_ids``, ``finished``,
``finish_reason``, ``logprobs``, ``prompt_logprobs``, ``num_prompt_tokens`` (the engine's
RequestOutput, or the same fields arriving over Ray). When a stop string matches, the stream is
closed, which aborts the request upstream, and the final delta reports ``finish_reason="stop"``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.detokenizer import Decoder, IncrementalDetokenizer, StopStringMatcher
from router.parsing import OutputParser, ToolCall, ToolCallError


@dataclass
class TextDelta:
    token_ids: list[int]
    text: str
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_errors: list[ToolCallError] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_string: str | None = None
    logprobs: list[Any] | None = None
    prompt_logprobs: list[Any] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    received_s: float | None = None
    """When the router received the output this delta comes from (router.hops)."""


async def stream_text(
    outputs: AsyncIterator[Any],
    tokenizer: Decoder,
    stop: Sequence[str] = (),
    chat: bool = False,
    thinking: bool = True,
    tools: bool = True,
    skip_special_tokens: bool = True,
) -> AsyncGenerator[TextDelta, None]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    stops = StopStringMatcher(stop)
    parser = OutputParser(thinking, tools) if chat else None
    num_output = 0
    try:
        async for out in outputs:
            num_output += len(out.new_token_ids)
            text = stops.feed(detok.add(out.new_token_ids))
            stopped = stops.stopped is not None
            finished = stopped or out.finished
            if finished and not stopped:
                text += stops.feed(detok.flush())
                if stops.stopped is None:
                    text += stops.flush()
                stopped = stops.stopped is not None
            delta = TextDelta(
                token_ids=list(out.new_token_ids),
                text=text,
                finished=finished,
                finish_reason="stop" if stopped else _reason(out.finish_reason),
                stop_string=stops.stopped,
                logprobs=out.logprobs,
                prompt_logprobs=out.prompt_logprobs,
                num_prompt_tokens=out.num_prompt_tokens,
                num_output_tokens=num_output,
                received_s=getattr(out, "received_s", None),
            )
            if parser is not None:
                parsed = parser.feed(text, final=finished)
                delta.reasoning, delta.content = parsed.reasoning, parsed.content
                delta.tool_calls, delta.tool_call_errors = (
                    parsed.tool_calls,
                    parsed.tool_call_errors,
                )
            yield delta
            if finished:
                return
    finally:
        close = getattr(outputs, "aclose", None)
        if close is not None:
            await close()  # aborts the request upstream if it is still running


def _reason(reason: Any) -> str | None:
    return None if reason is None else str(getattr(reason, "value", reason))
