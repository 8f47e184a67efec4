"""The prefix cache as the engine sees it. The engine imports no prefix-cache code: its config
carries a ``PrefixCacheSpec`` (``replicas.prefix_cache.manager.PrefixCacheConfig`` is the one we
have), which makes the KV cache's block pool and then the prefix cache over that KV cache."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch

from replicas.engine.block_pool import BlockPool
from replicas.engine.kv_cache import HybridKVCache
from replicas.engine.request import Request
from replicas.engine.scheduler import PrefixMatcher


class PrefixCache(PrefixMatcher, Protocol):
    """What the engine calls on its prefix cache, beside what the scheduler calls."""

    def on_add(self, request: Request, hints: tuple[int, ...] = (), pinned: bool = False) -> None:
        """A request was queued: name its prompt's blocks, pick its boundaries, start lookups."""

    def wait_any(self, requests: Iterable[Request], timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until one of ``requests`` has its lookup done."""

    def restore(self, request: Request) -> None:
        """Write a matched prefix's state into the KV cache before the step runs."""

    def capture(self, request: Request, num_computed: int) -> None:
        """After a step: keep what the request's computed prefix can share."""

    def pin(self, token_ids: list[int]) -> None:
        """Keep this prefix's entries forever (it is computed next)."""

    def stats(self) -> Any:
        """Counters (replicas.prefix_cache.types.PrefixCacheStats)."""

    def close(self) -> None:
        """Stop background threads and connections."""


class PrefixCacheSpec(Protocol):
    """A prefix cache's settings, and how it attaches to an engine."""

    def new_block_pool(self, num_blocks: int) -> BlockPool:
        """The KV cache's block pool (one whose blocks prompts can share)."""

    def attach(
        self, cache: HybridKVCache, pool: Any, redis: Any, dtype: torch.dtype
    ) -> PrefixCache:
        """The prefix cache over ``cache`` (built on ``pool`` from ``new_block_pool``); ``redis``
        is its shared tier or None."""
