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

from protos.exaone.v1 import generation_pb2 as pb
from router.errors import RequestError, invalid
from router.openai_api.requests import (
    Call,
    Kind,
    _message,
    _tool,
    body_object,
    chat_call,
    completion_call,
    not_found_model,
    renamed,
)
from router.openai_api.responses import ChoiceState, usage_of, usage_so_far
from router.service import GenerationService

_END = object()


class OpenAIFrontend:
    def __init__(self, service: GenerationService, served: str, max_model_len: int, metrics=None):
        """``metrics``: told of every choice's final message (``finished``) and of every
        refused or failed request (``failed``), as the gRPC server tells it."""
        self.service, self.served, self.max_model_len = service, served, max_model_len
        self.metrics = metrics
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
        return parse(body, self.served, request_id)

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
        started: set[int] = set()
        async for i, response in self._merged(call, states):
            if waiting is not None:
                waiting.append((i, response))
                started.add(i)
                if len(started) < len(states):
                    continue
                if call.kind == "chat":
                    yield chunk([s.role_part() for s in states])
                ready, waiting = waiting, None
            else:
                ready = [(i, response)]
            for j, r in ready:
                state = states[j]
                part = state.finish(r.final) if r.HasField("final") else state.delta_part(r.delta)
                if part is not None:
                    yield chunk([part])
        if call.include_usage:
            yield chunk([], usage_of([s.final for s in states], call.n))

    async def complete(self, call: Call) -> dict[str, Any]:
        """The whole answer of a non-streamed request."""
        states = self._states(call)
        async for i, r in self._merged(call, states):
            if r.HasField("final"):
                states[i].finish(r.final)
            else:
                states[i].delta_part(r.delta)
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
        ids = call.requests[prompt * call.n].token_ids.ids  # a token-id prompt: its text
        return self.service.detokenize(pb.DetokenizeRequest(token_ids=ids)).text

    async def _merged(
        self, call: Call, states: list[ChoiceState]
    ) -> AsyncGenerator[tuple[int, pb.GenerateResponse], None]:
        """(choice index, response) from every choice's stream as they come; closing this
        closes them all (aborting what still runs). Each state learns its prompt's length."""
        streams = [
            self.service.generate(r, call.default_max_tokens, partial(_set_prompt, state))
            for r, state in zip(call.requests, states, strict=True)
        ]
        try:
            if len(streams) == 1:
                async for r in streams[0]:
                    self._observe(r)
                    yield 0, r
                return
            async with aclosing(_interleaved(streams)) as merged:
                async for i, r in merged:
                    self._observe(r)
                    yield i, r
        except RequestError as e:
            if self.metrics is not None:
                self.metrics.failed(e.code.name)
            raise renamed(e, call.kind) from e
        finally:
            for s in streams:
                await s.aclose()

    def _observe(self, response: pb.GenerateResponse) -> None:
        if self.metrics is not None and response.HasField("final"):
            self.metrics.finished(response.final)

    # ---- tokenizer ------------------------------------------------------------------------------
    async def tokenize(self, body: Any) -> dict[str, Any]:
        """vLLM's /tokenize: {prompt} or {messages[, tools]} -> {count, max_model_len, tokens}."""
        body = body_object(body)
        if (name := body.get("model")) is not None and name != self.served:
            raise not_found_model(name, self.served)
        request = pb.TokenizeRequest()
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list):
                raise invalid("messages must be an array", "messages")
            request.chat.messages.extend(
                _message(m, f"messages[{i}]") for i, m in enumerate(messages)
            )
            tools = body.get("tools") or []
            request.chat.tools.extend(_tool(t, f"tools[{k}]") for k, t in enumerate(tools))
        elif isinstance(body.get("prompt"), str):
            request.text = body["prompt"]
            request.parse_special_tokens = body.get("parse_special_tokens") is True
        else:
            raise invalid("send prompt (a string) or messages (an array)", "prompt")
        try:
            response = await self.service.tokenize(request)
        except RequestError as e:
            raise renamed(e, "chat") from e
        ids = list(response.token_ids)
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    def detokenize(self, body: Any) -> dict[str, Any]:
        """vLLM's /detokenize: {tokens} -> {prompt}."""
        body = body_object(body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens
        ):
            raise invalid("tokens must be an array of token ids (integers >= 0)", "tokens")
        try:
            text = self.service.detokenize(pb.DetokenizeRequest(token_ids=tokens)).text
        except RequestError as e:
            raise RequestError(e.code, e.message.replace("token_ids", "tokens"), "tokens") from e
        return {"prompt": text}


def _set_prompt(state: ChoiceState, tokens: int) -> None:
    state.prompt_tokens = tokens


def _id(kind: Kind) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


async def _interleaved(streams) -> AsyncGenerator[tuple[int, pb.GenerateResponse], None]:
    """Several streams' messages in arrival order; the first error ends it (and the rest)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for r in stream:
                queue.put_nowait((i, r))
            queue.put_nowait((i, _END))
        except Exception as e:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait((i, e))

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
