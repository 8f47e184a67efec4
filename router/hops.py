"""Where a token's time goes between the engine and the client, hop by hop. Pure Python.

Each step-stream batch carries when its oldest engine step ended and when the attention
replica handed it to gRPC (cluster.deployments.step_stream); the router adds when it received
the batch and when it handed each response to its own gRPC server. So per delta:

    engine_to_publish   the step's end -> the batch sent (the replica's event loop took it up,
                        encoded every output of the step)
    publish_to_router   sent -> received by this router (the step stream's transport)
    router              received -> the GenerateResponse handed to gRPC (detokenizing,
                        stop strings, parsing, protobuf)

What follows (gRPC to the client) only the client can time. Clocks are wall clocks: across
machines, these are as good as the clocks' sync. Recent samples are kept for percentiles
(``summary``); ``observer`` (e.g. a Prometheus histogram) sees at most one sample of each hop
per ``observe_interval_s``, however many streams run. A Ray histogram's observe costs 3 us in
an idle actor, but in the busy router replica it gives up the GIL and waits to take it back:
one sample in 8 of every delta still held 10% of the router's event loop at 64 streams
(py-spy, bundled model), where the local percentiles say the same.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

HOPS = ("engine_to_publish", "publish_to_router", "router")
KEEP = 4096  # recent samples per hop
OBSERVE_INTERVAL_S = 0.1  # the observer sees at most one sample per hop this often


class HopStats:
    def __init__(
        self,
        observer: Callable[[str, float], None] | None = None,
        keep: int = KEEP,
        observe_interval_s: float = OBSERVE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if observe_interval_s < 0:
            raise ValueError("observe_interval_s must be >= 0")
        self.observer, self.observe_interval_s, self.clock = observer, observe_interval_s, clock
        self.samples: dict[str, deque[float]] = {h: deque(maxlen=keep) for h in HOPS}
        self._next = dict.fromkeys(HOPS, float("-inf"))  # when the observer may see the next

    def observe(self, hop: str, seconds: float) -> None:
        self.samples[hop].append(seconds)
        if self.observer is not None:
            now = self.clock()
            if now >= self._next[hop]:
                self._next[hop] = now + self.observe_interval_s
                self.observer(hop, seconds)

    def batch(self, step_end_s: float, sent_s: float, received_s: float) -> None:
        """A step-stream batch's times (no-op for a batch without them)."""
        if step_end_s and sent_s:
            self.observe("engine_to_publish", sent_s - step_end_s)
            self.observe("publish_to_router", received_s - sent_s)

    def clear(self) -> None:
        for s in self.samples.values():
            s.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        """{hop: {"n", "p50_ms", "p99_ms", "mean_ms"}} over the recent samples."""
        out = {}
        for hop, samples in self.samples.items():
            if not samples:
                continue
            ms = sorted(1e3 * s for s in samples)
            out[hop] = {
                "n": len(ms),
                "p50_ms": ms[len(ms) // 2],
                "p99_ms": ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
                "mean_ms": sum(ms) / len(ms),
            }
        return out
