"""The step stream (cluster.deployments.step_stream / cluster.deployments.shard_client) without
Ray: a real engine in an AttentionShard, the replica's gRPC StepPublisher on loopback, and a
router's StepSubscriber."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest
import torch

from cluster.deployments.replica_directory import DirectReplica
from cluster.deployments.shard_client import DirectShardClient
from cluster.deployments.step_stream import (
    TOKEN_KEY,
    StepPublisher,
    decode,
    decode_params,
    encode,
    encode_params,
)
from cluster.deployments.step_subscriber import ReplicaLost, StepSubscriber
from protos.exaone.internal.v1 import step_stream_pb2 as spb
from protos.exaone.internal.v1 import step_stream_pb2_grpc as spb_grpc
from replicas.attention_shard import AttentionShard
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.request import FinishReason
from replicas.model.loader import load_causal_lm
from replicas.outputs import (
    QueueFullError,
    ReplicaUnavailableError,
    RequestOutput,
    RequestRejectedError,
    TokenLogprob,
)
from replicas.sampling_params import MAX_PROMPT_LOGPROB_ENTRIES, SamplingParams

pytestmark = pytest.mark.integration

ENGINE = EngineConfig(block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
TOKEN = "test-stream-token"
PROMPTS = {f"r{i}": [3 + i, 17, 29 + 2 * i, 41, 5 + i] for i in range(3)}


def test_codec_round_trips_outputs_and_errors():
    out = RequestOutput(
        "a",
        [5, 6],
        finished=True,
        finish_reason=FinishReason.LENGTH,
        logprobs=[TokenLogprob(5, -0.5, ((5, -0.5), (7, -1.25))), TokenLogprob(6, -0.25)],
        prompt_logprobs=[TokenLogprob(9, -2.0, ((9, -2.0),))],
        num_prompt_tokens=4,
        num_output_tokens=2,
        num_cached_tokens=3,
        num_accepted_draft_tokens=1,
        num_drafted_tokens=2,
        queue_time_s=0.125,
    )
    assert decode(encode("a", out)) == out
    bare = RequestOutput("b", [1])
    assert decode(encode("b", bare)) == bare  # None stays None (no logprobs, no queue time)
    for error in (
        RequestRejectedError("bad"),
        QueueFullError("full"),
        ReplicaUnavailableError("gone"),
    ):
        back = decode(encode("c", error))
        assert type(back) is type(error) and str(back) == str(error)
    # Anything else is the server's fault: a ValueError from deep in the engine included.
    for error in (KeyError("x"), ValueError("internal")):
        assert type(decode(encode("d", error))) is RuntimeError


async def _outputs(queue: asyncio.Queue) -> list[RequestOutput]:
    """A request's outputs from its queue, to the finished one (an error item raises)."""
    outs: list[RequestOutput] = []
    while not outs or not outs[-1].finished:
        item = await asyncio.wait_for(queue.get(), 60)
        if isinstance(item, BaseException):
            raise item
        outs.append(item)
    return outs


async def _collect(queue: asyncio.Queue) -> list[int]:
    return [t for out in await _outputs(queue) for t in out.new_token_ids]


@contextlib.asynccontextmanager
async def _published(shard: AttentionShard, **options) -> AsyncIterator[StepPublisher]:
    """``shard``'s step-stream server on loopback, started; stopped and the shard closed
    after."""
    publisher = StepPublisher(shard, "127.0.0.1", TOKEN, **options)
    try:
        await publisher.start()
        yield publisher
    finally:
        await publisher.stop()
        await shard.close()


