"""Free lists of cache ids (global-layer blocks, sliding-state slots). Pure Python."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class BlockPool:
    """Ids 0..n-1; allocate takes from the front, free returns to the back."""

    def __init__(self, num: int):
        self.num_total = num
        self._free = deque(range(num))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_total - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} ids, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, ids: Sequence[int]) -> None:
        self._free.extend(ids)
