"""Connections that stay quiet for minutes while their clients ping them: a client's stream
waiting for its next token (a long queue, a long prompt's prefill) on the Router's ingress, and
a router's step stream from an idle attention replica. gRPC's default server policy counts
pings on a connection with nothing to send as abuse and closes it with ``too_many_pings``
(measured: 123-131 s after the last frame with pings every 2, 5 or 10 s); our servers
accept the pings our clients send (cluster.deployments.ingress.CLIENT_PINGS,
cluster.deployments.step_stream.SERVER_OPTIONS). Real gRPC over loopback, a real attention
replica; the ingress gets a scripted service that stays quiet."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cluster.commands.redis_server import free_port
from cluster.deployments.ingress import start_ingress
from cluster.deployments.step_subscriber import StepSubscriber
from protos.exaone.v1 import generation_pb2 as pb
from protos.exaone.v1 import generation_pb2_grpc as pb_grpc
from replicas.attention_shard import AttentionShard
from replicas.engine.engine import EngineConfig
from replicas.sampling_params import SamplingParams
from router.client import KEEPALIVE_OPTIONS
from tests.integration.test_step_stream import TOKEN, _collect, _published

pytestmark = pytest.mark.integration

QUIET_S = 150.0


async def _healthy() -> bool:
    return True


class QuietService:
    """A token at once, the next after QUIET_S (a stream whose request waits in the middle)."""

    async def generate(self, request):
        for i in range(2):
            if i:
                await asyncio.sleep(QUIET_S)
            yield pb.GenerateResponse(request_id="r", delta=pb.Delta(token_ids=[i]))


async def _client_waits_for_a_token(port: int) -> tuple[int, str]:
    """A stream on the ingress quiet for QUIET_S between two tokens, from a client with
    router.client's keepalive but pinging every 10 s (with router.client's 20 s the cut came
    later: 100 s after the last token) -> (tokens received, the error it ended with or "")."""
    server = await start_ingress("127.0.0.1", port, QuietService(), _healthy)
    options = [*dict(KEEPALIVE_OPTIONS, **{"grpc.keepalive_time_ms": 10_000}).items()]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = pb_grpc.GenerationStub(channel)
            got = 0
            try:
                async for _ in stub.Generate(pb.GenerateRequest(), timeout=3 * QUIET_S):
                    got += 1
            except grpc.aio.AioRpcError as e:
                return got, f"{e.code().name} {e.details()}"
            return got, ""
    finally:
        await server.stop(None)


async def _step_stream_idles(checkpoint) -> tuple[list[object], list[int]]:
    """A router's step stream from a replica with nothing to send for QUIET_S, then a request
    over the same stream -> (what the idle request's queue got, the request's tokens)."""
    shard = AttentionShard(checkpoint, EngineConfig(block_size=4, max_num_seqs=2))
    async with _published(shard) as publisher:
        sub = StepSubscriber()
        try:
            sub.learn(publisher.address, TOKEN)
            idle = sub.register("idle")  # never submitted: only holds the stream open
            sub.bind("idle", publisher.address)
            reader = sub.readers[publisher.address]
            await asyncio.sleep(QUIET_S)
            assert sub.readers.get(publisher.address) is reader, "the step stream was opened again"
            queue = sub.register("r")
            params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
            publisher.submit(sub.id, "r", [3, 17, 29, 41], params)
            sub.bind("r", publisher.address)
            tokens = await _collect(queue)
            idle_got = []
            while not idle.empty():
                idle_got.append(idle.get_nowait())
            return idle_got, tokens
        finally:
            await sub.close()


def test_quiet_connections_stay_open_while_their_clients_ping(tiny_ckpt):
    async def main():
        return await asyncio.gather(
            _client_waits_for_a_token(free_port()), _step_stream_idles(tiny_ckpt)
        )

    (got, error), (idle_got, tokens) = asyncio.run(asyncio.wait_for(main(), 3 * QUIET_S))
    assert error == "" and got == 2  # before: UNAVAILABLE "Too many pings"
    assert idle_got == []  # before: ReplicaLost (the stream ended with UNAVAILABLE)
    assert len(tokens) == 4
