"""The engine in a child process (replicas.engine.engine_process): the same greedy tokens as the
engine itself, bad input refused on the caller's side, cancel frees the child's KV blocks, and
a child that dies ends every open request with a retryable error and turns health false."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.engine_process import EngineProcess
from replicas.engine.engine_spec import EngineSpec, engine_cores
from replicas.outputs import ReplicaUnavailableError, RequestOutput, RequestRejectedError
from replicas.sampling_params import SamplingParams

CONFIG = EngineConfig(block_size=4, max_num_batched_tokens=32, max_num_seqs=8)
PROMPTS = [[3, 14, 15, 9, 2, 6], [5, 35], [8, 9, 7, 9, 3, 2, 3, 8, 4], [6, 2, 6, 4, 3]]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


async def _tokens(front, request_id: str, prompt: list[int], n: int) -> list[int]:
    ids: list[int] = []
    async for out in front.generate(request_id, prompt, _greedy(n)):
        ids += out.new_token_ids
    return ids


class _Sink:
    def __init__(self):
        self.items: list[RequestOutput | BaseException] = []
        self.flushes = 0

    def put(self, request_id, item):
        self.items.append(item)

    def flush(self, step_end_s):
        self.flushes += 1


def test_outputs_equal_the_engines_and_cancel_frees_blocks(tiny_ckpt, tiny_model):
    want = LLMEngine(tiny_model, CONFIG).generate(PROMPTS, _greedy(12))

    async def main():
        front = EngineProcess(EngineSpec(tiny_ckpt, CONFIG))
        try:
            assert front.limits.vocab_size == tiny_model.cfg.vocab_size
            got = await asyncio.gather(
                *[_tokens(front, f"r{i}", p, 12) for i, p in enumerate(PROMPTS[1:], 1)],
                _sunk(front, PROMPTS[0]),
            )
            assert [got[-1], *got[:-1]] == want

            with pytest.raises(RequestRejectedError, match="outside the vocabulary"):
                front.submit("bad", [tiny_model.cfg.vocab_size], _greedy(2), _Sink())
            assert front.num_requests == 0  # refused here, before anything reached the child

            stream = front.generate("long", PROMPTS[2], _greedy(200))
            await stream.__anext__()
            await stream.aclose()  # the client went away: the child aborts it
            await front.wait_idle()
            state = front.state()
            assert (state.num_running, state.num_waiting, state.num_blocks_in_use) == (0, 0, 0)
            assert state.num_steps > 0 and front.health(60.0) is None
        finally:
            await front.close()

    async def _sunk(front, prompt):
        sink = _Sink()
        front.submit("sunk", prompt, _greedy(12), sink)
        while not (sink.items and getattr(sink.items[-1], "finished", True)):
            await asyncio.sleep(0.01)
        assert sink.flushes == len(sink.items)  # one flush per step that had its output
        return [t for item in sink.items for t in item.new_token_ids]

    asyncio.run(main())


def test_a_dead_engine_process_fails_open_requests_retryably(tiny_ckpt):
    async def main():
        front = EngineProcess(EngineSpec(tiny_ckpt, CONFIG))
        try:
            stream = front.generate("r", PROMPTS[0], _greedy(10_000 // 4))
            await stream.__anext__()
            os.kill(front._proc.pid, signal.SIGKILL)
            with pytest.raises(ReplicaUnavailableError, match="exited .*retry"):
                async for _ in stream:
                    pass
            assert "the engine process exited" in (front.health(60.0) or "")
            with pytest.raises(ReplicaUnavailableError):
                front.submit("after", PROMPTS[1], _greedy(2), _Sink())
        finally:
            await front.close()

    asyncio.run(main())


def test_an_engine_that_cannot_be_built_fails_at_start(tmp_path):
    with pytest.raises(RuntimeError, match="could not build the engine"):
        EngineProcess(EngineSpec(tmp_path / "missing", CONFIG))


def test_close_ends_open_requests_and_the_child(tiny_ckpt):
    async def main():
        front = EngineProcess(EngineSpec(tiny_ckpt, CONFIG))
        stream = front.generate("r", PROMPTS[0], _greedy(10_000 // 4))
        await stream.__anext__()
        await front.close()
        with pytest.raises(ReplicaUnavailableError, match="stopped.*retry"):
            async for _ in stream:
                pass
        assert front._proc.poll() is not None
        assert "stopped" in (front.health(60.0) or "")

    asyncio.run(main())


def test_a_fault_the_engine_cannot_take_is_refused_in_the_replica(tiny_ckpt, monkeypatch):
    from replicas.engine.fault_injection import ENV

    monkeypatch.setenv(ENV, "1")  # the child inherits it

    async def main():
        front = EngineProcess(EngineSpec(tiny_ckpt, CONFIG))  # no MTP drafting
        try:
            with pytest.raises(ValueError, match="needs an engine that drafts"):
                front.inject_fault("draft", 0)
            front.inject_fault("step", 0)  # fires on the next step: the request ends, the
            with pytest.raises(ReplicaUnavailableError, match="injected fault"):  # child lives
                await _tokens(front, "a", PROMPTS[0], 4)
            assert len(await _tokens(front, "b", PROMPTS[1], 4)) == 4
            assert front.health(60.0) is None
        finally:
            await front.close()

    asyncio.run(main())


def test_the_engine_process_binds_itself_to_the_cores_it_is_given(tiny_ckpt):
    """EngineSpec.cpus: the child binds itself (and so its torch threads) before building; the
    replica's own process keeps its cores."""
    mine = os.sched_getaffinity(0)
    core = max(mine)

    async def main():
        front = EngineProcess(EngineSpec(tiny_ckpt, CONFIG, num_threads=1, cpus=(core,)))
        try:
            assert os.sched_getaffinity(front._proc.pid) == {core}
            assert len(await _tokens(front, "a", PROMPTS[0], 4)) == 4
        finally:
            await front.close()

    asyncio.run(main())
    assert os.sched_getaffinity(0) == mine


def test_engine_cores_leave_the_first_cores_to_the_request_plane():
    assert engine_cores({0, 1}, 1) == (1,)
    assert engine_cores({0, 1, 2, 3}, 2) == (2, 3)
    assert engine_cores({4, 9, 7}, 1) == (9,)  # a cpuset's own numbering
    assert engine_cores({0, 1}, 2) is None  # nothing would be left: not bound
    assert engine_cores({0}, 1) is None
    assert engine_cores({0, 1, 2}, None) is None