def test_every_requests_deltas_arrive_in_one_message_per_step(tiny_ckpt):
    model = load_causal_lm(tiny_ckpt, dtype=torch.float32)
    want = LLMEngine(model, ENGINE).generate(list(PROMPTS.values()), GREEDY)

    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE)
        publisher = StepPublisher(shard, "127.0.0.1", TOKEN)
        await publisher.start()
        sub = StepSubscriber()
        try:
            queues = {rid: sub.register(rid) for rid in PROMPTS}
            ended = [publisher.submit(sub.id, rid, p, GREEDY) for rid, p in PROMPTS.items()]
            sub.learn(publisher.address, TOKEN)
            for rid in PROMPTS:
                sub.bind(rid, publisher.address)
            got = [await _collect(queues[rid]) for rid in PROMPTS]
            assert all(e.is_set() for e in ended)
            return got, sub.num_messages, sub.num_outputs, shard.engine.num_steps
        finally:
            await sub.close()
            await publisher.stop()
            await shard.close()

    got, messages, outputs, steps = asyncio.run(main())
    assert got == want
    assert outputs >= 3 * 5  # at least one delta per request and decode step
    assert messages <= steps < outputs  # a message carries a step's deltas of all requests


def test_abort_frees_blocks_and_a_lost_stream_ends_its_requests(tiny_ckpt):
    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE)
        publisher = StepPublisher(shard, "127.0.0.1", TOKEN)
        await publisher.start()
        sub = StepSubscriber()
        long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        try:
            first, second = sub.register("a"), sub.register("b")
            publisher.submit(sub.id, "a", PROMPTS["r0"], long)
            publisher.submit(sub.id, "b", PROMPTS["r1"], long)
            sub.learn(publisher.address, TOKEN)
            sub.bind("a", publisher.address)
            sub.bind("b", publisher.address)
            assert (await asyncio.wait_for(first.get(), 60)).new_token_ids
            publisher.abort(sub.id, "a")
            sub.unregister("a")
            await asyncio.wait_for(second.get(), 60)
            assert shard.engine.num_requests == 1  # "b" still runs
            await publisher.stop(0)  # the replica goes away: "b" learns it
            while not isinstance(item := await asyncio.wait_for(second.get(), 60), BaseException):
                pass
            assert isinstance(item, ReplicaLost)
            publisher.abort(sub.id, "b")
            return await shard.wait_idle()
        finally:
            await sub.close()
            await shard.close()

    stats = asyncio.run(main())
    assert stats.num_blocks_in_use == 0 and stats.num_requests == 0


def test_submit_rejects_bad_input_and_a_full_replica_at_once(tiny_ckpt):
    async def main():
        shard = AttentionShard(
            tiny_ckpt, EngineConfig(block_size=4, max_num_seqs=1), max_waiting_requests=0
        )
        publisher = StepPublisher(shard, "127.0.0.1", TOKEN)
        try:
            with pytest.raises(ValueError, match="max_tokens"):
                publisher.submit("s", "x", [1, 2], SamplingParams(max_tokens=10**6))
            publisher.submit("s", "y", [1, 2], SamplingParams(max_tokens=50, ignore_eos=True))
            with pytest.raises(QueueFullError, match="at capacity"):
                publisher.submit("s", "z", [1, 2], GREEDY)
            publisher.abort("s", "y")
            assert publisher.subscribers == {}  # nothing left behind for that router
        finally:
            await shard.close()

    asyncio.run(main())


def test_a_request_id_in_use_is_refused_and_the_first_request_kept(tiny_ckpt):
    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE)
        publisher = StepPublisher(shard, "127.0.0.1", TOKEN)
        try:
            ended = publisher.submit("s", "x", PROMPTS["r0"], GREEDY)
            with pytest.raises(RequestRejectedError, match="already in use"):
                publisher.submit("s", "x", PROMPTS["r1"], GREEDY)
            assert publisher.num_open() == 1  # the first one is still open, and ends
            await asyncio.wait_for(ended.wait(), 60)
            assert publisher.num_open() == 0
            return publisher.subscribers["s"].pending
        finally:
            await shard.close()

    pending = asyncio.run(main())
    tokens = [t for out in pending for t in out.new_token_ids]
    assert len(tokens) == GREEDY.max_tokens and pending[-1].finished  # its outputs, all of them


def test_params_codec_carries_every_field():
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert names == {f.name for f in spb.Params.DESCRIPTOR.fields}
    every = SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.1,
        seed=(1 << 64) - 1,
        max_tokens=33,
        stop=("</s>", "\n\n"),
        stop_token_ids=(2, 7),
        ignore_eos=True,
        logprobs=0,
        prompt_logprobs=3,
        prefix_boundaries=(8, 16),
    )
    assert all(getattr(every, n) != getattr(SamplingParams(), n) for n in names)
    assert decode_params(encode_params(every)) == every
    assert decode_params(encode_params(SamplingParams())) == SamplingParams()  # None stays None


