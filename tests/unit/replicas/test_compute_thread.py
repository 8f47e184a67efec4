"""One thread for a replica's torch work, and threads that end with theirs."""

from __future__ import annotations

import threading

import pytest

from replicas.compute_thread import ComputeThread, in_passing_thread


def test_in_passing_thread_returns_raises_and_leaves_no_thread():
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 7

    assert in_passing_thread(work) == 7
    assert seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()  # its OpenMP pool went with it

    def fail() -> None:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        in_passing_thread(fail)


def test_compute_thread_runs_every_call_on_one_thread_in_order():
    compute = ComputeThread()
    ran: list[tuple[int, threading.Thread]] = []
    callers = [
        threading.Thread(
            target=lambda i=i: compute.call(lambda: ran.append((i, threading.current_thread())))
        )
        for i in range(8)
    ]
    for caller in callers:
        caller.start()
        caller.join()
    assert [i for i, _ in ran] == list(range(8))
    threads = {thread for _, thread in ran}
    assert len(threads) == 1 and threads.isdisjoint(callers)
    # A call made from the compute thread itself runs there at once (no deadlock).
    assert compute.call(lambda: compute.call(threading.current_thread)) in threads

    def fail() -> None:
        raise RuntimeError("expert not held")

    with pytest.raises(RuntimeError, match="expert not held"):
        compute.call(fail)
    assert compute.call(lambda: 3) == 3  # a failed call leaves the thread serving
    (thread,) = threads
    compute.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
