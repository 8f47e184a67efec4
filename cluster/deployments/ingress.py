"""The client-facing gRPC server, run by each Router replica itself (grpc.aio in the replica).

Serve's generic gRPC proxy would add a process hop and a Ray object per streamed message; here
the router replica that tokenizes, detokenizes and parses also writes to the client's socket.
Serve still deploys, health-checks and scales the Router replicas. Several replicas on one node
share the port (SO_REUSEPORT; the kernel spreads connections among them).

Services: exaone.v1.Generation, grpc.health.v1.Health and server reflection.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.exaone.v1 import generation_pb2 as pb
from protos.exaone.v1 import generation_pb2_grpc as pb_grpc
from router.errors import RequestError
from router.service import GenerationService
from router.stream_slots import StreamSlots

HEALTH_SERVICES = ("", "exaone.v1.Generation")
HealthFn = Callable[[], Awaitable[bool]]


class GenerationServicer(pb_grpc.GenerationServicer):
    """``slots``: Generate streams this replica holds at once, shared with its HTTP server
    (more are refused with RESOURCE_EXHAUSTED, before any work); ``timeout_s``: how long one
    stream may run (then DEADLINE_EXCEEDED, and its request is aborted); None: no limit."""

    def __init__(
        self,
        service: GenerationService,
        metrics=None,
        slots: StreamSlots | None = None,
        timeout_s: float | None = None,
    ):
        self.service, self.metrics = service, metrics
        self.slots, self.timeout_s = slots or StreamSlots(None), timeout_s

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            with self.slots.hold():
                async with asyncio.timeout(self.timeout_s):
                    async for response in self.service.generate(request):
                        if self.metrics is not None and response.HasField("final"):
                            self.metrics.finished(response.final)
                        yield response
        except RequestError as e:
            await self._fail(context, e)
        except TimeoutError:
            await self._fail(
                context,
                RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the stream ran past the server's limit of {self.timeout_s:g} s "
                    "(router.request_timeout_s); ask for fewer tokens or raise the limit",
                ),
            )

    async def _fail(self, context: grpc.aio.ServicerContext, error: RequestError):
        if self.metrics is not None:
            self.metrics.failed(error.code.name)
        await context.abort(error.code, error.message)

    async def Tokenize(self, request, context):
        return await _unary(self.service.tokenize, request, context)

    async def Detokenize(self, request, context):
        return await _unary(self.service.detokenize, request, context)

    async def GetModelInfo(self, request, context):
        return self.service.model_info()


async def _unary(method, request, context: grpc.aio.ServicerContext):
    try:
        result = method(request)
        return await result if inspect.isawaitable(result) else result
    except RequestError as e:
        await context.abort(e.code, e.message)


class HealthServicer(health_pb2_grpc.HealthServicer):
    """SERVING while ``healthy()`` says the engine can serve; Watch re-checks every second."""

    def __init__(self, healthy: HealthFn, interval_s: float = 1.0):
        self.healthy, self.interval_s = healthy, interval_s

    async def _status(self, service: str) -> int:
        if service not in HEALTH_SERVICES:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        if await self.healthy():
            return health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request, context):
        return health_pb2.HealthCheckResponse(status=await self._status(request.service))

    async def Watch(self, request, context):
        last = None
        while True:  # ends when the client cancels
            status = await self._status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(self.interval_s)


CLIENT_PINGS = [
    # Clients may ping a quiet connection this often (router.client pings after 20 s without a
    # frame). gRPC's default, 5 min, counts such pings as abuse and closes the connection with
    # too_many_pings: a stream waiting minutes for its next token (a long queue, a long prompt's
    # prefill) then ended UNAVAILABLE "Too many pings" (measured: about 130 s after the last
    # frame with pings every 2-10 s, 100 s after it with router.client's; tests/integration/
    # test_quiet_connections.py).
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


async def start_ingress(
    host: str,
    port: int,
    service: GenerationService,
    healthy: HealthFn,
    metrics=None,
    max_message_bytes: int = 4 << 20,
    slots: StreamSlots | None = None,
    timeout_s: float | None = None,
    tls: tuple[str, str] | None = None,
) -> grpc.aio.Server:
    """Serve the public API on host:port (shared with other replicas on this node); with
    ``tls`` (certificate chain file, private key file: PEM) over TLS only."""
    # Room above max_request_bytes, so an oversized request gets our INVALID_ARGUMENT message
    # (which names the limit) rather than gRPC's own RESOURCE_EXHAUSTED.
    limit = 2 * max_message_bytes + (1 << 20)
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            *CLIENT_PINGS,
        ]
    )
    servicer = GenerationServicer(service, metrics, slots, timeout_s)
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(healthy), server)
    names = (
        pb.DESCRIPTOR.services_by_name["Generation"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        cert, key = (Path(f).read_bytes() for f in tls)
        credentials = grpc.ssl_server_credentials([(key, cert)])
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} for gRPC")
    await server.start()
    return server
