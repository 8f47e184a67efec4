"""The OpenAI-compatible HTTP server, run by each Router replica beside its gRPC server
(cluster.deployments.ingress): on the same host, with the same TLS files, stream limit
(router.max_ongoing_requests, counted over both protocols), request size and stream timeout.
Several replicas on one node share the port (SO_REUSEPORT). A connection that sends no whole
request's headers within router.http_read_timeout_s of opening or of its last response is
closed, and a body that does not arrive within it is answered 408: a client that connects and
sends nothing, or a byte now and then, holds no connection for good (aiohttp's own limit on
idle connections is an hour, and it sets none on a body).

The API itself is router.openai_api (no HTTP here but framing): /v1/chat/completions and
/v1/completions (JSON, or server-sent events with ``stream``), /v1/models, /health, /tokenize
and /detokenize (also under /v1). Errors are OpenAI's JSON shape, the status from
router.errors.HTTP_STATUS; after a stream has started, one ``data: {"error": ...}`` event, then
``data: [DONE]``. A client that disconnects cancels its handler, which aborts its requests and
frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

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


def _internal(error: Exception) -> RequestError:
    """An error of the server's own (never the caller's: never a 400)."""
    return RequestError(
        grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}: {error})"[:1000]
    )


@web.middleware
async def _openai_errors(request: web.Request, handler):
    """aiohttp's own errors (no such route, wrong method) as OpenAI's error object."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _json(error_body(e.status, f"{request.method} {request.path}: {e.reason}"), e.status)