class _NoServe:
    """Stands in for the AttentionShard handle where a test must not reach Serve."""

    def options(self, **_):
        return self

    def __getattr__(self, name):
        raise AssertionError(f"the request went through Serve ({name})")


def _direct_client(publisher: StepPublisher) -> DirectShardClient:
    replica = DirectReplica("replica-0", publisher.address, TOKEN)
    return DirectShardClient(_NoServe(), StepSubscriber(), replicas=lambda: (replica,))


async def _generate(client: DirectShardClient, rid: str, prompt, params) -> list[int]:
    ids = []
    async for out in client.generate(rid, prompt, params):
        ids += out.new_token_ids
    return ids


def test_a_router_submits_and_aborts_over_grpc(tiny_ckpt):
    """Requests submitted to a chosen replica with Submit stream the engine's tokens; closing
    one early sends Abort, which frees its blocks; the replica reports its load with each
    step's message; admission errors come back as the engine's own."""
    model = load_causal_lm(tiny_ckpt, dtype=torch.float32)
    want = LLMEngine(model, ENGINE).generate(list(PROMPTS.values()), GREEDY)

    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE, max_waiting_requests=2)
        publisher = StepPublisher(shard, "127.0.0.1", TOKEN)
        await publisher.start()
        client = _direct_client(publisher)
        try:
            got = await asyncio.gather(
                *(_generate(client, rid, p, GREEDY) for rid, p in PROMPTS.items())
            )
            long = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
            stream = client.generate("long", PROMPTS["r0"], long)
            assert (await anext(stream)).new_token_ids
            assert client.subscriber.loads.load(publisher.address) == 1  # reported: "long"
            await stream.aclose()
            stats = await shard.wait_idle()
            with pytest.raises(RequestRejectedError, match="max_tokens"):
                await _generate(client, "bad", [1, 2], SamplingParams(max_tokens=10**6))
            held = await asyncio.gather(  # max_num_seqs 8 + 2 waiting: one too many
                *(_generate(client, f"h{i}", [1, 2], long) for i in range(11)),
                return_exceptions=True,
            )
            refused = [r for r in held if isinstance(r, BaseException)]
            assert len(refused) == 1 and isinstance(refused[0], QueueFullError), refused
            assert "at capacity" in str(refused[0])
            return got, stats, await shard.wait_idle(), client.num_direct
        finally:
            await client.close()
            await publisher.stop()
            await shard.close()

    got, after_abort, after_all, num_direct = asyncio.run(main())
    assert got == want
    assert after_abort.num_blocks_in_use == 0 and after_abort.num_requests == 0
    assert after_all.num_blocks_in_use == 0 and after_all.num_requests == 0
    assert num_direct == 3 + 1 + 1 + 11


def test_calls_without_the_stream_token_are_refused(tiny_ckpt):
    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE)
        publisher = StepPublisher(shard, "127.0.0.1", TOKEN)
        await publisher.start()
        request = spb.SubmitRequest(
            subscriber="s", request_id="x", prompt_ids=[1, 2], params=encode_params(GREEDY)
        )
        codes = []
        try:
            async with grpc.aio.insecure_channel(publisher.address) as channel:
                stub = spb_grpc.StepStreamStub(channel)
                for metadata in ((), ((TOKEN_KEY, "not-the-token"),)):
                    for call in (
                        stub.Submit(request, metadata=metadata),
                        stub.Abort(spb.AbortRequest(subscriber="s"), metadata=metadata),
                    ):
                        with pytest.raises(grpc.aio.AioRpcError) as e:
                            await call
                        codes.append(e.value.code())
                    stream = stub.Subscribe(spb.SubscribeRequest(subscriber="s"), metadata=metadata)
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stream.read()
                    codes.append(e.value.code())
            return codes, shard.engine.num_requests
        finally:
            await publisher.stop()
            await shard.close()

    codes, admitted = asyncio.run(main())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 6
    assert admitted == 0


