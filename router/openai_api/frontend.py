"""The OpenAI-compatible API over the Generation service: each choice of a request is one
Generate stream (router.service), so validation, limits, the chat template, output parsing and
replica choice are the gRPC path's own. No HTTP library here: the host
(cluster.deployments.http_ingress) hands in parsed bodies and writes out the dicts.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from functools import partial
from typing import Any

import grpc

from protos.exaone.v1 import generation_pb2 as pb
from router.errors import RequestError
from router.openai_api.requests import (
    Call,
    Kind,
    chat_call,
    completion_call,
    detokenize_ids,
    not_found_model,
    renamed,
    tokenize_request,
)
from router.openai_api.responses import ChoiceState, usage_of, usage_so_far
from router.service import GenerationService

_END = object()


class OpenAIFrontend:
    def __init__(self, service: GenerationService, served: str, metrics=None):
        """``metrics``: told of every choice's final message (``finished``), as the gRPC
        server tells it (the HTTP host counts refusals and failures)."""
        self.service, self.served, self.metrics = service, served, metrics
        self.max_model_len = service.limits.max_model_len
        self.created = int(time.time())

    # ---- models ---------------------------------------------------------------------------------
    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.served,
            "object": "model",
            "created": self.created,
            "owned_by": "exaone-cluster",
            "root": self.served,
            "parent": None,
            "max_model_len": self.max_model_len,
        }

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model(self, name: str) -> dict[str, Any]:
        if name != self.served:
            raise not_found_model(name, self.served)
        return self.model_card()

    # ---- completions ----------------------------------------------------------------------------
    def call(self, kind: Kind, body: Any, request_id: str = "") -> Call:
        """Parse a /v1/chat/completions (``chat``) or /v1/completions body; RequestError when
        its shape is wrong."""
        parse = chat_call if kind == "chat" else completion_call
        return parse(body, self.served, self.service.limits, request_id)

    async def stream(self, call: Call) -> AsyncGenerator[dict[str, Any], None]:
        """The chunks of a streamed answer, without the SSE framing and the final [DONE].

        Nothing is yielded until every choice has its first message from the service, so a
        request the service refuses (bad value, capacity, no replica) raises RequestError
        before the first chunk, and the host can still answer it with an HTTP status."""
        chunk_id = _id(call.kind)
        created, states = int(time.time()), self._states(call)
        obj = "chat.completion.chunk" if call.kind == "chat" else "text_completion"

        def chunk(choices: list[dict[str, Any]], usage=None) -> dict[str, Any]:
            out = {
                "id": chunk_id,
                "object": obj,
                "created": created,
                "model": self.served,
                "choices": choices,
            }
            if call.include_usage:
                if usage is None and call.continuous_usage:
                    usage = usage_so_far(states, call.n)
                out["usage"] = usage
            return out

        waiting: list[tuple[int, pb.GenerateResponse]] | None = []
        async with aclosing(self._merged(call, states)) as merged:
            async for i, response in merged:
                if waiting is not None:  # until every choice was accepted
                    waiting.append((i, response))
                    if len({j for j, _ in waiting}) < len(states):
                        continue
                    if call.kind == "chat":
                        yield chunk([s.role_part() for s in states])
                    ready, waiting = waiting, None
                else:
                    ready = [(i, response)]
                for j, r in ready:
                    if (part := _part(states[j], r)) is not None:
                        yield chunk([part])
        if call.include_usage:
            yield chunk([], usage_of([s.final for s in states], call.n))

    async def complete(self, call: Call) -> dict[str, Any]:
        """The whole answer of a non-streamed request."""
        states = self._states(call)
        async with aclosing(self._merged(call, states)) as merged:
            async for i, r in merged:
                _part(states[i], r)
        return {
            "id": _id(call.kind),
            "object": "chat.completion" if call.kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.served,
            "choices": [s.choice() for s in states],
            "usage": usage_of([s.final for s in states], call.n),
        }

    def _states(self, call: Call) -> list[ChoiceState]:
        return [
            ChoiceState(
                i,
                chat=call.kind == "chat",
                logprobs=call.logprobs,
                echo=self._echo(call, i // call.n) if call.echo is not None else "",
            )
            for i in range(len(call.requests))
        ]

    def _echo(self, call: Call, prompt: int) -> str:
        assert call.echo is not None
        if call.echo[prompt]:
            return call.echo[prompt]
        request = call.requests[prompt * call.n]  # a token-id prompt: its text
        detokenize = pb.DetokenizeRequest(
            token_ids=request.token_ids.ids,
            include_special_tokens=request.include_special_tokens,
        )
        try:
            return self.service.detokenize(detokenize).text
        except RequestError as e:
            raise renamed(e, call.kind) from e

    async def _merged(
        self, call: Call, states: list[ChoiceState]
    ) -> AsyncGenerator[tuple[int, pb.GenerateResponse], None]:
        """(choice index, response) from every choice's stream as they come; closing this
        closes them all (aborting what still runs). Each state learns its prompt's length."""
        streams = [
            self.service.generate(r, call.default_max_tokens, partial(_set_prompt, state))
            for r, state in zip(call.requests, states, strict=True)
        ]
        finished: set[int] = set()
        try:
            if len(streams) == 1:
                async for r in _own_cancel_only(streams[0]):
                    self._observe(r, 0, finished)
                    yield 0, r
            else:
                async with aclosing(_interleaved(streams)) as merged:
                    async for i, r in merged:
                        self._observe(r, i, finished)
                        yield i, r
            if len(finished) < len(streams):  # the service always ends with a final message
                raise RequestError(
                    grpc.StatusCode.INTERNAL,
                    f"internal error: {len(streams) - len(finished)} of {len(streams)} choices "
                    "ended without their final message",
                )
        except RequestError as e:
            raise renamed(e, call.kind) from e
        finally:
            for s in streams:
                await s.aclose()

    def _observe(self, response: pb.GenerateResponse, i: int, finished: set[int]) -> None:
        if response.HasField("final"):
            finished.add(i)
            if self.metrics is not None:
                self.metrics.finished(response.final)

    # ---- tokenizer ------------------------------------------------------------------------------
    async def tokenize(self, body: Any) -> dict[str, Any]:
        """vLLM's /tokenize: {prompt} or {messages[, tools]} -> {count, max_model_len, tokens,
        token_strs} (token_strs: the vocabulary's strings when return_token_strs, else null)."""
        request, token_strs = tokenize_request(body, self.served, self.service.limits)
        try:
            response = await self.service.tokenize(request)
        except RequestError as e:
            raise renamed(e, "chat") from e
        ids = list(response.token_ids)
        return {
            "count": len(ids),
            "max_model_len": self.max_model_len,
            "tokens": ids,
            "token_strs": self.service.tokenizer.id_to_tokens(ids) if token_strs else None,
        }

    def detokenize(self, body: Any) -> dict[str, Any]:
        """vLLM's /detokenize: {tokens} -> {prompt}."""
        tokens = detokenize_ids(body, self.service.limits)
        try:
            text = self.service.detokenize(pb.DetokenizeRequest(token_ids=tokens)).text
        except RequestError as e:
            raise RequestError(e.code, e.message.replace("token_ids", "tokens"), "tokens") from e
        return {"prompt": text}


