"""How many Generate streams one router replica holds at once, over all its protocols (gRPC and
HTTP count against the same limit: router.max_ongoing_requests)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from router.errors import RequestError, invalid


class StreamSlots:
    def __init__(self, limit: int | None):
        """``limit``: streams at once; None: no limit."""
        self.limit, self.in_use = limit, 0

    @contextmanager
    def hold(self, n: int = 1) -> Iterator[None]:
        """Hold n slots for the block; RESOURCE_EXHAUSTED (before any work) when they are not
        free, INVALID_ARGUMENT when n is more than the limit (retrying would never help)."""
        if self.limit is not None and n > self.limit:
            raise invalid(
                f"the request needs {n} streams (its choices); this router replica holds at "
                f"most {self.limit} (router.max_ongoing_requests): ask for fewer choices"
            )
        if self.limit is not None and self.in_use + n > self.limit:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this router replica holds {self.in_use} streams, its limit is {self.limit} "
                "(router.max_ongoing_requests); retry later, or run more Router replicas",
            )
        self.in_use += n
        try:
            yield
        finally:
            self.in_use -= n