def test_a_draining_replica_refuses_submits_and_waits_for_its_streams(tiny_ckpt):
    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE)
        publisher = StepPublisher(shard, "127.0.0.1", TOKEN)
        await publisher.start()
        client = _direct_client(publisher)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
            running = asyncio.create_task(_generate(client, "a", PROMPTS["r0"], params))
            while not shard.engine.num_requests:
                await asyncio.sleep(0.01)
            drained = asyncio.create_task(publisher.drain(60))
            request = spb.SubmitRequest(
                subscriber="s", request_id="late", prompt_ids=[1, 2], params=encode_params(GREEDY)
            )
            sub = client.subscriber
            reply = await sub.stub(publisher.address).Submit(
                request, metadata=sub.metadata(publisher.address)
            )
            open_then = shard.engine.num_requests
            return reply, open_then, await running, await drained
        finally:
            await client.close()
            await publisher.stop()
            await shard.close()

    reply, open_then, ids, drained = asyncio.run(main())
    assert reply.error_kind == "unavailable" and "stopping" in reply.error
    assert open_then == 1  # the late request was not admitted
    assert len(ids) == 40 and drained


def test_a_replica_whose_step_hangs_refuses_submits_and_fail_open_ends_its_streams(tiny_ckpt):
    """While a step has run past the shard's stall limit, Submit is refused as unavailable,
    naming the hang (the router retries elsewhere); ``fail_open`` (Serve's failed health
    check) ends the open stream with a retryable error at once; once the step ends the replica
    serves again."""
    import threading

    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE, stall_timeout_s=0.3)
        step, release = shard.engine.engine.step, threading.Event()

        def hang():
            release.wait(30)
            return step()

        shard.engine.engine.step = hang  # type: ignore[method-assign]
        publisher = StepPublisher(shard, "127.0.0.1", TOKEN)
        await publisher.start()
        client = _direct_client(publisher)
        try:
            running = asyncio.create_task(_generate(client, "a", PROMPTS["r0"], GREEDY))
            while shard.health() is None:
                await asyncio.sleep(0.02)
            request = spb.SubmitRequest(
                subscriber="s", request_id="late", prompt_ids=[1, 2], params=encode_params(GREEDY)
            )
            sub = client.subscriber
            reply = await sub.stub(publisher.address).Submit(
                request, metadata=sub.metadata(publisher.address)
            )
            shard.engine.fail_open("the step hung")
            ended = await asyncio.wait_for(
                asyncio.gather(running, return_exceptions=True), 10
            )  # the step still hangs
            release.set()
            shard.engine.engine.step = step  # type: ignore[method-assign]
            await shard.wait_idle()
            after = await _generate(client, "after", PROMPTS["r1"], GREEDY)
            return reply, ended[0], after
        finally:
            release.set()
            await client.close()
            await publisher.stop()
            await shard.close()

    reply, ended, after = asyncio.run(main())
    assert reply.error_kind == "unavailable" and "has run for" in reply.error
    assert "retry" in reply.error
    assert isinstance(ended, ReplicaUnavailableError)
    assert "the step hung; retry the request" in str(ended)
    assert len(after) == GREEDY.max_tokens


