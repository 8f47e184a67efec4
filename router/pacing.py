"""How often one stream's token deltas leave a router replica: every step while few streams
run, at most once per interval under load.

Each message a stream sends costs the router and the client a fixed amount of CPU whatever it
carries (a gRPC write or an SSE event, the protobuf or JSON, the event loop's wake-ups), so with
many streams the messages, not the tokens, fill a core. Under load a stream's deltas are merged
over ``interval_s`` instead (Ray Serve LLM batches streamed responses over 50 ms by default; vLLM
and SGLang have a stream interval in tokens): the first delta and the last one (the finish)
still leave as soon as they are made, so time to first token and end-to-end time are unchanged,
and a stream's tokens arrive in chunks of up to ``interval_s``. No Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamPacing:
    interval_s: float = 0.05
    """The least time between two deltas of one stream under load; 0: every delta at once."""
    min_streams: int = 8
    """Streams this router replica holds from which on it paces them."""

    def __post_init__(self):
        if self.interval_s < 0 or self.min_streams < 1:
            raise ValueError(f"interval_s must be >= 0 and min_streams >= 1, got {self}")

    def interval(self, streams: int) -> float:
        """The interval for a delta when the replica holds ``streams`` streams."""
        return self.interval_s if streams >= self.min_streams else 0.0
