"""The Generation service's logic, independent of how it is hosted (Ray Serve or plain grpc.aio).

``GenerationService`` validates, tokenizes and renders chats, calls an engine client for token
outputs, and turns them into ``GenerateResponse`` messages (detokenized text, stop strings,
reasoning/content/tool calls, logprobs, usage, timings). Errors are ``RequestError``s carrying the
gRPC status; the host sets them on the call. No torch, no Ray.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import grpc

from protos.exaone.v1 import generation_pb2 as pb
from replicas.outputs import QueueFullError, ReplicaUnavailableError, RequestRejectedError
from replicas.sampling_params import SamplingParams
from router.errors import RequestError, invalid
from router.hops import HopStats
from router.prompt_workers import PromptWorkers
from router.requests import (
    DEFAULT_MAX_TOKENS,
    RequestLimits,
    check_counts,
    check_size,
    check_token_ids,
    prompt_of,
    request_id_of,
    sampling_params_of,
    tokenized,
)
from router.stream import TextDelta, stream_text
from router.tokenizer import Tokenizer

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


class EngineClient(Protocol):
    """Where token generation happens: an attention replica (over Ray) or an in-process engine.

    ``generate`` raises ValueError for input the engine rejects, QueueFullError at capacity and
    ReplicaUnavailableError when a replica it needed was lost; closing the iterator early must
    abort the request."""

    def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[Any]: ...


class GenerationService:
    def __init__(
        self,
        tokenizer: Tokenizer,
        engine: EngineClient,
        limits: RequestLimits,
        model_info: pb.ModelInfo,
        prompts: PromptWorkers | None = None,
        hops: HopStats | None = None,
    ):
        """``prompts``: where large requests are rendered and tokenized (a worker process);
        None: inline, on the caller's event loop. ``hops``: gets the router hop of every
        delta (router.hops)."""
        self.tokenizer, self.engine, self.limits, self.info = tokenizer, engine, limits, model_info
        self.prompts, self.hops = prompts, hops
        self._token_text: dict[int, str] = {}

    # ---- Generate ------------------------------------------------------------------------------
    async def generate(
        self,
        request: pb.GenerateRequest,
        default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
        on_prompt: Callable[[int], None] | None = None,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """``default_max_tokens``: when stopping.max_tokens is unset (None: what the context
        leaves, as OpenAI's chat API does). ``on_prompt``: told the prompt's token count once
        the request is accepted, before its first message."""
        arrival = time.monotonic()
        check_size(request, self.limits)
        check_counts(request, self.limits)
        request_id = request_id_of(request)
        if self.prompts is None:
            prompt = prompt_of(request, self.tokenizer, self.limits)
        else:
            prompt = await self.prompts.prompt(request)
        params = sampling_params_of(request, len(prompt.token_ids), self.limits, default_max_tokens)
        if prompt.prefix_boundaries:
            params = dataclasses.replace(params, prefix_boundaries=prompt.prefix_boundaries)
        if on_prompt is not None:
            on_prompt(len(prompt.token_ids))
        # The engine's id for this stream alone: a caller's request_id is only echoed back, so
        # two streams with the same one (at once, or one just closed whose abort is still on its
        # way) never share an engine request or each other's tokens.
        stream_id = f"{request_id}#{uuid.uuid4().hex[:16]}"
        outputs = _Tracked(self.engine.generate(stream_id, prompt.token_ids, params))
        deltas = stream_text(
            outputs,
            self.tokenizer,
            stop=params.stop,
            chat=prompt.chat,
            thinking=prompt.thinking,
            tools=prompt.tools,
            skip_special_tokens=not request.include_special_tokens,
        )
        first_token_at = None
        try:
            async for d in _translate_errors(deltas):
                if d.token_ids and first_token_at is None:
                    first_token_at = time.monotonic()
                if d.token_ids or d.text or d.tool_calls or d.tool_call_errors:
                    response = pb.GenerateResponse(request_id=request_id, delta=self._delta(d))
                    if self.hops is not None and d.received_s is not None:
                        self.hops.observe("router", time.time() - d.received_s)
                    yield response
                if d.finished:
                    now = time.monotonic()
                    final = pb.Final(
                        finish_reason=FINISH_REASONS.get(
                            d.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED
                        ),
                        stop_string=d.stop_string or "",
                        stop_token_id=_stop_token_id(d, request.stopping.stop_token_ids),
                        usage=pb.Usage(
                            prompt_tokens=len(prompt.token_ids),
                            cached_prompt_tokens=outputs.last_cached,
                            completion_tokens=d.num_output_tokens,
                            accepted_draft_tokens=outputs.last_accepted,
                            drafted_tokens=outputs.last_drafted,
                        ),
                        timings=pb.Timings(
                            queue_ms=1000 * (outputs.queue_time_s or 0.0),
                            time_to_first_token_ms=1000 * ((first_token_at or now) - arrival),
                            total_ms=1000 * (now - arrival),
                        ),
                        prompt_logprobs=self._logprobs(outputs.prompt_logprobs or []),
                    )
                    yield pb.GenerateResponse(request_id=request_id, final=final)
                    return
        finally:
            await deltas.aclose()

    def _delta(self, d: TextDelta) -> pb.Delta:
        return pb.Delta(
            token_ids=d.token_ids,
            text=d.text,
            reasoning=d.reasoning,
            content=d.content,
            tool_calls=[
                pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments) for c in d.tool_calls
            ],
            tool_call_errors=[
                pb.ToolCallError(raw=bad.raw, reason=bad.reason) for bad in d.tool_call_errors
            ],
            logprobs=self._logprobs(d.logprobs or []),
        )

    def _logprobs(self, entries) -> list[pb.TokenLogprob]:
        return [
            pb.TokenLogprob(
                token_id=entry.token_id,
                token=self._token(entry.token_id),
                logprob=entry.logprob,
                top=[
                    pb.TopLogprob(token_id=t, token=self._token(t), logprob=v) for t, v in entry.top
                ],
            )
            for entry in entries
        ]

    def _token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], False)
        return text

    # ---- unary methods -------------------------------------------------------------------------
    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        check_size(request, self.limits)
        check_counts(request, self.limits)
        if self.prompts is None:
            text, ids = tokenized(request, self.tokenizer, self.limits)
        else:
            text, ids = await self.prompts.tokenized(request)
        return pb.TokenizeResponse(token_ids=ids, text=text)

    def detokenize(self, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
        check_size(request, self.limits)
        ids = check_token_ids(request.token_ids, self.limits, "token_ids")
        return pb.DetokenizeResponse(
            text=self.tokenizer.decode(ids, not request.include_special_tokens)
        )

    def model_info(self) -> pb.ModelInfo:
        return self.info


def _stop_token_id(d: TextDelta, listed: Sequence[int]) -> int | None:
    """The caller's stop token id that ended the stream (its last token), else None."""
    stopped = d.finish_reason == "stop" and d.stop_string is None and d.token_ids
    return d.token_ids[-1] if stopped and d.token_ids[-1] in listed else None


class _Tracked:
    """Passes engine outputs through, remembering the fields only the final message needs."""

    def __init__(self, outputs: AsyncIterator[Any]):
        self._outputs = outputs
        self.queue_time_s: float | None = None
        self.prompt_logprobs = None
        self.last_cached = self.last_accepted = self.last_drafted = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        out = await self._outputs.__anext__()
        if self.queue_time_s is None:
            self.queue_time_s = getattr(out, "queue_time_s", None)
        if out.prompt_logprobs:
            self.prompt_logprobs = out.prompt_logprobs
        self.last_cached = getattr(out, "num_cached_tokens", 0)
        self.last_accepted = getattr(out, "num_accepted_draft_tokens", 0)
        self.last_drafted = getattr(out, "num_drafted_tokens", 0)
        return out

    async def aclose(self) -> None:
        close = getattr(self._outputs, "aclose", None)
        if close is not None:
            await close()


async def _translate_errors(deltas: AsyncIterator[TextDelta]) -> AsyncIterator[TextDelta]:
    """Engine-side rejections -> RequestError with the matching status."""
    try:
        async for d in deltas:
            yield d
    except QueueFullError as e:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from e
    except ReplicaUnavailableError as e:
        raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from e
    except RequestRejectedError as e:
        raise invalid(str(e)) from e
    except RequestError:
        raise
    except Exception as e:  # the server's fault, not the caller's: never INVALID_ARGUMENT
        raise RequestError(
            grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}: {e})"
        ) from e