def _silent_listener():
    """A loopback port whose connections the kernel accepts and nothing ever answers: what a
    router sees of a replica whose process is frozen (SIGSTOP, a hung node)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock, f"127.0.0.1:{sock.getsockname()[1]}"


def test_a_replica_that_does_not_answer_costs_one_request_the_submit_timeout(
    tiny_ckpt, monkeypatch
):
    """Two replicas, one of which never answers, every prompt's prefix preferring that one:
    the first request waits out the submit timeout there and is served by the other; the
    next ones go straight to the other (router.unresponsive) and all outputs are the
    engine's."""
    from cluster.deployments import shard_client
    from router.affinity import prefix_key, rank_replicas

    monkeypatch.setattr(shard_client, "SUBMIT_TIMEOUT_S", 0.5)
    model = load_causal_lm(tiny_ckpt, dtype=torch.float32)
    silent, silent_address = _silent_listener()
    frozen = DirectReplica("replica-frozen", silent_address, TOKEN)
    prompts = []  # prompts whose prefix prefers the frozen replica
    for i in range(200):
        p = [7 + i % 50, 3 + i // 50, 11, 13] * 4
        key = prefix_key(p, 16, 4)
        if rank_replicas(key, {"replica-frozen": 0, "replica-live": 0}, 8)[0] == frozen.replica_id:
            prompts.append(p)
        if len(prompts) == 6:
            break
    want = LLMEngine(model, ENGINE).generate(prompts, GREEDY)

    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE)
        publisher = StepPublisher(shard, "127.0.0.1", TOKEN)
        await publisher.start()
        live = DirectReplica("replica-live", publisher.address, TOKEN)
        client = DirectShardClient(_NoServe(), StepSubscriber(), replicas=lambda: (frozen, live))
        try:
            got = [await _generate(client, f"q{i}", p, GREEDY) for i, p in enumerate(prompts)]
            return got, client.num_direct
        finally:
            await client.close()
            await publisher.stop()
            await shard.close()

    try:
        got, num_direct = asyncio.run(main())
    finally:
        silent.close()
    assert got == want
    assert num_direct == len(prompts) + 1  # one submit to the frozen replica, then none


def test_a_serve_call_that_does_not_answer_is_retried_then_ends_unavailable(monkeypatch):
    """With no replica published, Serve chooses; a handle call whose first answer does not
    come (Serve routed it to a frozen replica, or none runs) counts as a lost replica: it is
    cancelled and tried again until ``retry_budget_s``, then the request ends with a
    retryable error."""
    from cluster.deployments import shard_client

    monkeypatch.setattr(shard_client, "SUBMIT_TIMEOUT_S", 0.2)

    class Silent:
        def __init__(self):
            self.calls, self.cancelled = 0, 0

        def options(self, **_):
            return self

        @property
        def generate_direct(self):
            return self

        def remote(self, *args):
            self.calls += 1
            handle = self

            class Call:
                async def __anext__(self):
                    await asyncio.Event().wait()

                def cancel(self):
                    handle.cancelled += 1

            return Call()

    async def main():
        handle = Silent()
        client = DirectShardClient(handle, StepSubscriber(), retry_budget_s=1.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ReplicaUnavailableError, match="no replica admitted it"):
            await asyncio.wait_for(_generate(client, "a", [1, 2, 3], GREEDY), 30)
        took = loop.time() - start
        await client.close()
        return handle, took

    handle, took = asyncio.run(main())
    assert handle.calls >= 2 and handle.cancelled == handle.calls
    assert took < 5  # the budget (1 s) and one more attempt, not an unbounded wait


