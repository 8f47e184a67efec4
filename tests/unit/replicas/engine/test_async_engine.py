"""AsyncEngine + router text stream: deltas, stop strings across tokens, cancel frees blocks."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from replicas.engine.async_engine import AsyncEngine
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.sampling_params import SamplingParams
from router.stream import stream_text
from router.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tiny_model):
    return tiny_model, Tokenizer(tiny_ckpt)


def _engine(model):
    return AsyncEngine(LLMEngine(model, EngineConfig(block_size=4, max_num_batched_tokens=32)))


async def _collect(engine, tok, rid, prompt, params):
    deltas = []
    async for d in stream_text(engine.generate(rid, prompt, params), tok, stop=params.stop):
        deltas.append(d)
    return deltas


def _free_run(model, tok, prompt, n):
    """Greedy tokens and their decoded pieces, from the plain engine."""
    ids = LLMEngine(model, EngineConfig(block_size=4)).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    )[0]
    return ids, [tok.decode([t]) for t in ids]


def test_streams_deltas_and_text_matches_tokens(setup):
    model, tok = setup
    prompt = tok.encode("<|user|>\nHello there, model.<|endofturn|>\n<|assistant|>\n")
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    async def main():
        engine = _engine(model)
        deltas = await _collect(engine, tok, "a", prompt, params)
        await engine.close()
        return deltas

    deltas = asyncio.run(main())
    ids = [t for d in deltas for t in d.token_ids]
    assert len(deltas) > 1 and len(ids) == 20
    assert "".join(d.text for d in deltas) == tok.decode(ids)
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert deltas[-1].num_output_tokens == 20


def test_stop_string_split_across_two_tokens(setup):
    model, tok = setup
    prompt = tok.encode("<|user|>\nTell me about the cluster.<|endofturn|>\n<|assistant|>\n")
    ids, pieces = _free_run(model, tok, prompt, 40)
    full = tok.decode(ids)
    # A stop string made of the end of one token's text and the start of the next one's,
    # whose first occurrence in the output is exactly at that token boundary.
    stop, boundary = None, None
    for i in range(3, len(ids) - 1):
        a, b = pieces[i], pieces[i + 1]
        if a.strip() and b.strip():
            candidate = a[-1] + b[0]
            cut = len(tok.decode(ids[: i + 1])) - 1
            if full.find(candidate) == cut:
                stop, boundary = candidate, i
                break
    assert stop is not None, "no usable token boundary in the greedy output"
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=(stop,))

    async def main():
        engine = _engine(model)
        deltas = await _collect(engine, tok, "s", prompt, params)
        await engine.wait_idle()
        blocks = engine.engine.num_blocks_in_use
        await engine.close()
        return deltas, blocks

    deltas, blocks = asyncio.run(main())
    text = "".join(d.text for d in deltas)
    assert text == full[: full.find(stop)]
    assert stop not in text
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_string == stop
    assert sum(len(d.token_ids) for d in deltas) == boundary + 2  # stopped at the second token
    assert blocks == 0  # the engine aborted the request


def test_cancelled_stream_frees_blocks_and_others_continue(setup):
    model, tok = setup
    prompt = tok.encode("<|user|>\nA long answer please.<|endofturn|>\n")
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)

    async def main():
        engine = _engine(model)
        expected = await _collect(engine, tok, "ref", prompt, short)
        seen = []

        async def consume_some():
            async for out in engine.generate("victim", prompt, long):
                seen.append(out)
                await asyncio.sleep(0)

        victim = asyncio.create_task(consume_some())
        other = asyncio.create_task(_collect(engine, tok, "other", prompt, short))
        while len(seen) < 5:
            await asyncio.sleep(0.01)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        got = await other
        await engine.wait_idle()
        blocks = engine.engine.num_blocks_in_use
        await engine.close()
        return expected, got, blocks, len(seen)

    expected, got, blocks, n_seen = asyncio.run(main())
    assert n_seen < 200
    assert [t for d in got for t in d.token_ids] == [t for d in expected for t in d.token_ids]
    assert blocks == 0


def test_bad_input_raises_before_queueing(setup):
    model, _ = setup

    async def main():
        engine = _engine(model)
        with pytest.raises(ValueError, match="temperature"):
            async for _ in engine.generate("x", [5, 6], SamplingParams(temperature=-1)):
                pass
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in engine.generate("y", [], SamplingParams()):
                pass
        assert not engine.engine.has_unfinished_requests()
        await engine.close()

    asyncio.run(main())


def test_a_failure_outside_the_model_ends_its_requests_and_the_loop_goes_on(setup, monkeypatch):
    """The scheduler raises once: both running requests end with a retryable error naming the
    cause (none hangs), their blocks are freed, and the next request is served."""
    model, tok = setup
    prompt = tok.encode("<|user|>\nHello<|endofturn|>\n")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    from replicas.outputs import ReplicaUnavailableError

    async def main():
        engine = _engine(model)
        schedule, calls = engine.engine.scheduler.schedule, []

        def flaky():
            calls.append(1)
            if len(calls) == 4:
                raise KeyError("injected")
            return schedule()

        monkeypatch.setattr(engine.engine.scheduler, "schedule", flaky)

        async def run(rid):
            try:
                return [
                    t
                    for out in [o async for o in engine.generate(rid, prompt, params)]
                    for t in out.new_token_ids
                ]
            except ReplicaUnavailableError as e:
                return e

        failed = await asyncio.wait_for(asyncio.gather(run("a"), run("b")), 60)
        await engine.wait_idle()
        blocks = engine.engine.num_blocks_in_use
        after = await asyncio.wait_for(run("c"), 60)
        await engine.close()
        return failed, blocks, after

    failed, blocks, after = asyncio.run(main())
    assert all(isinstance(e, ReplicaUnavailableError) for e in failed), failed
    assert all("KeyError" in str(e) and "retry" in str(e) for e in failed)
    assert blocks == 0
    assert isinstance(after, list) and len(after) == 40


class _Fatal(BaseException):
    """Not an Exception: what the engine thread's loop does not catch (MemoryError-like)."""


