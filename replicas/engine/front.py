"""What every asyncio front of an engine shares, whoever steps it: one stream of RequestOutput
deltas per request (an asyncio queue, or an ``OutputSink`` fed a step at a time), checked on
the caller's side before anything is queued, and handed out on the event loop after each step.

``replicas.engine.async_engine.AsyncEngine`` steps the engine on a thread of this process;
``replicas.engine.engine_process.EngineProcess`` in a process of its own. Each says how a
request is queued (``_add``) and aborted (``_abort``), and calls ``_deliver_all`` on the event
loop with each step's outputs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from replicas.outputs import (
    ReplicaUnavailableError,
    RequestOutput,
    RequestRejectedError,
    read_outputs,
)
from replicas.sampling_params import SamplingParams


class OutputSink(Protocol):
    """Where a submitted request's outputs go instead of a per-request queue: ``put`` is called
    for each of the step's outputs (or the request's error), then ``flush`` once per step for
    every sink that got something, so a consumer of many requests handles a step at a time,
    with the wall-clock time (``time.time()``) the step ended."""

    def put(self, request_id: str, item: RequestOutput | BaseException) -> None: ...

    def flush(self, step_end_s: float) -> None: ...


@dataclass(frozen=True)
class EngineState:
    """What a front reports of its engine (plain data: an engine process sends it with each
    step)."""

    num_steps: int
    step_time_s: float
    """Time those steps took, in seconds."""
    step_thread_cpu_s: float
    """CPU time of the thread that stepped, in those steps."""
    num_running: int
    num_waiting: int
    num_blocks_in_use: int
    num_blocks_total: int
    num_commands_applied: int = 0
    """Adds and aborts the engine has taken (an engine process: how far it has read)."""
    prefix_cache: Any = None
    """replicas.prefix_cache.types.PrefixCacheStats, None when the prefix cache is off."""
    acceptance: Any = None
    """replicas.engine.draft_policy.AcceptanceTracker with MTP drafting, else None."""


class EngineFront:
    def __init__(self):
        self._queues: dict[str, asyncio.Queue] = {}
        self._sinks: dict[str, OutputSink] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # where outputs are delivered

    # ---- what a driver provides ----------------------------------------------------------------
    def _check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise RequestRejectedError if the engine can never serve this request."""
        raise NotImplementedError

    def _add(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Queue the request for the engine (its outputs come back through _deliver_all)."""
        raise NotImplementedError

    def _abort(self, request_id: str) -> None:
        """Abort the request before the engine's next step."""
        raise NotImplementedError

    def failure(self) -> str | None:
        """Why this engine can no longer serve (its thread or process ended), else None."""
        raise NotImplementedError

    # ---- public --------------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs; the last one has ``finished=True``. Raises ValueError for
        bad input (before anything is queued)."""
        self._check_new(request_id, prompt_ids, params)
        self._add(request_id, prompt_ids, params)  # outputs come on this loop, after we return
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            async for item in read_outputs(queue):  # a slow reader gets one merged delta
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def submit(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams, sink: OutputSink
    ) -> None:
        """Queue a request whose outputs go to ``sink`` (its last item is a finished output or
        an exception); ``abort`` ends it early. Raises ValueError for bad input, at once."""
        self._check_new(request_id, prompt_ids, params)
        self._add(request_id, prompt_ids, params)
        self._sinks[request_id] = sink

    @property
    def num_requests(self) -> int:
        """Requests whose streams are open (queued, running, or finishing)."""
        return len(self._queues) + len(self._sinks)

    def abort(self, request_id: str) -> None:
        """Abort before the next step (blocks return to the pool then). A submitted request's
        sink gets nothing more."""
        self._sinks.pop(request_id, None)
        self._abort(request_id)

    # ---- internals -----------------------------------------------------------------------------
    def _check_new(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> None:
        if (failure := self.failure()) is not None:  # a replica Serve replaces (check_health)
            raise ReplicaUnavailableError(f"{failure}; retry the request")
        if request_id in self._queues or request_id in self._sinks:
            raise RequestRejectedError(f"request id {request_id!r} is already in use")
        self._check(prompt_ids, params)
        self._loop = asyncio.get_running_loop()  # outputs go to the loop of the latest caller

    def _deliver(self, request_id: str, item: RequestOutput | BaseException, flush: set) -> None:
        if (queue := self._queues.get(request_id)) is not None:
            queue.put_nowait(item)
        elif (sink := self._sinks.get(request_id)) is not None:
            sink.put(request_id, item)
            flush.add(sink)
            if isinstance(item, BaseException) or item.finished:
                del self._sinks[request_id]

    def _deliver_all(
        self,
        outputs: list[RequestOutput],
        errors: list[tuple[str, BaseException]],
        step_end_s: float,
    ) -> None:
        """On the event loop: one step's outputs and the errors that ended requests."""
        flush: set = set()
        for request_id, error in errors:
            self._deliver(request_id, error, flush)
        for out in outputs:
            self._deliver(out.request_id, out, flush)
        for sink in flush:
            sink.flush(step_end_s)

    def fail_open(self, reason: str) -> None:
        """End every open request with a retryable error naming ``reason`` (the replica is
        being stopped because its engine cannot serve); callable from any thread."""
        if self._loop is not None and not self._loop.is_closed():
            failure = ReplicaUnavailableError(f"{reason}; retry the request")
            self._loop.call_soon_threadsafe(self._fail_open, failure)

    def _fail_open(self, failure: BaseException) -> None:
        """On the event loop, once the engine is gone: every open request ends with
        ``failure``."""
        ids = [*self._queues, *self._sinks]
        self._deliver_all([], [(request_id, failure) for request_id in ids], time.time())


def engine_failed(error: BaseException | str) -> ReplicaUnavailableError:
    """What a request gets when the engine failed outside a model step (retryable)."""
    what = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return ReplicaUnavailableError(f"the engine failed ({what}); retry the request")