class _CuttableLink:
    """A loopback TCP forwarder to a replica's step-stream port that can be cut (its
    connections reset and its port closed, as a network partition between a router and a
    replica looks to the router) or held (nothing passes, the connections stay open)."""

    def __init__(self, target: str):
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _forward(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.writers += [writer, up_writer]

        async def pipe(src, dst):
            with contextlib.suppress(ConnectionError):
                while data := await src.read(1 << 16):
                    await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            await self.flowing.wait()  # held: not even a close passes
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def hold(self) -> None:
        """Nothing passes any more, both ways, the connections left open: what a peer whose
        process is frozen (or whose node hung) looks like."""
        self.flowing.clear()

    def reset(self) -> None:
        """Its connections reset (what they held is lost); new ones pass again."""
        for writer in self.writers:
            writer.transport.abort()
        self.writers = []
        self.flowing.set()

    def cut(self) -> None:
        assert self.server is not None
        self.server.close()  # new connections refused from now on
        for writer in self.writers:
            writer.transport.abort()  # open ones reset


def test_a_retry_reaching_the_same_replica_is_a_request_of_its_own(tiny_ckpt, monkeypatch):
    """The router reaches one replica at two addresses (as when Serve replaced a replica at
    the address the router knew, or chooses the same one for a retry). The first attempt's link
    is cut after the replica admitted it and before its first delta: the router cannot abort
    it there, so it is still open in the replica when the retry arrives at the other address.
    The retry is served in full (under the same id it was refused as a duplicate), and the
    first attempt ends on its own, freeing its blocks."""
    from router.affinity import prefix_key, rank_replicas

    model = load_causal_lm(tiny_ckpt, dtype=torch.float32)
    prompt = next(  # a prompt whose prefix prefers the replica behind the cut link
        p
        for i in range(200)
        if rank_replicas(
            prefix_key(p := [7 + i % 50, 3 + i // 50, 11, 13] * 4, 16, 4),
            {"replica-cut": 0, "replica-direct": 0},
            8,
        )[0]
        == "replica-cut"
    )
    want = LLMEngine(model, ENGINE).generate([prompt], GREEDY)[0]
    bound: list[str] = []
    bind = StepSubscriber.bind

    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE)
        async with _published(shard) as publisher:
            link = _CuttableLink(publisher.address)
            cut = DirectReplica("replica-cut", await link.start(), TOKEN)
            direct = DirectReplica("replica-direct", publisher.address, TOKEN)

            def bind_then_cut(self, request_id, address, *rest):
                bound.append(request_id)
                bind(self, request_id, address, *rest)
                if address == cut.address:
                    link.cut()

            monkeypatch.setattr(StepSubscriber, "bind", bind_then_cut)
            client = DirectShardClient(_NoServe(), StepSubscriber(), replicas=lambda: (cut, direct))
            try:
                got = await asyncio.wait_for(_generate(client, "q", prompt, GREEDY), 60)
                return got, await shard.wait_idle(), shard.num_requests_total
            finally:
                await client.close()

    got, stats, admitted = asyncio.run(main())
    assert len(bound) == 2 and bound[0] == "q" and bound[1] != "q"
    assert got == want
    assert admitted == 2  # both attempts ran in the replica
    assert stats.num_blocks_in_use == 0 and stats.num_requests == 0


def test_a_step_stream_message_over_4_mib_reaches_the_router(tiny_ckpt):
    """Requests that each ask for their prompt's top-20 log-probabilities (within the
    per-request budget) end while the router is not yet reading: the step stream's next
    message carries all of their outputs and is larger than gRPC's default receive limit (4
    MiB). The router gets it: every request its full output, and one beside them that asked for
    nothing of the kind too."""
    engine = EngineConfig(block_size=16, max_num_batched_tokens=8192, max_num_seqs=16)
    length = MAX_PROMPT_LOGPROB_ENTRIES // 21 + 1  # (length - 1) x 21 entries: the budget
    prompts = [[(7 * i + 13 * j) % 1000 + 1 for j in range(length)] for i in range(12)]
    heavy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=20)
    light = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def main():
        async with _published(AttentionShard(tiny_ckpt, engine)) as publisher:
            sub = StepSubscriber()
            try:
                queues = {}
                for rid, prompt, params in [
                    *((f"h{i}", p, heavy) for i, p in enumerate(prompts)),
                    ("light", [5, 6, 7, 8], light),
                ]:
                    queues[rid] = sub.register(rid)
                    publisher.submit(sub.id, rid, prompt, params)
                while publisher.num_open():  # every output waits for the router's stream
                    await asyncio.sleep(0.05)
                waiting = publisher.subscribers[sub.id].pending
                pending = spb.StepBatch(outputs=waiting).ByteSize()
                sub.learn(publisher.address, TOKEN)
                for rid in queues:
                    sub.bind(rid, publisher.address)
                got = {rid: await _outputs(queue) for rid, queue in queues.items()}
                return got, pending, sub.num_messages
            finally:
                await sub.close()

    got, pending, messages = asyncio.run(main())
    assert pending > 4 << 20 and messages == 1  # one message, over the default limit
    for i, prompt in enumerate(prompts):
        outs = got[f"h{i}"]
        assert sum(len(o.new_token_ids) for o in outs) == 2
        assert len(outs[0].prompt_logprobs) == len(prompt) - 1
    assert sum(len(o.new_token_ids) for o in got["light"]) == 8


async def _running(publisher, sub: StepSubscriber, address: str, params) -> None:
    """Requests "a" and "b" submitted for ``sub``, read from ``address``, each with a token."""
    for rid in ("a", "b"):
        queue = sub.register(rid)
        publisher.submit(sub.id, rid, PROMPTS["r0"], params)
        sub.bind(rid, address)
        assert (await asyncio.wait_for(queue.get(), 60)).new_token_ids


def test_a_routers_requests_are_aborted_when_its_step_stream_ends(tiny_ckpt):
    """A router that goes away (its process killed, its node or the network gone) leaves the
    requests it submitted with nobody to read them: once ``orphan_grace_s`` has passed with no
    step stream of its own open at the replica, the replica aborts them (their KV blocks freed,
    not after thousands of tokens nobody will see) and keeps nothing for it."""
    long = SamplingParams(temperature=0.0, max_tokens=3000, ignore_eos=True)

    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE)
        async with _published(shard, orphan_grace_s=1.0) as publisher:
            sub = StepSubscriber()
            sub.learn(publisher.address, TOKEN)
            await _running(publisher, sub, publisher.address, long)
            assert shard.engine.num_requests == 2
            loop = asyncio.get_running_loop()
            gone_at = loop.time()
            await sub.close()  # the router's end of its step stream goes away
            stats = await shard.wait_idle(timeout_s=30)
            return stats, loop.time() - gone_at, publisher.subscribers

    stats, took, subscribers = asyncio.run(main())
    assert stats.num_requests == 0 and stats.num_blocks_in_use == 0
    assert took < 6  # the grace period, not 3000 tokens each (about 20 s here)
    assert subscribers == {}  # nothing kept for a router that is gone


