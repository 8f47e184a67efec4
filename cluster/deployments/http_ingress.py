"""The OpenAI-compatible HTTP server, run by each Router replica beside its gRPC server
(cluster.deployments.ingress): on the same host, with the same TLS files, stream limit
(router.max_ongoing_requests, counted over both protocols), request size and stream timeout.
Several replicas on one node share the port (SO_REUSEPORT).

The API itself is router.openai_api (no HTTP here but framing): /v1/chat/completions and
/v1/completions (JSON, or server-sent events with ``stream``), /v1/models, /health, /tokenize
and /detokenize (also under /v1). Errors are OpenAI's JSON shape, the status from
router.errors.HTTP_STATUS; after a stream has started, one ``data: {"error": ...}`` event, then
``data: [DONE]``. A client that disconnects cancels its handler, which aborts its requests and
frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc
from aiohttp import web

from router.errors import HTTP_ERROR_TYPE, RequestError, invalid
from router.openai_api.frontend import OpenAIFrontend
from router.openai_api.requests import Kind
from router.stream_slots import StreamSlots

HealthFn = Callable[[], Awaitable[bool]]
_log = logging.getLogger("ray.serve")
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies (nginx) pass each event on at once
}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {
        "error": {
            "message": message,
            "type": HTTP_ERROR_TYPE.get(status, "error"),
            "param": param,
            "code": status,
        }
    }


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _failure(error: RequestError) -> web.Response:
    return _json(error_body(error.http_status, error.message, error.param), error.http_status)


class OpenAIServer:
    """The handlers; ``slots`` is shared with the replica's gRPC server."""

    def __init__(
        self,
        frontend: OpenAIFrontend,
        healthy: HealthFn,
        slots: StreamSlots,
        max_request_bytes: int,
        timeout_s: float | None,
    ):
        self.frontend, self.healthy, self.slots = frontend, healthy, slots
        self.max_request_bytes, self.timeout_s = max_request_bytes, timeout_s

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_request_bytes)
        app.add_routes(
            [
                web.get("/health", self.health),
                web.get("/v1/models", self.models),
                web.get("/v1/models/{model:.+}", self.model),
                web.post("/v1/chat/completions", self.chat),
                web.post("/v1/completions", self.completions),
            ]
            + [web.post(f"{prefix}/tokenize", self.tokenize) for prefix in ("", "/v1")]
            + [web.post(f"{prefix}/detokenize", self.detokenize) for prefix in ("", "/v1")]
        )
        return app

    # ---- small endpoints ------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if await self.healthy():
            return web.Response(status=200)
        return _json(error_body(503, "no attention replica can serve now; retry later"), 503)

    async def models(self, request: web.Request) -> web.Response:
        return _json(self.frontend.models())

    async def model(self, request: web.Request) -> web.Response:
        try:
            return _json(self.frontend.model(request.match_info["model"]))
        except RequestError as e:
            return _failure(e)

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            return _json(await self.frontend.tokenize(await self._body(request)))
        except RequestError as e:
            return _failure(e)
        except _TooLarge as e:
            return e.response

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            return _json(self.frontend.detokenize(await self._body(request)))
        except RequestError as e:
            return _failure(e)
        except _TooLarge as e:
            return e.response

    # ---- completions ----------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "completion")

    async def _complete(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        try:
            body = await self._body(request)
            call = self.frontend.call(kind, body, request.headers.get("X-Request-Id", ""))
            with self.slots.hold(len(call.requests)):
                deadline = None
                if self.timeout_s is not None:
                    deadline = asyncio.get_running_loop().time() + self.timeout_s
                if call.stream:
                    return await self._stream(request, call, deadline)
                try:
                    async with asyncio.timeout_at(deadline):
                        return _json(await self.frontend.complete(call))
                except TimeoutError:
                    raise self._timed_out() from None
        except RequestError as e:
            return _failure(e)
        except _TooLarge as e:
            return e.response

    async def _stream(self, request: web.Request, call, deadline) -> web.StreamResponse:
        async with aclosing(self.frontend.stream(call)) as chunks:
            try:  # the first chunk comes once every choice was accepted: errors get a status
                async with asyncio.timeout_at(deadline):
                    first = await anext(chunks, None)
            except TimeoutError:
                raise self._timed_out() from None
            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(request)
            try:
                if first is not None:
                    await _event(response, first)
                    async with asyncio.timeout_at(deadline):
                        async for chunk in chunks:
                            await _event(response, chunk)
            except RequestError as e:  # after the headers: one error event ends the stream
                await _event(response, error_body(e.http_status, e.message, e.param))
            except TimeoutError:
                late = self._timed_out()
                await _event(response, error_body(late.http_status, late.message))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response

    def _timed_out(self) -> RequestError:
        return RequestError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the request ran past the server's limit of {self.timeout_s:g} s "
            "(router.request_timeout_s); ask for fewer tokens or raise the limit",
        )

    async def _body(self, request: web.Request) -> Any:
        """The JSON body; 413 past router.max_request_bytes, before the body is read."""
        limit = self.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _TooLarge(request.content_length, limit)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _TooLarge(None, limit) from None
        try:
            return json.loads(raw)
        except RecursionError:
            raise invalid("the request body nests too deeply") from None
        except ValueError as e:
            raise invalid(f"the request body is not valid JSON ({e})") from None


class _TooLarge(Exception):
    def __init__(self, size: int | None, limit: int):
        said = f"{size} bytes" if size is not None else "larger than the limit"
        message = (
            f"request body is {said}; the limit is {limit} bytes (router.max_request_bytes): "
            "send a shorter prompt"
        )
        self.response = _json(error_body(413, message), 413)


async def _event(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(b"data: " + _dumps(data).encode() + b"\n\n")


async def start_http_ingress(
    host: str,
    port: int,
    server: OpenAIServer,
    tls: tuple[str, str] | None = None,
) -> web.AppRunner:
    """Serve the OpenAI-compatible API on host:port (shared with other replicas on this
    node); with ``tls`` (certificate chain file, private key file: PEM) over HTTPS only.
    ``runner.cleanup()`` stops it."""
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
    site = web.TCPSite(runner, host, port, reuse_port=True, ssl_context=context)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port} for HTTP: {e}") from e
    return runner
