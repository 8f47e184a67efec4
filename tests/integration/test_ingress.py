"""The Router's gRPC ingress (cluster.deployments.ingress) over a real loopback channel, with a
scripted GenerationService: the stream limit answers RESOURCE_EXHAUSTED before any work, the stream
timeout answers DEADLINE_EXCEEDED and closes the request's stream (which aborts it)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cluster.commands.redis_server import free_port
from cluster.deployments.ingress import start_ingress
from protos.exaone.v1 import generation_pb2 as pb
from protos.exaone.v1 import generation_pb2_grpc as pb_grpc
from router.stream_slots import StreamSlots
from tests.integration.conftest import self_signed_cert

pytestmark = pytest.mark.integration


class SlowService:
    """Yields one delta every ``interval_s``, ``count`` times; records starts and closes."""

    def __init__(self, count: int, interval_s: float):
        self.count, self.interval_s = count, interval_s
        self.started = self.closed = 0

    async def generate(self, request):
        self.started += 1
        try:
            for i in range(self.count):
                await asyncio.sleep(self.interval_s)
                yield pb.GenerateResponse(request_id="r", delta=pb.Delta(token_ids=[i]))
        finally:
            self.closed += 1


async def _healthy() -> bool:
    return True


async def _stream(address: str) -> tuple[list, grpc.StatusCode | None, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        got = []
        try:
            async for response in stub.Generate(pb.GenerateRequest(), timeout=30):
                got.append(response)
        except grpc.aio.AioRpcError as e:
            return got, e.code(), e.details()
        return got, None, ""


@pytest.mark.parametrize("case", ["limit", "timeout"])
def test_stream_limit_and_timeout(case):
    port = free_port()
    address = f"127.0.0.1:{port}"

    async def main():
        if case == "limit":
            service = SlowService(count=6, interval_s=0.05)
            server = await start_ingress("127.0.0.1", port, service, _healthy, slots=StreamSlots(1))
            try:
                first = asyncio.ensure_future(_stream(address))
                while service.started == 0:  # the first stream holds the only place
                    await asyncio.sleep(0.01)
                refused = await _stream(address)
                done = await first
                after = await _stream(address)  # the place is free again
            finally:
                await server.stop(None)
            return service, (done, refused, after)
        service = SlowService(count=100, interval_s=0.05)
        server = await start_ingress("127.0.0.1", port, service, _healthy, timeout_s=0.5)
        try:
            cut = await _stream(address)
        finally:
            await server.stop(None)
        return service, (cut,)

    service, results = asyncio.run(asyncio.wait_for(main(), 60))
    if case == "limit":
        (done, refused, after) = results
        assert done[1] is None and len(done[0]) == 6
        assert refused[1] == grpc.StatusCode.RESOURCE_EXHAUSTED and not refused[0]
        assert "router.max_ongoing_requests" in refused[2]
        assert after[1] is None and len(after[0]) == 6
        assert service.started == 2  # the refused stream never reached the service
    else:
        (cut,) = results
        assert cut[1] == grpc.StatusCode.DEADLINE_EXCEEDED, cut
        assert "router.request_timeout_s" in cut[2]
        assert 0 < len(cut[0]) < 100
        assert service.closed == 1  # the request's stream was closed (the engine aborts it)


def test_tls_port_serves_only_tls(tmp_path):
    """router.tls_cert_file / tls_key_file: the port speaks TLS; a client trusting the CA
    (router.client's tls_ca_file) streams, a plaintext client does not get through."""
    from router.client import GenerationClient

    cert, key = self_signed_cert(tmp_path)
    port = free_port()
    address = f"127.0.0.1:{port}"

    async def main():
        service = SlowService(count=3, interval_s=0.01)
        server = await start_ingress(
            "127.0.0.1", port, service, _healthy, tls=(str(cert), str(key))
        )
        try:
            plain = await _stream(address)

            def secure():
                with GenerationClient(address, timeout_s=30, tls_ca_file=str(cert)) as c:
                    return [r.delta.token_ids[0] for r in c.stream(token_ids=[1])]

            return plain, await asyncio.to_thread(secure)
        finally:
            await server.stop(None)

    plain, secure = asyncio.run(asyncio.wait_for(main(), 60))
    assert plain[1] == grpc.StatusCode.UNAVAILABLE and not plain[0]
    assert secure == [0, 1, 2]