def test_health_reports_a_dead_engine_thread_and_a_hung_step(setup, monkeypatch):
    """``health`` is None while the engine can serve. A step running past the stall limit is
    reported while it runs; a BaseException that kills the engine thread ends its requests with
    a retryable error, is reported from then on, and new requests are refused (retryable)."""
    import threading
    import time

    from replicas.outputs import ReplicaUnavailableError

    model, tok = setup
    prompt = tok.encode("<|user|>\nHello<|endofturn|>\n")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's death is meant

    async def main():
        engine = _engine(model)
        step, mode, seen = engine.engine.step, {"now": "slow"}, []

        def step_hook():
            if mode["now"] == "slow":
                time.sleep(0.6)
            elif mode["now"] == "fatal":
                raise _Fatal("injected")
            return step()

        monkeypatch.setattr(engine.engine, "step", step_hook)

        async def watch():
            while True:
                seen.append(engine.health(stall_timeout_s=0.3))
                await asyncio.sleep(0.05)

        watcher = asyncio.ensure_future(watch())
        outs = [o async for o in engine.generate("slow", prompt, params)]
        watcher.cancel()
        healthy_after = engine.health(stall_timeout_s=0.3)
        mode["now"] = "fatal"
        try:
            _ = [o async for o in engine.generate("dies", prompt, params)]
            died = None
        except ReplicaUnavailableError as e:
            died = e
        problem = engine.health(stall_timeout_s=0.3)
        with pytest.raises(ReplicaUnavailableError, match="died"):
            _ = [o async for o in engine.generate("refused", prompt, params)]
        # The thread fails the requests before its exception leaves it: wait for that, so the
        # exception meets this test's excepthook, not whatever test runs next.
        thread = engine._thread
        assert thread is not None
        await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive()
        return outs, seen, healthy_after, died, problem

    outs, seen, healthy_after, died, problem = asyncio.run(asyncio.wait_for(main(), 60))
    assert sum(len(o.new_token_ids) for o in outs) == 6
    assert any(s is not None and "has run for" in s for s in seen), seen
    assert healthy_after is None
    assert isinstance(died, ReplicaUnavailableError) and "_Fatal" in str(died)
    assert problem is not None and "engine thread died" in problem and "injected" in problem


