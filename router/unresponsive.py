"""Which attention replicas a router has lately found unresponsive, so its next requests go
elsewhere first. Pure bookkeeping (the caller passes the time).

A replica whose ``Submit`` timed out or failed, that refused a request as unavailable (hung
step, stopping), or whose step stream broke, stays in Serve's replica set until Serve's health
checks fail it (three checks, tens of seconds) and stops it. Meanwhile every request the router
sent there would wait out the submit timeout first. So such a replica is ranked after every
other one for ``cooloff_s`` (each new failure starts a new period), or until it is heard from
again (a step-stream message, an admitted request). It still gets requests when no other
replica is left to try: it may have recovered, and the request would otherwise have nowhere
to go.
"""

from __future__ import annotations


class UnresponsiveReplicas:
    def __init__(self, cooloff_s: float = 30.0):
        self.cooloff_s = cooloff_s
        self._until: dict[str, float] = {}  # replica -> end of its cool-off

    def failed(self, replica: str, now: float) -> None:
        """A call to ``replica`` timed out or failed, or it refused as unavailable."""
        self._until[replica] = now + self.cooloff_s

    def heard_from(self, replica: str) -> None:
        """``replica`` answered (a step-stream message, an admitted request)."""
        self._until.pop(replica, None)

    def is_unresponsive(self, replica: str, now: float) -> bool:
        until = self._until.get(replica)
        if until is None:
            return False
        if now >= until:
            del self._until[replica]
            return False
        return True
