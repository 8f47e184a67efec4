"""asyncio front of LLMEngine: one async stream of RequestOutput deltas per request.

The engine steps in a thread of its own (torch releases the GIL), which goes from one step
straight to the next while the event loop delivers the last step's outputs, so the loop stays
free for I/O and no step waits for it. Adds and aborts are queued and applied between steps, so
the engine is only ever touched by that thread. Input is validated on the caller's side first,
so errors reach the caller directly. Closing a stream early (client cancel, deadline, stop
string) aborts the request, which frees its KV blocks before the next step. Whatever a step
raises ends the requests it concerns, never the loop.

``AsyncEngine.build`` makes the engine on that same thread, so a replica runs all its torch work
(loading, pinning prefixes, steps) on one thread; see there why that matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import Future
from typing import Protocol

import torch

from replicas.engine.engine import LLMEngine
from replicas.outputs import (
    ReplicaUnavailableError,
    RequestOutput,
    RequestRejectedError,
    StepFailedError,
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


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._sinks: dict[str, OutputSink] = {}
        self.num_steps = 0
        self.step_time_s = 0.0
        self.step_thread_cpu_s = 0.0
        """Engine steps run, the time they took and the engine thread's CPU time in them
        (seconds), since start."""
        self._commands: list = []
        self._commands_lock = threading.Lock()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._step_started: float | None = None  # monotonic start of the step running now
        self._failure: BaseException | None = None  # what ended the engine thread, if anything
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def build(
        cls, make_engine: Callable[[], LLMEngine], num_threads: int | None = None
    ) -> AsyncEngine:
        """An AsyncEngine over ``make_engine()``; sets torch's threads to ``num_threads`` first
        (None: as they are). Returns once the engine is made (raises what ``make_engine``
        raised).

        With 2 or more threads the engine is made on the engine thread, which then goes on to
        run the steps: loading the weights on the caller's thread and stepping on this one
        would leave OpenMP two thread pools, which slows every step (replicas.compute_thread
        says how much and why). With one there is no pool to share, and the caller's thread
        makes it: a served A/B on the bundled model favoured that (README, "One OpenMP pool
        per replica")."""
        if num_threads:
            torch.set_num_threads(num_threads)
        if torch.get_num_threads() < 2:
            return cls(make_engine())
        built: Future[AsyncEngine] = Future()

        def engine_thread() -> None:
            try:
                front = cls(make_engine())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                built.set_exception(e)
                return
            front._thread = threading.current_thread()
            built.set_result(front)
            front._run()

        threading.Thread(target=engine_thread, name="engine-loop", daemon=True).start()
        return built.result()

    # ---- public --------------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs; the last one has ``finished=True``. Raises ValueError for
        bad input (before anything is queued)."""
        self._check_new(request_id, prompt_ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._submit(lambda: self.engine.add_request(request_id, prompt_ids, params), request_id)
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

    def health(self, stall_timeout_s: float) -> str | None:
        """None while the engine can serve; else why not: its thread died, or one step has run
        for more than ``stall_timeout_s`` (hung)."""
        if self._failure is not None:
            return f"the engine thread died ({type(self._failure).__name__}: {self._failure})"
        started = self._step_started
        if started is not None and (running := time.monotonic() - started) > stall_timeout_s:
            return f"one engine step has run for {running:.0f} s (limit {stall_timeout_s:.0f} s)"
        return None

    async def wait_idle(self) -> None:
        """Until queued commands are applied and no request is running."""
        while self._pending() or self.engine.has_unfinished_requests():
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        thread = self._thread
        if thread is not None:
            self._stopping = True
            self._wakeup.set()
            await asyncio.to_thread(thread.join)
            self._thread = None

    # ---- internals -----------------------------------------------------------------------------
    def _check_new(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> None:
        if self._failure is not None:  # a replica Serve replaces once check_health fails
            raise ReplicaUnavailableError(f"{self.health(float('inf'))}; retry the request")
        if request_id in self._queues or request_id in self._sinks:
            raise RequestRejectedError(f"request id {request_id!r} is already in use")
        self.engine.check_request(prompt_ids, params)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException, flush: set) -> None:
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
        self._ensure_thread()
        self._wakeup.set()

    def _ensure_thread(self) -> None:
        self._loop = asyncio.get_running_loop()  # outputs go to the loop of the latest caller
        if self._failure is not None:  # never restarted on an engine in an unknown state
            return
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()

    def _apply_and_step(self) -> tuple[list[RequestOutput], list[tuple[str, BaseException]]]:
        with self._commands_lock:
            commands, self._commands = self._commands, []
        errors: list[tuple[str, BaseException]] = []
        for command, request_id in commands:
            try:
                command()
            except Exception as e:  # noqa: BLE001 - delivered to the request's stream
                if request_id is not None:
                    errors.append((request_id, e))
        if not self.engine.has_unfinished_requests():
            return [], errors
        started, cpu = time.perf_counter(), time.thread_time()
        self._step_started = time.monotonic()
        try:
            return self.engine.step(), errors
        except StepFailedError as e:  # those requests end with the error; the others go on
            return [], errors + [(request_id, e.cause) for request_id in e.request_ids]
        finally:
            self._step_started = None
            self.num_steps += 1
            self.step_time_s += time.perf_counter() - started
            self.step_thread_cpu_s += time.thread_time() - cpu

    def _run(self) -> None:
        """The engine thread: apply commands, step, hand the outputs to the event loop. What
        escapes the loop (not an Exception: MemoryError is one, SystemExit another) is kept
        for ``health`` and ends every request it holds."""
        try:
            self._loop_until_stopped()
        except BaseException as e:
            self._failure = e
            with contextlib.suppress(BaseException):
                assert self._loop is not None  # set by _ensure_thread before it starts us
                self._loop.call_soon_threadsafe(self._fail_open, e)
            raise

    def _fail_open(self, error: BaseException) -> None:
        """On the event loop, after the engine thread died: every open request (running,
        waiting, or still queued as a command) ends with a retryable error."""
        failure = _engine_failed(error)
        ids = [*self._queues, *self._sinks]
        self._deliver_all([], [(request_id, failure) for request_id in ids], time.time())

    def _loop_until_stopped(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            if not self._pending() and not self.engine.has_unfinished_requests():
                self._wakeup.wait()
                continue
            try:
                outputs, errors = self._apply_and_step()
            except Exception as e:  # noqa: BLE001 - scheduling, prefix cache, drafting, ...
                outputs, errors = [], self._fail_all(e)
            if outputs or errors:
                assert self._loop is not None  # set by _ensure_thread before it starts us
                try:
                    self._loop.call_soon_threadsafe(self._deliver_all, outputs, errors, time.time())
                except RuntimeError:  # the event loop is closed: nobody is listening
                    return

    def _fail_all(self, error: BaseException) -> list[tuple[str, BaseException]]:
        """A failure outside a model step (the engine's state is unknown): abort every request
        it holds, each ending with a retryable error that names the cause."""
        scheduler = self.engine.scheduler
        ids = [r.request_id for r in [*scheduler.running, *scheduler.waiting]]
        for request_id in ids:
            with contextlib.suppress(Exception):
                self.engine.abort(request_id)
        failure = _engine_failed(error)
        return [(request_id, failure) for request_id in ids]

    def _deliver_all(
        self,
        outputs: list[RequestOutput],
        errors: list[tuple[str, BaseException]],
        step_end_s: float,
    ) -> None:
        flush: set = set()
        for request_id, error in errors:
            self._deliver(request_id, error, flush)
        for out in outputs:
            self._deliver(out.request_id, out, flush)
        for sink in flush:
            sink.flush(step_end_s)


def _engine_failed(error: BaseException) -> ReplicaUnavailableError:
    """What a request gets when the engine failed outside a model step (retryable)."""
    return ReplicaUnavailableError(
        f"the engine failed ({type(error).__name__}: {error}); retry the request"
    )
