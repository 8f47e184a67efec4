"""Where a replica process runs its torch work: on as few threads as possible, for OpenMP's sake.

libgomp (torch's OpenMP runtime, which our C kernels share) keeps a pool of worker threads for
every thread that ever opened a parallel region, for as long as that thread lives. Once a
process holds more of them than it has cores, every worker sleeps as soon as a region ends
instead of spinning for the next one, so each of a forward pass's hundreds of regions waits for
a wake-up. Measured (small preset, bf16, 2 torch threads, 2 cores): weights loaded on one
thread and decode steps run on another took 57 ms a step against 41 when both ran on one
thread, or when the loading thread had ended before the steps began.

So a replica computes on one long-lived thread (``ComputeThread``; the attention replica's is
AsyncEngine's engine thread), and torch work that must happen elsewhere (loading weights in a
constructor, loading experts a new expert map adds) runs in a thread of its own that ends with
it (``in_passing_thread``), taking its pool along.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T], name: str = "torch-once") -> T:
    """``fn()`` in a new thread that ends when it returns -> what it returned (or raises what
    it raised)."""
    done: Future[T] = Future()

    def run() -> None:
        try:
            done.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            done.set_exception(e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    return done.result()


class ComputeThread:
    """One daemon thread that runs the calls given to ``call``, one at a time, in order."""

    def __init__(self, name: str = "torch-compute"):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the compute thread and wait for it -> its result (or raises what it
        raised). Called on the compute thread itself, runs ``fn`` there at once."""
        if threading.current_thread() is self._thread:
            return fn()
        done: Future[T] = Future()
        self._calls.put((fn, done))
        return done.result()

    def stop(self) -> None:
        """End the thread once the calls queued before are done."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, done = item
            try:
                done.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                done.set_exception(e)
