"""asyncio front of LLMEngine: one async stream of RequestOutput deltas per request.

The engine steps in a worker thread (torch releases the GIL), so the event loop stays free for
I/O. Adds and aborts are queued and applied between steps, so the engine is only ever touched by
one thread. Input is validated on the caller's side first, so errors reach the caller directly.
Closing a stream early (client cancel, deadline, stop string) aborts the request, which frees its
KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from replicas.engine import LLMEngine
from replicas.outputs import RequestOutput, StepFailedError, merge_pending
from replicas.sampling_params import SamplingParams


class OutputSink(Protocol):
    """Where a submitted request's outputs go instead of a per-request queue: ``put`` is called
    for each of the step's outputs (or the request's error), then ``flush`` once per step for
    every sink that got something, so a consumer of many requests handles a step at a time."""

    def put(self, request_id: str, item: RequestOutput | BaseException) -> None: ...

    def flush(self) -> None: ...


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._sinks: dict[str, OutputSink] = {}
        self.num_steps = 0
        self.step_time_s = 0.0
        """Engine steps run and the time they took (seconds), since start."""
        self._commands: list = []
        self._commands_lock = threading.Lock()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- public --------------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the last one has ``finished=True``. Raises ValueError for
        bad input (before anything is queued)."""
        self._check_new(request_id, prompt_ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._submit(lambda: self.engine.add_request(request_id, prompt_ids, params), request_id)
        finished = False
        try:
            while True:
                item = merge_pending(await queue.get(), queue)  # a slow reader: one delta
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def submit(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
               sink: OutputSink) -> None:  # fmt: skip
        """Queue a request whose outputs go to ``sink`` (its last item is a finished output or
        an exception); ``abort`` ends it early. Raises ValueError for bad input, at once."""
        self._check_new(request_id, prompt_ids, params)
        self._sinks[request_id] = sink
        self._submit(lambda: self.engine.add_request(request_id, prompt_ids, params), request_id)

    @property
    def num_requests(self) -> int:
        """Requests whose streams are open (queued, running, or finishing)."""
        return len(self._queues) + len(self._sinks)

    def abort(self, request_id: str) -> None:
        """Abort before the next step (blocks return to the pool then). A submitted request's
        sink gets nothing more."""
        self._sinks.pop(request_id, None)
        self._submit(lambda: self.engine.abort(request_id), None)

    async def wait_idle(self) -> None:
        """Until queued commands are applied and no request is running."""
        while self._pending() or self.engine.has_unfinished_requests():
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ---- internals -----------------------------------------------------------------------------
    def _check_new(self, request_id: str, prompt_ids: Sequence[int],
                   params: SamplingParams) -> None:  # fmt: skip
        if request_id in self._queues or request_id in self._sinks:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.engine.check_request(prompt_ids, params)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException,
                 flush: set) -> None:  # fmt: skip
        if (queue := self._queues.get(request_id)) is not None:
            queue.put_nowait(item)
        elif (sink := self._sinks.get(request_id)) is not None:
            sink.put(request_id, item)
            flush.add(sink)
            if isinstance(item, BaseException) or item.finished:
                del self._sinks[request_id]

    def _pending(self) -> bool:
        with self._commands_lock:
            return bool(self._commands)

    def _submit(self, command, request_id: str | None) -> None:
        with self._commands_lock:
            self._commands.append((command, request_id))
        self._ensure_loop()
        self._wakeup.set()

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._loop = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()
            self._task = self._loop.create_task(self._run())

    def _apply_and_step(self) -> tuple[list[RequestOutput], list[tuple[str, BaseException]]]:
        with self._commands_lock:
            commands, self._commands = self._commands, []
        errors = []
        for command, request_id in commands:
            try:
                command()
            except Exception as e:  # noqa: BLE001 - delivered to the request's stream
                if request_id is not None:
                    errors.append((request_id, e))
        if not self.engine.has_unfinished_requests():
            return [], errors
        started = time.perf_counter()
        try:
            return self.engine.step(), errors
        except StepFailedError as e:  # those requests end with the error; the others go on
            return [], errors + [(request_id, e.cause) for request_id in e.request_ids]
        finally:
            self.num_steps += 1
            self.step_time_s += time.perf_counter() - started

    async def _run(self) -> None:
        while True:
            if not self._pending() and not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
            outputs, errors = await asyncio.to_thread(self._apply_and_step)
            flush: set = set()
            for request_id, error in errors:
                self._deliver(request_id, error, flush)
            for out in outputs:
                self._deliver(out.request_id, out, flush)
            for sink in flush:
                sink.flush()