class OpenAIServer:
    """The handlers; ``slots`` is shared with the replica's gRPC server."""

    def __init__(
        self,
        frontend: OpenAIFrontend,
        healthy: HealthFn,
        slots: StreamSlots,
        max_request_bytes: int,
        timeout_s: float | None,
        metrics=None,
        read_timeout_s: float = 30.0,
    ):
        """``metrics``: told of every refused or failed request (``failed``, with the gRPC
        status name), as the gRPC server tells it; ``read_timeout_s``:
        router.http_read_timeout_s."""
        self.frontend, self.healthy, self.slots = frontend, healthy, slots
        self.max_request_bytes, self.timeout_s = max_request_bytes, timeout_s
        self.metrics = metrics
        self.read_timeout_s = read_timeout_s

    def _reported(self, error: RequestError) -> dict[str, Any]:
        """The error counted in the metrics, as OpenAI's error object."""
        if self.metrics is not None:
            self.metrics.failed(error.code.name)
        return error_body(error.http_status, error.message, error.param)

    def _failure(self, error: RequestError) -> web.Response:
        response = _json(self._reported(error), error.http_status)
        if isinstance(error, _TooSlowError):  # the rest of its body is not waited for
            response.force_close()
        return response

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_request_bytes, middlewares=[_openai_errors])
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
            return self._failure(e)

    async def tokenize(self, request: web.Request) -> web.Response:
        return await self._unary(request, self.frontend.tokenize)

    async def detokenize(self, request: web.Request) -> web.Response:
        return await self._unary(request, self.frontend.detokenize)

    async def _unary(self, request: web.Request, method) -> web.Response:
        """A JSON body in, ``method``'s answer (a dict, or an awaitable of one) out."""
        try:
            answer = method(await self._body(request))
            return _json(await answer if inspect.isawaitable(answer) else answer)
        except RequestError as e:
            return self._failure(e)
        except Exception as e:  # noqa: BLE001 - the server's fault: a 500 in OpenAI's shape
            _log.exception("%s failed", request.path)
            return self._failure(_internal(e))

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
                except TimeoutError as e:
                    raise self._timeout_error(deadline, e) from None
        except RequestError as e:
            return self._failure(e)
        except Exception as e:  # noqa: BLE001 - the server's fault: a 500 in OpenAI's shape
            _log.exception("%s request failed", kind)
            return self._failure(_internal(e))

    async def _stream(self, request: web.Request, call, deadline) -> web.StreamResponse:
        """Errors before the first chunk raise (the caller answers with a status); once the
        headers are out, every ending is handled here and the response returned."""
        async with aclosing(self.frontend.stream(call)) as chunks:
            try:  # the first chunk comes once every choice was accepted: errors get a status
                async with asyncio.timeout_at(deadline):
                    first = await anext(chunks, None)
            except TimeoutError as e:
                raise self._timeout_error(deadline, e) from None
            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(request)
            error: RequestError | None = None
            try:
                if first is not None:
                    await _event(response, first)
                    async with asyncio.timeout_at(deadline):
                        async for chunk in chunks:
                            await _event(response, chunk)
            except ConnectionError:  # the client is gone: nothing more to say to it
                return response
            except RequestError as e:  # after the headers: one error event ends the stream
                error = e
            except TimeoutError as e:
                error = self._timeout_error(deadline, e)
            except Exception as e:  # noqa: BLE001 - the server's fault, still one clean ending
                _log.exception("stream failed")
                error = _internal(e)
        # The requests are closed (aborted) by now; the ending gets a few seconds, so a client
        # that stopped reading cannot hold this stream's slots.
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(5.0):
                if error is not None:
                    await _event(response, self._reported(error))
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
        return response

    def _timeout_error(self, deadline: float | None, error: TimeoutError) -> RequestError:
        """router.request_timeout_s when it is the deadline that passed; any other timeout
        is the server's own fault."""
        if deadline is None or asyncio.get_running_loop().time() < deadline:
            return _internal(error)
        return RequestError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the request ran past the server's limit of {self.timeout_s:g} s "
            "(router.request_timeout_s); ask for fewer tokens or raise the limit",
        )

    async def _body(self, request: web.Request) -> Any:
        """The JSON body; 413 past router.max_request_bytes, before the body is read."""
        limit = self.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(f"{request.content_length} bytes", limit)
        try:
            async with asyncio.timeout(self.read_timeout_s):
                raw = await request.read()
        except TimeoutError:
            raise _TooSlowError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request body did not arrive within {self.read_timeout_s:g} s "
                "(router.http_read_timeout_s): send it at once",
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise _too_large("larger than that", limit) from None
        except RequestPayloadError as e:  # bad chunked framing or compression: the client's
            raise invalid(f"the request body could not be read ({e})") from None
        try:
            body = json.loads(raw)
        except RecursionError:
            raise invalid("the request body nests too deeply") from None
        except ValueError as e:
            raise invalid(f"the request body is not valid JSON ({e})") from None
        try:  # \ud800-style escapes decode to strings no UTF-8 (or protobuf) can hold
            _dumps(body).encode()
        except UnicodeEncodeError:
            raise invalid(
                "the request body has an unpaired surrogate escape (\\ud800-\\udfff) in a "
                "string: send valid Unicode"
            ) from None
        except RecursionError:
            raise invalid("the request body nests too deeply") from None
        return body


class _TooLargeError(RequestError):
    """A body over router.max_request_bytes: 413 over HTTP (gRPC's INVALID_ARGUMENT)."""

    @property
    def http_status(self) -> int:
        return 413


class _TooSlowError(RequestError):
    """A body that did not arrive within router.http_read_timeout_s: 408, the connection
    closed."""

    @property
    def http_status(self) -> int:
        return 408


def _too_large(said: str, limit: int) -> RequestError:
    return _TooLargeError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request body is {said}; the limit is {limit} bytes (router.max_request_bytes): send a "
        "shorter prompt",
    )


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
    # Streams still open at shutdown get a second (as gRPC's stop(1.0)), not aiohttp's 60 s.
    # aiohttp's keep-alive timeout runs from a connection's start and from each response until
    # a request's headers are whole: past it, the connection is closed.
    runner = web.AppRunner(
        server.app(),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=1.0,
        keepalive_timeout=server.read_timeout_s,
    )
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
