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
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from replicas.engine.engine import LLMEngine
from replicas.engine.front import EngineFront, EngineState, OutputSink, engine_failed
from replicas.outputs import RequestOutput, StepFailedError
from replicas.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "OutputSink"]


class AsyncEngine(EngineFront):
    def __init__(self, engine: LLMEngine):
        super().__init__()
        self.engine = engine
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

    # ---- public ----------------------------------------------------------------------------
    def health(self, stall_timeout_s: float) -> str | None:
        """None while the engine can serve; else why not: its thread died, or one step has run
        for more than ``stall_timeout_s`` (hung)."""
        if (failure := self.failure()) is not None:
            return failure
        started = self._step_started
        if started is not None and (running := time.monotonic() - started) > stall_timeout_s:
            return f"one engine step has run for {running:.0f} s (limit {stall_timeout_s:.0f} s)"
        return None

    def state(self) -> EngineState:
        return engine_state(self.engine, self.num_steps, self.step_time_s, self.step_thread_cpu_s)

    @property
    def kernels(self) -> tuple[str, str]:
        """(name, why chosen) of the engine's attention kernels."""
        return self.engine.kernels.name, self.engine.kernels.reason

    def inject_fault(self, fault: str, after_steps: int) -> None:
        """Fault tests only: replicas.engine.fault_injection.arm on this engine."""
        from replicas.engine.fault_injection import arm

        arm(self.engine, fault, after_steps)

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
    def failure(self) -> str | None:
        if self._failure is None:
            return None
        return f"the engine thread died ({type(self._failure).__name__}: {self._failure})"

    def _check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self.engine.check_request(prompt_ids, params)

    def _add(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self._submit(lambda: self.engine.add_request(request_id, prompt_ids, params), request_id)

    def _abort(self, request_id: str) -> None:
        self._submit(lambda: self.engine.abort(request_id), None)

    def _pending(self) -> bool:
        with self._commands_lock:
            return bool(self._commands)

    def _submit(self, command, request_id: str | None) -> None:
        with self._commands_lock:
            self._commands.append((command, request_id))
        self._ensure_thread()
        self._wakeup.set()

    def _ensure_thread(self) -> None:
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
                assert self._loop is not None  # set by _check_new before anything is queued
                self._loop.call_soon_threadsafe(self._fail_open, engine_failed(e))
            raise

    def _loop_until_stopped(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            if not self._pending() and not self.engine.has_unfinished_requests():
                self._wakeup.wait()
                continue
            try:
                outputs, errors = self._apply_and_step()
            except Exception as e:  # noqa: BLE001 - scheduling, prefix cache, drafting, ...
                outputs, errors = [], fail_all(self.engine, e)
            if outputs or errors:
                assert self._loop is not None  # set by _check_new before anything is queued
                try:
                    self._loop.call_soon_threadsafe(self._deliver_all, outputs, errors, time.time())
                except RuntimeError:  # the event loop is closed: nobody is listening
                    return


def fail_all(engine: LLMEngine, error: BaseException) -> list[tuple[str, BaseException]]:
    """A failure outside a model step (the engine's state is unknown): abort every request
    ``engine`` holds, each ending with a retryable error that names the cause."""
    scheduler = engine.scheduler
    ids = [r.request_id for r in [*scheduler.running, *scheduler.waiting]]
    for request_id in ids:
        with contextlib.suppress(Exception):
            engine.abort(request_id)
    failure = engine_failed(error)
    return [(request_id, failure) for request_id in ids]


def engine_state(
    engine: LLMEngine, num_steps: int, step_time_s: float, step_cpu_s: float, applied: int = 0
) -> EngineState:
    return EngineState(
        num_steps=num_steps,
        step_time_s=step_time_s,
        step_thread_cpu_s=step_cpu_s,
        num_running=len(engine.scheduler.running),
        num_waiting=len(engine.scheduler.waiting),
        num_blocks_in_use=engine.num_blocks_in_use,
        num_blocks_total=engine.cache.blocks.num_total,
        num_commands_applied=applied,
        prefix_cache=engine.prefix.stats() if engine.prefix is not None else None,
        acceptance=engine.acceptance if engine.config.num_speculative_tokens else None,
    )
