"""Which requests a router has told their attention replica to abort, so that a request it no
longer reads is aborted once, and again only if that Abort did not arrive. Pure bookkeeping
(the caller passes the time).

A router stops reading a request when it ends early (cancel, deadline, a stop string) and when
the replica's step stream breaks (every request bound to that stream is then lost to the
router), and it sends the replica an ``Abort`` either way. Sent while the replica is cut off
(a network partition), the Abort fails. If the router's stream is back before the replica's
grace period for it has passed (cluster.deployments.step_stream.ORPHAN_GRACE_S), the replica
keeps that request running for nobody, to its last token, and its deltas come to the router
again on the new stream: such a delta is the router's cue to abort it again. A delta of a
request whose Abort is on its way or has arrived (the step in flight when it was sent) is
not: remembered for ``memory_s``, long past any such delta.
"""

from __future__ import annotations


class OwedAborts:
    def __init__(self, memory_s: float = 30.0):
        self.memory_s = memory_s
        self._sent: dict[str, float] = {}  # request id -> when its Abort was sent (oldest first)

    def sent(self, request_id: str, now: float) -> None:
        """An Abort for ``request_id`` is on its way."""
        while self._sent:  # forget the Aborts sent more than memory_s ago
            oldest, at = next(iter(self._sent.items()))
            if now - at < self.memory_s:
                break
            del self._sent[oldest]
        self._sent.pop(request_id, None)  # to the end: the order stays oldest first
        self._sent[request_id] = now

    def failed(self, request_id: str) -> None:
        """That Abort did not arrive (the replica unreachable): the request may still run."""
        self._sent.pop(request_id, None)

    def owed(self, request_id: str, now: float) -> bool:
        """A delta came for ``request_id``, which this router no longer reads: whether to send
        an Abort for it (none on its way, or the last sent longer than memory_s ago)."""
        at = self._sent.get(request_id)
        return at is None or now - at >= self.memory_s

    def __len__(self) -> int:
        return len(self._sent)
