"""What one router knows of each attention replica's load, for choosing where a request goes
(router.affinity.rank_replicas). Pure bookkeeping.

A replica reports how many requests it holds, from every router, with each step-stream
message; between reports this router adds the requests it has sent there since. Before a
replica's first report, only this router's own open requests there count.
"""

from __future__ import annotations

from collections import Counter


class ReplicaLoads:
    def __init__(self):
        self._own: Counter[str] = Counter()  # this router's open requests per replica
        self._reported: dict[str, int] = {}
        self._since: Counter[str] = Counter()  # sent there since its last report

    def sent(self, replica: str) -> None:
        self._own[replica] += 1
        self._since[replica] += 1

    def ended(self, replica: str) -> None:
        self._own[replica] -= 1
        if self._own[replica] <= 0:
            del self._own[replica]

    def reported(self, replica: str, num_requests: int) -> None:
        self._reported[replica] = num_requests
        self._since.pop(replica, None)

    def load(self, replica: str) -> int:
        own = self._own.get(replica, 0)
        if replica not in self._reported:
            return own
        return max(own, self._reported[replica] + self._since.get(replica, 0))

    def forget(self, replica: str) -> None:
        """Drop the reports of a replica whose stream ended (its open requests here still end
        through ``ended``)."""
        self._reported.pop(replica, None)
        self._since.pop(replica, None)
