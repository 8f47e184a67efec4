"""Threads the deployments run beside Serve's event loop: a periodic caller (metrics, balancer
reports) and a way to block on a handle from a constructor."""

from __future__ import annotations

import logging
import threading

from replicas.compute_thread import in_passing_thread

log = logging.getLogger(__name__)


def off_loop(fn):
    """``fn()`` in a thread of its own: Serve runs constructors on its user-code event loop,
    where a blocking handle call (``.result()``) is refused."""
    return in_passing_thread(fn, name="off-loop")


class Every:
    """Calls ``fn`` every ``interval_s`` seconds in a daemon thread until ``stop``; a failing
    call is logged and retried at the next tick."""

    def __init__(self, interval_s: float, fn):
        self.interval_s, self.fn = interval_s, fn
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Every:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.fn()
            except Exception:  # noqa: BLE001 - keep reporting; the next tick may work
                log.warning(
                    "periodic %s failed", getattr(self.fn, "__name__", "call"), exc_info=True
                )

    def stop(self) -> None:
        self.stopped.set()
