"""The step stream (cluster.deployments.step_stream / cluster.deployments.shard_client) without
Ray: a real engine in an AttentionShard, the replica's gRPC StepPublisher on loopback, and a
router's StepSubscriber."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cluster.deployments.shard_client import StepSubscriber, _Lost
from cluster.deployments.step_stream import StepPublisher, decode, encode
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
from replicas.sampling_params import SamplingParams

pytestmark = pytest.mark.integration

ENGINE = EngineConfig(block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
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


async def _collect(queue: asyncio.Queue) -> list[int]:
    ids = []
    while True:
        item = await asyncio.wait_for(queue.get(), 60)
        if isinstance(item, BaseException):
            raise item
        ids += item.new_token_ids
        if item.finished:
            return ids


def test_every_requests_deltas_arrive_in_one_message_per_step(tiny_ckpt):
    model = load_causal_lm(tiny_ckpt, dtype=torch.float32)
    want = LLMEngine(model, ENGINE).generate(list(PROMPTS.values()), GREEDY)

    async def main():
        shard = AttentionShard(tiny_ckpt, ENGINE)
        publisher = StepPublisher(shard, "127.0.0.1")
        await publisher.start()
        sub = StepSubscriber()
        try:
            queues = {rid: sub.register(rid) for rid in PROMPTS}
            ended = [publisher.submit(sub.id, rid, p, GREEDY) for rid, p in PROMPTS.items()]
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
        publisher = StepPublisher(shard, "127.0.0.1")
        await publisher.start()
        sub = StepSubscriber()
        long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        try:
            first, second = sub.register("a"), sub.register("b")
            publisher.submit(sub.id, "a", PROMPTS["r0"], long)
            publisher.submit(sub.id, "b", PROMPTS["r1"], long)
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
            assert isinstance(item, _Lost)
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
        publisher = StepPublisher(shard, "127.0.0.1")
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
