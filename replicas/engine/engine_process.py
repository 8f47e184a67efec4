"""The engine in a process of its own (vLLM's EngineCore shape), fronted by the replica's event
loop.

Served, an attention replica's process also runs Ray Serve's replica machinery, Ray's core
worker threads and the step stream's gRPC server. On the engine thread every torch operation
and kernel call gives up the GIL and takes it back, hundreds of times per decode step, so each
bit of that other Python work makes the step wait, and the hand-offs cost CPU themselves
(bundled model, 8 streams: the engine thread's CPU per decode step about 8-10 ms served against
6.5 in a plain process, even with the replica's outputs dropped). Here the engine steps on the
main thread of a child process that runs nothing else: commands (add, abort, fault) arrive on a
socket and are applied between steps, and each step's outputs go back as one message, which a
reader thread in the replica hands to the event loop.

``EngineProcess`` is an ``EngineFront``: requests are checked on the caller's side against the
engine's ``RequestLimits`` (sent once the engine is built), so bad input fails at once, as with
the in-process engine. If the child dies, every open request ends with a retryable error and
``health`` says why; if the replica dies, the child sees its socket close and exits.

Run as ``python -m replicas.engine.engine_process FD`` by ``EngineProcess`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

from replicas.engine.engine_spec import EngineSpec
from replicas.engine.front import EngineFront, EngineState, engine_failed
from replicas.engine.request_limits import RequestLimits
from replicas.sampling_params import SamplingParams


@dataclass(frozen=True)
class _Ready:
    limits: RequestLimits
    kernels: tuple[str, str]  # (name, why it was chosen)
    resident_bytes: int
    drafts: bool  # it drafts with the MTP block (the "draft" fault needs that)
    state: EngineState


class EngineProcess(EngineFront):
    def __init__(self, spec: EngineSpec, start_timeout_s: float = 1800.0):
        """Start the child, send it ``spec``; returns once the engine is built (raises
        RuntimeError with the child's error if it could not be)."""
        super().__init__()
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "replicas.engine.engine_process", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._conn.send(spec)
            if not self._conn.poll(start_timeout_s):
                raise RuntimeError(f"the engine process did not start in {start_timeout_s:.0f} s")
            kind, payload = self._conn.recv()
        except EOFError:
            code = self._proc.wait()
            raise RuntimeError(
                f"the engine process exited while starting (exit code {code})"
            ) from None
        except BaseException:
            self._kill()
            raise
        if kind != "ready":
            self._kill()
            raise RuntimeError(f"the engine process could not build the engine: {payload}")
        ready: _Ready = payload
        self.limits, self.kernels = ready.limits, ready.kernels
        self.resident_bytes, self._drafts = ready.resident_bytes, ready.drafts
        self._state = ready.state
        self._num_sent = 0  # commands queued; the child's state says how many it applied
        self._clock = time.monotonic()  # since when the child owes us a message, when busy
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._closing = False
        # Commands go out on a thread of their own: a send blocks while the child is in a step
        # and the socket's buffer is full, and the event loop must not.
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._write, name="engine-sender", daemon=True)
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._sender.start()
        self._reader.start()

    # ---- EngineFront ---------------------------------------------------------------------------
    def _check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self.limits.check(prompt_ids, params)

    def _add(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self._send(("add", request_id, list(prompt_ids), params))  # if the child is gone, the
        # reader ends the request with the retryable error (it is registered by then)

    def _abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def failure(self) -> str | None:
        return self._failure

    # ---- what AttentionShard asks --------------------------------------------------------------
    def state(self) -> EngineState:
        return self._state

    def health(self, stall_timeout_s: float) -> str | None:
        """None while the engine can serve; else why not: its process ended, or it has owed
        us a step for more than ``stall_timeout_s`` (hung)."""
        if self._failure is not None:
            return self._failure
        if not self._idle() and (waited := time.monotonic() - self._clock) > stall_timeout_s:
            return f"one engine step has run for {waited:.0f} s (limit {stall_timeout_s:.0f} s)"
        return None

    def inject_fault(self, fault: str, after_steps: int) -> None:
        """Fault tests only (replicas.engine.fault_injection, checked here, armed there)."""
        from replicas.engine import fault_injection

        fault_injection.check(fault, after_steps, drafts=self._drafts)
        if self._failure is not None:
            raise RuntimeError(self._failure)
        self._send(("fault", fault, after_steps))

    async def wait_idle(self) -> None:
        """Until every command sent is applied and no request is running."""
        while not self._idle():
            if self._failure is not None:
                raise RuntimeError(self._failure)
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        """Stop the child (after its current step); open requests end with a retryable error."""
        self._closing = True
        self._send(("stop",))
        self._outbox.put(None)  # the sender's last item
        try:
            await asyncio.to_thread(self._proc.wait, 30)
        except subprocess.TimeoutExpired:
            self._kill()
        await asyncio.to_thread(self._reader.join)
        await asyncio.to_thread(self._sender.join)
        self._conn.close()
        if self._failure is None:
            self._failure = "the engine process was stopped"
        if self._loop is not None and not self._loop.is_closed():
            self._fail_open(engine_failed(self._failure))

    # ---- internals -----------------------------------------------------------------------------
    def _idle(self) -> bool:
        s = self._state
        return s.num_commands_applied == self._num_sent and not (s.num_running or s.num_waiting)

    def _send(self, command: tuple) -> None:
        """Queue ``command`` for the child (the sender thread writes it)."""
        with self._lock:
            if self._idle():  # the child was waiting for commands: it owes a step from now
                self._clock = time.monotonic()
            self._num_sent += 1
        self._outbox.put(command)

    def _write(self) -> None:
        """The sender thread; ends at None or when the child is gone (the reader reports it)."""
        while (command := self._outbox.get()) is not None:
            try:
                self._conn.send(command)
            except OSError:
                return

    def _read(self) -> None:
        """The reader thread: each step's outputs to the event loop, the child's state kept.
        However it ends (the child exits or fails, a message cannot be read, the event loop
        is closed), open requests end with a retryable error unless we are closing."""
        try:
            while True:
                kind, *rest = self._conn.recv()
                if kind == "fatal":
                    self._failure = f"the engine process failed ({rest[0]})"
                    break
                self._clock = time.monotonic()
                if kind == "step":
                    outputs, errors, step_end_s, self._state = rest
                    if self._loop is not None:
                        self._loop.call_soon_threadsafe(
                            self._deliver_all, outputs, errors, step_end_s
                        )
                else:  # "state": after a step without outputs, or commands applied
                    self._state = rest[0]
        except (EOFError, OSError):
            if self._closing:
                return
            self._failure = f"the engine process exited (exit code {self._proc.wait()})"
        except BaseException as e:  # noqa: BLE001 - unreadable message, closed loop, ...
            if self._closing:
                return
            self._failure = f"the engine process's messages could not be read ({_describe(e)})"
            self._kill()
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the event loop is closed
                self._loop.call_soon_threadsafe(self._fail_open, engine_failed(self._failure))

    def _kill(self) -> None:
        with contextlib.suppress(OSError):
            self._proc.kill()
        self._proc.wait()


# ---- the child ---------------------------------------------------------------------------------
def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (most do, keeping their type), else a RuntimeError saying
    what it was."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(_describe(e))


class _Core:
    """The child's loop: apply commands, step, send the step's outputs (AsyncEngine's engine
    thread, with a socket where the event loop was)."""

    def __init__(self, engine, conn: Connection):
        self.engine, self.conn = engine, conn
        self.num_steps, self.step_time_s, self.step_cpu_s = 0, 0.0, 0.0
        self.num_applied = 0
        self.stopping = False

    def state(self) -> EngineState:
        from replicas.engine.async_engine import engine_state

        return engine_state(
            self.engine, self.num_steps, self.step_time_s, self.step_cpu_s, self.num_applied
        )

    def run(self) -> None:
        while not self.stopping:
            errors: list[tuple[str, BaseException]] = []
            if not self.engine.has_unfinished_requests():
                self.conn.send(("state", self.state()))
                self._apply(self.conn.recv(), errors)  # idle: wait for a command
            while not self.stopping and self.conn.poll():
                self._apply(self.conn.recv(), errors)
            outputs = []
            if self.engine.has_unfinished_requests() and not self.stopping:
                outputs, step_errors = self._step()
                errors += step_errors
            if outputs or errors:
                errors = [(request_id, _portable(e)) for request_id, e in errors]
                self.conn.send(("step", outputs, errors, time.time(), self.state()))
            else:  # a step without outputs (a prefill chunk): the replica still sees progress
                self.conn.send(("state", self.state()))

    def _apply(self, command: tuple, errors: list[tuple[str, BaseException]]) -> None:
        self.num_applied += 1
        kind, *args = command
        try:
            if kind == "add":
                self.engine.add_request(*args)
            elif kind == "abort":
                self.engine.abort(args[0])
            elif kind == "fault":
                from replicas.engine import fault_injection

                fault_injection.arm(self.engine, *args)
            elif kind == "stop":
                self.stopping = True
        except Exception as e:  # noqa: BLE001 - an add's error goes to its stream; others here
            if kind == "add":
                errors.append((args[0], e))
            else:
                print(f"engine process: {kind} failed: {_describe(e)}", file=sys.stderr)

    def _step(self):
        from replicas.engine.async_engine import fail_all
        from replicas.outputs import StepFailedError

        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return self.engine.step(), []
        except StepFailedError as e:  # those requests end with the error; the others go on
            return [], [(request_id, e.cause) for request_id in e.request_ids]
        except Exception as e:  # noqa: BLE001 - scheduling, prefix cache, drafting, ...
            return [], fail_all(self.engine, e)
        finally:
            self.num_steps += 1
            self.step_time_s += time.perf_counter() - started
            self.step_cpu_s += time.thread_time() - cpu


def _main(fd: int) -> None:
    import torch

    from replicas.model.loader import resident_bytes

    # Exit when the replica's process is gone. Between steps the socket's EOF tells; a step
    # that hangs never reads it, so a watchdog also checks for a new parent (not
    # PR_SET_PDEATHSIG: that fires when the thread that started us ends, and the replica may
    # start us from a pool thread).
    parent = os.getppid()

    def watchdog() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()
    conn = Connection(fd)
    spec: EngineSpec = conn.recv()
    try:
        if spec.cpus:  # before torch's threads start: they inherit it
            os.sched_setaffinity(0, spec.cpus)
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        engine = spec.build()
    except BaseException as e:  # noqa: BLE001 - reported to the replica
        conn.send(("failed", _describe(e)))
        return
    core = _Core(engine, conn)
    kernels = (engine.kernels.name, engine.kernels.reason)
    drafts = engine.drafter is not None
    ready = _Ready(engine.limits, kernels, resident_bytes(engine.model), drafts, core.state())
    conn.send(("ready", ready))
    try:
        core.run()
    except (EOFError, OSError):  # the replica is gone
        return
    except BaseException as e:  # noqa: BLE001 - the replica fails every open request
        with contextlib.suppress(OSError):
            conn.send(("fatal", _describe(e)))
        raise
    finally:
        if engine.prefix is not None:
            engine.prefix.close()


if __name__ == "__main__":  # run through the module's own name, so what it pickles unpickles
    from replicas.engine import engine_process

    engine_process._main(int(sys.argv[1]))
