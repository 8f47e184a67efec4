"""Stream pacing: the policy (router.pacing) and a request's outputs read under it
(replicas.outputs.read_outputs): merged between sends, first and last at once, nothing lost."""

from __future__ import annotations

import asyncio
import time

import pytest

from replicas.outputs import RequestOutput, read_outputs
from router.pacing import StreamPacing


def test_pacing_starts_at_its_stream_count():
    pacing = StreamPacing(interval_s=0.05, min_streams=8)
    assert [pacing.interval(n) for n in (0, 1, 7)] == [0.0, 0.0, 0.0]
    assert [pacing.interval(n) for n in (8, 64)] == [0.05, 0.05]
    assert StreamPacing(interval_s=0.0, min_streams=1).interval(100) == 0.0
    for bad in (dict(interval_s=-1.0), dict(min_streams=0)):
        with pytest.raises(ValueError):
            StreamPacing(**bad)  # type: ignore[arg-type]


def _out(tokens: list[int], finished: bool = False) -> RequestOutput:
    return RequestOutput("r", tokens, finished=finished, num_output_tokens=tokens[-1])


async def _read(queue: asyncio.Queue, interval_s: float, then) -> tuple[list, float]:
    """Reads ``queue`` paced by ``interval_s``; after the first output, ``then()`` feeds the
    rest as it reads. -> (each output's token ids and finished, or the error raised; seconds
    taken)."""
    got: list = []
    feeder = None
    start = time.monotonic()
    try:
        async for out in read_outputs(queue, lambda: interval_s):
            got.append((out.new_token_ids, out.finished))
            if feeder is None:
                feeder = asyncio.get_running_loop().create_task(then())
    except RuntimeError as e:
        got.append(e)
    assert feeder is not None
    await feeder
    return got, time.monotonic() - start


def test_paced_outputs_merge_between_sends_and_the_last_leaves_at_once():
    """An interval far longer than the test: after the first output (sent at once) everything
    up to the finish merges into one output, which leaves when the finish arrives, not when
    the interval ends."""

    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait(_out([1]))

        async def rest():
            for t in range(2, 10):
                await asyncio.sleep(0.001)  # each on its own, as steps would bring them
                queue.put_nowait(_out([t]))
            queue.put_nowait(_out([10], finished=True))

        return await _read(queue, 60.0, rest)

    got, took = asyncio.run(main())
    assert got == [([1], False), (list(range(2, 11)), True)]
    assert took < 30  # the finish did not wait for the interval


def test_an_error_while_paced_is_raised_at_once():
    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait(_out([1]))

        async def rest():
            queue.put_nowait(_out([2]))
            await asyncio.sleep(0.001)
            queue.put_nowait(RuntimeError("replica lost"))

        return await _read(queue, 60.0, rest)

    got, took = asyncio.run(main())
    assert got[0] == ([1], False) and isinstance(got[1], RuntimeError) and len(got) == 2
    assert took < 30


def test_unpaced_outputs_leave_one_by_one():
    """Interval 0 (few streams): a reader that keeps up gets every output as it came."""

    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait(_out([1]))
        got = []
        async for out in read_outputs(queue, lambda: 0.0):
            got.append(out.new_token_ids)
            if not out.finished:
                t = out.new_token_ids[-1] + 1
                queue.put_nowait(_out([t], finished=t == 4))
        return got

    assert asyncio.run(main()) == [[1], [2], [3], [4]]


def test_paced_sends_keep_the_interval_apart_and_lose_nothing():
    """Outputs arriving over several intervals: each send but the finish comes at least the
    interval after the one before (a slow machine only spaces them more), and every token
    arrives once, in order."""
    interval = 0.02

    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for t in range(1, 30):
            loop.call_later(0.005 * t, queue.put_nowait, _out([t]))
        loop.call_later(0.005 * 30, queue.put_nowait, _out([30], finished=True))
        sends = []
        async for out in read_outputs(queue, lambda: interval):
            sends.append((loop.time(), out.new_token_ids, out.finished))
        return sends

    sends = asyncio.run(main())
    assert [t for _, ids, _ in sends for t in ids] == list(range(1, 31)) and sends[-1][2]
    gaps = [b[0] - a[0] for a, b in zip(sends[:-2], sends[1:-1], strict=True)]
    assert all(gap >= interval - 1e-3 for gap in gaps), gaps
    assert len(sends) < 30  # merged
