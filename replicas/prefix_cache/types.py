"""The prefix cache's records: window snapshots, what Redis answered for a request, each request's
prefix bookkeeping and match, the cache's counters; and what a cached prefix costs in Redis."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from replicas.engine.kv_cache import kv_footprint


@dataclass
class Snapshot:
    num_tokens: int
    sliding: torch.Tensor  # [2, Ls, n, Hkv, D], positions P - n .. P - 1
    partial: torch.Tensor  # [2, Lg, P % bs, Hkv, D]

    @property
    def nbytes(self) -> int:
        return (self.sliding.numel() + self.partial.numel()) * self.sliding.element_size()


@dataclass
class Lookup:
    """What Redis said about one request (built on the read thread)."""

    windows_present: set[int] = field(default_factory=set)  # boundaries P
    blocks_present: set[int] = field(default_factory=set)  # block indexes
    hit: Snapshot | None = None
    fetched: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> [2,Lg,bs,..]
    fetched_from: int = 0  # fetched blocks are indexes fetched_from .. P // bs - 1


@dataclass
class PrefixState:
    """Per-request prefix bookkeeping (Request.prefix)."""

    names: list[bytes]
    keys: dict[int, bytes]  # boundary P -> window name
    usable: list[int]  # boundaries a hit may use (< prompt length), descending
    capture_at: list[int]  # boundaries still to snapshot, ascending
    lookup: Future | None = None
    match: PrefixMatch | None = None
    pinned: bool = False
    redis_blocks: set[int] = field(default_factory=set)
    """Block indexes Redis already holds (from the lookup; none for a pinned request, whose
    writes also clear TTLs) or this request has queued for it: never sent again."""
    settled: bool = False
    """The first match attempt counted a miss / sent Redis what it lacked."""


@dataclass
class PrefixMatch:
    num_tokens: int
    shared: list[int]  # block ids taken from the local tier (references held)
    fetched: dict[int, torch.Tensor]
    snapshot: Snapshot
    source: str  # "local" | "redis"


@dataclass(frozen=True)
class PrefixCacheStats:
    num_lookups: int
    num_local_hits: int
    num_redis_hits: int
    num_misses: int
    num_cached_tokens: int
    """Prompt tokens served from the cache (summed over requests)."""
    num_cached_blocks: int
    num_snapshots: int
    snapshot_bytes: int
    redis_available: bool
    redis_bytes_read: int
    redis_bytes_written: int
    num_redis_errors: int
    num_corrupt_values: int
    num_redis_writes_dropped: int = 0
    """Redis writes not queued because the write queue held redis_queue_bytes already."""
    redis_queue_bytes: int = 0
    """Host bytes queued for the Redis write thread now."""


def stored_bytes_per_token(
    cfg, num_tokens: int, block_size: int, dtype_bytes: int = 2, num_boundaries: int = 1
) -> tuple[float, float]:
    """Redis bytes per cached token of a ``num_tokens`` prefix in this layout (global-layer
    blocks + one window snapshot per boundary; value headers left out), and in a layout that
    stores every layer's K/V for every token. Uses the same footprint code as the cache."""
    fp = kv_footprint(cfg, dtype_bytes)
    full = num_tokens // block_size * block_size
    ours = full * fp.global_bytes_per_token + num_boundaries * (
        fp.sliding_bytes_per_sequence + (num_tokens - full) * fp.global_bytes_per_token
    )
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
    all_layers = num_tokens * cfg.num_hidden_layers * per_layer
    return ours / num_tokens, all_layers / num_tokens