def _one_router_twice(address: str) -> tuple[StepSubscriber, StepSubscriber]:
    """A router's subscriber and the one it reads with after its stream ended: one id, a new
    connection."""
    first, again = StepSubscriber(), StepSubscriber()
    again.id = first.id
    for sub in (first, again):
        sub.learn(address, TOKEN)
    return first, again


def test_a_router_back_within_the_grace_period_keeps_its_requests(tiny_ckpt):
    """A router's step stream ends and it opens one again at once (it reconnected, with a new
    request it submitted in between): nothing it has at the replica is aborted."""
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE)
        async with _published(shard, orphan_grace_s=0.2) as publisher:
            first, again = _one_router_twice(publisher.address)
            try:
                queue = first.register("a")
                publisher.submit(first.id, "a", PROMPTS["r0"], GREEDY)
                first.bind("a", publisher.address)
                await _collect(queue)
                await first.close()  # its stream ends
                queue = again.register("b")
                publisher.submit(again.id, "b", PROMPTS["r1"], params)
                again.bind("b", publisher.address)
                return await _collect(queue)  # far longer than the grace period
            finally:
                await again.close()

    assert len(asyncio.run(main())) == 400


def test_a_request_whose_abort_was_lost_is_aborted_when_its_deltas_come_again(tiny_ckpt):
    """The router's step stream broke (a partition): it counted its request there as lost and
    the Abort it sent did not arrive. Back within the grace period (the same router, with a new
    request), the lost request's deltas come to it again: it aborts that request then, rather
    than leave it running to its last token for nobody; its new request is served."""
    long = SamplingParams(temperature=0.0, max_tokens=3000, ignore_eos=True)

    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE)
        async with _published(shard, orphan_grace_s=30.0) as publisher:
            first, again = _one_router_twice(publisher.address)
            aborts: list[str] = []
            abort = publisher.abort
            publisher.abort = lambda subscriber, rid: (aborts.append(rid), abort(subscriber, rid))
            try:
                lost = first.register("lost")
                publisher.submit(first.id, "lost", PROMPTS["r0"], long)
                first.bind("lost", publisher.address)
                assert (await asyncio.wait_for(lost.get(), 60)).new_token_ids
                first.unregister("lost")  # the router stopped reading it ...
                await first.close()  # ... when its stream broke; no Abort arrived
                assert shard.engine.num_requests == 1
                queue = again.register("new")
                publisher.submit(again.id, "new", PROMPTS["r1"], GREEDY)
                again.bind("new", publisher.address)
                new = await _collect(queue)
                stats = await shard.wait_idle(timeout_s=10)  # not 3000 tokens (about 20 s)
                return new, stats, aborts
            finally:
                await again.close()

    new, stats, aborts = asyncio.run(main())
    assert len(new) == GREEDY.max_tokens
    assert stats.num_requests == 0 and stats.num_blocks_in_use == 0
    assert aborts == ["lost"]  # once, though each step after it carried a delta of it


