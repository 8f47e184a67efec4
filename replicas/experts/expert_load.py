"""Tokens per expert and MoE layer over a sliding time window: what an expert replica
reports to the balancer, the autoscaler and the metrics. Plain torch, no Ray."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch


class LoadWindow:
    """Slots computed per (MoE layer, expert) in the last ``window_s`` seconds.

    Counts go into ``num_buckets`` time buckets of ``window_s / num_buckets`` seconds; a bucket
    leaves the window whole, so the window covers between ``window_s - bucket`` and
    ``window_s`` seconds of history. Not thread-safe: the owner holds a lock.
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_experts: int,
        window_s: float = 30.0,
        num_buckets: int = 6,
        clock: Callable[[], float] = time.monotonic,
    ):
        if window_s <= 0 or num_buckets < 1:
            raise ValueError("load window: window_s > 0 and num_buckets >= 1 are required")
        self.layers, self.num_experts = list(layers), num_experts
        self.window_s, self.bucket_s, self.clock = window_s, window_s / num_buckets, clock
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self._counts = torch.zeros(num_buckets, len(self.layers), num_experts, dtype=torch.long)
        self._busy = [0.0] * num_buckets  # seconds spent computing
        self._stamps: list[int | None] = [None] * num_buckets  # the bucket number each holds
        self._started = clock()

    def _bucket(self, now: float) -> int:
        number = int(now // self.bucket_s)
        i = number % len(self._stamps)
        if self._stamps[i] != number:
            self._counts[i].zero_()
            self._busy[i] = 0.0
            self._stamps[i] = number
        return i

    def add(
        self, layer: int, expert_ids: torch.Tensor, busy_s: float = 0.0, now: float | None = None
    ) -> None:
        """Count one slot per entry of ``expert_ids`` (global ids) in ``layer``, and
        ``busy_s`` seconds of computing."""
        if layer not in self._row:
            raise KeyError(f"layer {layer} is not one of this window's MoE layers")
        counts = torch.bincount(expert_ids.flatten().cpu(), minlength=self.num_experts)
        i = self._bucket(self.clock() if now is None else now)
        self._counts[i, self._row[layer]] += counts[: self.num_experts]
        self._busy[i] += busy_s

    def _live(self, now: float | None) -> list[int]:
        number = int((self.clock() if now is None else now) // self.bucket_s)
        return [
            i
            for i, s in enumerate(self._stamps)
            if s is not None and number - len(self._stamps) < s <= number
        ]

    def counts(self, now: float | None = None) -> torch.Tensor:
        """-> [L, E] slots per (layer, expert) within the window."""
        live = self._live(now)
        return self._counts[live].sum(0) if live else torch.zeros_like(self._counts[0])

    def busy(self, now: float | None = None) -> float:
        """The fraction of the window's time spent computing (0..1)."""
        now = self.clock() if now is None else now
        return min(1.0, sum(self._busy[i] for i in self._live(now)) / self.seconds(now))

    def seconds(self, now: float | None = None) -> float:
        """How many seconds the window's counts cover (less than window_s just after start)."""
        now = self.clock() if now is None else now
        return max(min(self.window_s, now - self._started), 1e-3)

    def tokens_per_s(self, now: float | None = None) -> float:
        """Slots per second per MoE layer: the rows one layer's experts compute per second."""
        now = self.clock() if now is None else now
        if not self.layers:
            return 0.0
        return float(self.counts(now).sum()) / len(self.layers) / self.seconds(now)