async def _own_cancel_only(stream) -> AsyncGenerator[pb.GenerateResponse, None]:
    """The stream's messages; a CancelledError of the stream's own (this task is not being
    cancelled) ends the request UNAVAILABLE, as it does a choice of several (_interleaved)."""
    try:
        async for r in stream:
            yield r
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise _cancelled() from None


def _cancelled() -> RequestError:
    return RequestError(
        grpc.StatusCode.UNAVAILABLE, "a choice's stream was cancelled inside the server; retry"
    )


def _part(state: ChoiceState, response: pb.GenerateResponse) -> dict[str, Any] | None:
    """A response's entry in a chunk (None: nothing to show yet)."""
    if response.HasField("final"):
        return state.finish(response.final)
    return state.delta_part(response.delta)


def _set_prompt(state: ChoiceState, tokens: int) -> None:
    state.prompt_tokens = tokens


def _id(kind: Kind) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


async def _interleaved(streams) -> AsyncGenerator[tuple[int, pb.GenerateResponse], None]:
    """Several streams' messages in arrival order; the first error ends it (and the rest)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        end: object = _END
        try:
            async for r in stream:
                queue.put_nowait((i, r))
        except Exception as e:  # noqa: BLE001 - handed to the reader, which raises it
            end = e
        except asyncio.CancelledError:  # ours (the reader is gone) or the stream's own
            end = _cancelled()
            raise
        finally:
            queue.put_nowait((i, end))  # the reader never waits on a choice that is over

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