def test_fail_open_ends_the_open_requests_of_a_hung_step_and_the_engine_serves_after(
    setup, monkeypatch
):
    """``fail_open`` (what the replica does when Serve's health check finds a hung step): every
    open request ends at once with a retryable error that carries the reason, though the step
    has not ended; the engine serves new requests once it has."""
    import threading

    from replicas.outputs import ReplicaUnavailableError

    model, tok = setup
    prompt = tok.encode("<|user|>\nHello<|endofturn|>\n")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def main():
        engine = _engine(model)
        step, release = engine.engine.step, threading.Event()

        def hang():
            release.wait(30)
            return step()

        monkeypatch.setattr(engine.engine, "step", hang)

        async def run(request_id):
            try:
                return [t for o in [o async for o in engine.generate(request_id, prompt, params)]
                        for t in o.new_token_ids]  # fmt: skip
            except ReplicaUnavailableError as e:
                return e

        runs = [asyncio.ensure_future(run(f"r{i}")) for i in range(3)]
        while engine.num_requests < 3 or engine.health(stall_timeout_s=0.2) is None:
            await asyncio.sleep(0.02)
        engine.fail_open("the step hung")
        ended = await asyncio.wait_for(asyncio.gather(*runs), 10)  # the step still hangs
        release.set()
        monkeypatch.setattr(engine.engine, "step", step)
        await engine.wait_idle()
        after = await asyncio.wait_for(run("after"), 60)
        await engine.close()
        return ended, after

    ended, after = asyncio.run(main())
    assert all(isinstance(e, ReplicaUnavailableError) for e in ended), ended
    assert all(str(e) == "the step hung; retry the request" for e in ended)
    assert isinstance(after, list) and len(after) == 6


@pytest.mark.parametrize("threads", [2, 1])
def test_build_makes_the_engine_on_the_thread_that_steps_it_with_2_or_more_threads(setup, threads):
    """2+ torch threads: made on the engine thread (one OpenMP pool); one: on the caller's."""
    model, tok = setup
    made_on: list[threading.Thread] = []

    def make_engine() -> LLMEngine:
        made_on.append(threading.current_thread())
        engine = LLMEngine(model, EngineConfig(block_size=4, max_num_batched_tokens=32))
        step = engine.step

        def recorded_step():
            stepped_on.add(threading.current_thread())
            return step()

        engine.step = recorded_step  # type: ignore[method-assign]
        return engine

    stepped_on: set[threading.Thread] = set()
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    async def main():
        engine = AsyncEngine.build(make_engine, threads)
        assert torch.get_num_threads() == threads
        deltas = await _collect(engine, tok, "a", tok.encode("Hello"), params)
        await engine.close()
        return deltas

    before = torch.get_num_threads()
    try:
        deltas = asyncio.run(main())
    finally:
        torch.set_num_threads(before)
    assert sum(len(d.token_ids) for d in deltas) == 5
    assert len(stepped_on) == 1 and threading.main_thread() not in stepped_on
    if threads > 1:
        assert stepped_on == {made_on[0]}
    else:
        assert made_on == [threading.main_thread()]


def test_build_raises_what_making_the_engine_raised():
    def make_engine() -> LLMEngine:
        raise FileNotFoundError("no config.json in /nowhere")

    with pytest.raises(FileNotFoundError, match="no config.json"):
        AsyncEngine.build(make_engine)