def test_a_router_that_stops_answering_has_its_requests_aborted(tiny_ckpt):
    """The router's end of the step stream stops answering without closing anything (its
    process frozen, its node hung): the replica's keepalive ping goes unanswered, the stream
    ends there, and after the grace period the router's requests are aborted."""
    long = SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)

    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE)
        async with _published(shard, orphan_grace_s=1.0) as publisher:
            link = _CuttableLink(publisher.address)
            address = await link.start()
            sub = StepSubscriber()
            try:
                sub.learn(address, TOKEN)
                await _running(publisher, sub, address, long)
                loop = asyncio.get_running_loop()
                held_at = loop.time()
                link.hold()
                subscribers = publisher.subscribers
                while sub.id in subscribers and subscribers[sub.id].num_streams:
                    assert loop.time() - held_at < 40, "the replica never noticed"
                    await asyncio.sleep(0.2)
                noticed = loop.time() - held_at
                return noticed, await shard.wait_idle(timeout_s=10)
            finally:
                await sub.close()

    noticed, stats = asyncio.run(main())
    assert 5 < noticed < 40  # keepalive: a ping after 10 s, unanswered for 10 s
    assert stats.num_requests == 0 and stats.num_blocks_in_use == 0


def test_a_stream_lost_while_a_request_is_admitted_does_not_leave_it_waiting(
    tiny_ckpt, monkeypatch
):
    """The step stream a request's deltas go out on breaks after the replica admitted it and
    before the router has bound the request to it (the router handles the stream's end before
    the Submit's answer): the deltas went out on the broken connection and are gone, and the
    request was not yet bound to hear of it. The router counts it lost (before its first
    token: retried under another id, here on the same replica) instead of waiting for deltas
    that never come."""
    model = load_causal_lm(tiny_ckpt, dtype=torch.float32)
    want = LLMEngine(model, ENGINE).generate([PROMPTS["r1"]], GREEDY)[0]
    long = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    bind = StepSubscriber.bind

    async def run(shard, publisher):
        link = _CuttableLink(publisher.address)
        address = await link.start()
        replicas = (
            DirectReplica("replica-0", address, TOKEN),
            DirectReplica("again", address, TOKEN),
        )
        client = DirectShardClient(_NoServe(), StepSubscriber(), replicas=lambda: replicas)
        sub, later = client.subscriber, []

        def bind_late(self, request_id, at, *rest):
            if request_id != "r":
                return bind(self, request_id, at, *rest)
            link.hold()  # what the replica sends from now on stays in the link

            async def lose_then_bind():
                pending = publisher.subscribers[sub.id]
                while "r" in pending.requests or any(o.request_id == "r" for o in pending.pending):
                    await asyncio.sleep(0.01)  # until all of "r" is out, into the link
                link.reset()  # and lost with the connection
                while at in sub.readers:  # the router has handled the stream's end
                    await asyncio.sleep(0.01)
                bind(self, request_id, at, *rest)

            later.append(asyncio.get_running_loop().create_task(lose_then_bind()))

        try:
            keep = client.generate("keep", PROMPTS["r0"], long)  # holds a step stream open
            assert (await anext(keep)).new_token_ids
            monkeypatch.setattr(StepSubscriber, "bind", bind_late)
            got = await asyncio.wait_for(_generate(client, "r", PROMPTS["r1"], GREEDY), 30)
            with contextlib.suppress(ReplicaUnavailableError):  # its stream broke too
                await keep.aclose()
            return got, await shard.wait_idle(), later
        finally:
            await client.close()

    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE)
        async with _published(shard) as publisher:
            return await run(shard, publisher)

    got, stats, later = asyncio.run(main())
    assert len(later) == 1  # the first attempt was bound late; the retry, under its own id, not
    assert got == want
    assert stats.num_requests == 0 and stats.num_blocks_in_use == 0
