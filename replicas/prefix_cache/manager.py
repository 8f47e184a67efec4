"""Prefix reuse for one engine: the local tier (shared blocks + window snapshots) and Redis.

Life of a request (the engine calls these; the scheduler calls ``is_ready``/``match``/``release``):

1. ``on_add``: name the prompt's full blocks (hash chain) and pick its *boundaries*: the hints the
   caller gave (e.g. the end of the system message), every ``snapshot_interval_tokens``, and
   each pinned prefix. With Redis, a lookup starts on the read thread: which of the request's
   window and block keys Redis holds, and the values of the longest usable hit.
2. ``match`` (at admission, once the lookup is done): the longest boundary P < prompt length
   whose snapshot and blocks are here or were fetched. Local blocks are shared (a reference
   each); fetched ones go into fresh blocks. The request starts at P.
3. ``restore`` (before the step runs): fetched blocks, the partial block's rows and the sliding
   windows are written into the cache: exactly the state a prefill of P tokens leaves.
4. ``capture`` (after a step whose chunk ended on a boundary; the scheduler cuts chunks there):
   name the full blocks, keep the snapshot locally, and hand Redis what it lacks (write thread).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from replicas.engine.kv_cache import HybridKVCache
from replicas.engine.request import Request
from replicas.prefix_cache import kv_format as fmt
from replicas.prefix_cache.blocks import (
    PrefixBlockPool,
    SnapshotCache,
    block_hashes,
    boundary_key,
    chain_root,
)
from replicas.prefix_cache.redis_tier import RedisTier, RedisUnavailable
from replicas.prefix_cache.types import (
    Lookup,
    PrefixCacheStats,
    PrefixMatch,
    PrefixState,
    Snapshot,
)


@dataclass(frozen=True)
class PrefixCacheConfig:
    fingerprint: str
    """Names the model state (weights revision, dtype, tokenizer and template): keys of
    different models never meet. See replicas.prefix_cache.fingerprint.model_fingerprint."""
    snapshot_interval_tokens: int = 512
    """Also keep a window snapshot every this many prompt tokens (0: only at hinted
    boundaries), so prompts that share a long prefix without hints still hit."""
    local_snapshot_bytes: int = 256 << 20
    """Bound on the window snapshots kept in this replica (LRU)."""
    redis_queue_bytes: int = 256 << 20
    """Bound on the host copies waiting for the Redis write thread; a write that would pass it
    is dropped (counted in stats: the entry is simply not shared)."""

    def __post_init__(self):
        if (
            min(self.snapshot_interval_tokens, self.local_snapshot_bytes, self.redis_queue_bytes)
            < 0
        ):
            raise ValueError(
                "snapshot_interval_tokens, local_snapshot_bytes and redis_queue_bytes must be >= 0"
            )

    # What the engine calls (replicas.engine.prefix_interface.PrefixCacheSpec).
    def new_block_pool(self, num_blocks: int) -> PrefixBlockPool:
        """The KV cache's block pool, with blocks that prompts can share."""
        return PrefixBlockPool(num_blocks)

    def attach(
        self,
        cache: HybridKVCache,
        pool: PrefixBlockPool,
        redis: RedisTier | None,
        dtype: torch.dtype,
    ) -> PrefixCacheManager:
        """The prefix cache over an engine's KV cache (its pool from ``new_block_pool``)."""
        return PrefixCacheManager(cache, pool, self, redis, dtype)


class PrefixCacheManager:
    def __init__(
        self,
        cache: HybridKVCache,
        pool: PrefixBlockPool,
        config: PrefixCacheConfig,
        redis: RedisTier | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if not config.fingerprint:
            raise ValueError("prefix cache needs a model fingerprint")
        self.cache, self.pool, self.config, self.redis = cache, pool, config, redis
        self.bs = cache.block_size
        self.dtype = dtype
        self.root = chain_root(config.fingerprint, self.bs)
        self.snapshots = SnapshotCache(config.local_snapshot_bytes)
        self.pinned: list[list[int]] = []  # token ids of pinned prefixes
        self.num_lookups = self.num_local_hits = self.num_redis_hits = 0
        self.num_misses = self.num_cached_tokens = 0
        self.num_writes_dropped = 0
        self._queued_bytes = 0  # host copies waiting for the write thread
        self._queue_lock = threading.Lock()
        cfg = cache.cfg
        kv = (cfg.num_key_value_heads, cfg.head_dim)
        gl, sl = cache.global_layers, cache.sliding_layers
        self._expect_block = {fmt.GLOBAL: (gl, (2, len(gl), self.bs, *kv))}
        self._expect_window = {
            fmt.SLIDING: (sl, (2, len(sl), -1, *kv)),
            fmt.PARTIAL: (gl, (2, len(gl), -1, *kv)),
        }
        self._block_nbytes = 2 * len(gl) * self.bs * kv[0] * kv[1] * torch.finfo(dtype).bits // 8

    # ---- admission -----------------------------------------------------------------------------
    def on_add(self, request: Request, hints: tuple[int, ...] = (), pinned: bool = False) -> None:
        tokens = request.prompt_ids
        n = len(tokens)
        bounds = {p for p in hints if 0 < p <= n}
        step = self.config.snapshot_interval_tokens
        if step:
            bounds.update(range(step, n + 1, step))
        for prefix in self.pinned:
            if len(prefix) <= n and tokens[: len(prefix)] == prefix:
                bounds.add(len(prefix))
        if not bounds:
            request.prefix = None
            return
        names = block_hashes(self.root, tokens, self.bs)
        keys = {p: boundary_key(self.root, names, tokens, p, self.bs) for p in bounds}
        state = PrefixState(
            names=names,
            keys=keys,
            usable=sorted((p for p in bounds if p < n), reverse=True),
            capture_at=sorted(bounds),
            pinned=pinned,
        )
        request.prefix = state
        self.num_lookups += 1
        if self.redis is not None:
            local_best = self._local_best(state)
            run = self.pool.cached_run(names)
            state.lookup = self.redis.reads.submit(self._redis_lookup, state, local_best, run)

    def is_ready(self, request: Request) -> bool:
        state = request.prefix
        return state is None or state.lookup is None or state.lookup.done()

    def wait_any(self, requests, timeout_s: float) -> None:
        """Block up to timeout_s for a pending lookup among ``requests`` (idle engine)."""
        for request in requests:
            lookup = request.prefix.lookup if request.prefix is not None else None
            if lookup is not None and not lookup.done():
                with contextlib.suppress(TimeoutError):
                    lookup.exception(timeout=timeout_s)
                return

    def _local_best(self, state: PrefixState) -> int:
        for p in state.usable:
            if (
                state.keys[p] in self.snapshots
                and self.pool.cached_run(state.names[: p // self.bs]) >= p // self.bs
            ):
                return p
        return 0

    def match(self, request: Request) -> PrefixMatch | None:
        """Take the longest usable cached prefix (block references held) or None."""
        state = request.prefix
        if state is None:
            return None
        lookup = None  # kept by the future: a retried admission or a preempted request reuses it
        if state.lookup is not None:
            lookup = state.lookup.result() if state.lookup.exception() is None else Lookup()
        found = None
        hit = lookup.hit if lookup is not None else None
        for p in state.usable:
            nfull = p // self.bs
            run = min(self.pool.cached_run(state.names[:nfull]), nfull)
            # Redis' blocks start where the local run ended at lookup time: usable if no local
            # block of that run was evicted since.
            if (
                hit is not None
                and lookup is not None
                and hit.num_tokens == p
                and run >= lookup.fetched_from
            ):
                fetched = {i: lookup.fetched[i] for i in range(run, nfull)}
                found = (p, run, fetched, hit, "redis")
                break
            snap = self.snapshots.get(state.keys[p])
            if snap is not None and run == nfull:
                found = (p, run, {}, snap, "local")
                break
        if not state.settled:  # once per request, however often admission is tried
            state.settled = True
            if lookup is not None:
                state.redis_blocks = set() if state.pinned else set(lookup.blocks_present)
                self._publish_missing(request, lookup, found)
            if found is None:
                self.num_misses += 1
        if found is None:
            return None
        p, run, fetched, snap, source = found
        shared = []
        for name in state.names[:run]:  # cached_run said they are all here
            block = self.pool.acquire(name)
            if block is None:
                raise RuntimeError("a block of the cached run is gone")
            shared.append(block)
        state.match = PrefixMatch(p, shared, fetched, snap, source)
        return state.match

    def release(self, request: Request) -> None:
        """Undo a match whose request could not be admitted after all."""
        state = request.prefix
        if state is not None and state.match is not None:
            self.pool.free(state.match.shared)
            state.match = None

    def restore(self, request: Request) -> None:
        """Write a match's state into the cache (the request now holds its blocks and slot)."""
        state = request.prefix
        m = state.match
        state.match = None
        ids = request.block_ids
        for i, data in m.fetched.items():
            self.cache.write_rows(ids[i], data)
            self.pool.register(ids[i], state.names[i])
        if m.snapshot.partial.shape[2]:
            self.cache.write_rows(ids[m.num_tokens // self.bs], m.snapshot.partial)
        self.cache.write_window(request.scheduled_slot, m.num_tokens, m.snapshot.sliding)
        if m.source == "redis":
            self.num_redis_hits += 1
            self.snapshots.put(state.keys[m.num_tokens], m.snapshot, m.snapshot.nbytes)
        else:
            self.num_local_hits += 1
        if request.num_preemptions == 0:
            request.num_cached_tokens = m.num_tokens
            self.num_cached_tokens += m.num_tokens

    # ---- after a step --------------------------------------------------------------------------
    def capture(self, request: Request, num_computed: int) -> None:
        """Called once the request's first num_computed positions are in the cache."""
        state = request.prefix
        if state is None:
            return
        while state.capture_at and state.capture_at[0] < num_computed:
            state.capture_at.pop(0)  # resumed past it from the cache, or preempted mid-way
        if not state.capture_at or state.capture_at[0] != num_computed:
            return
        p = state.capture_at.pop(0)
        nfull = p // self.bs
        for i in range(nfull):
            self.pool.register(request.block_ids[i], state.names[i])
        partial = p % self.bs  # rows of the last, partial block
        snap = Snapshot(
            p,
            self.cache.read_window(request.scheduled_slot, p),
            self.cache.read_rows(request.block_ids[nfull], partial)
            if partial
            else self._empty_partial(),
        )
        self.snapshots.put(state.keys[p], snap, snap.nbytes)
        if self.redis is not None:
            blocks = [i for i in range(nfull) if i not in state.redis_blocks]
            self._publish(request, p, snap, blocks=blocks, pinned=state.pinned)

    def _empty_partial(self) -> torch.Tensor:
        cfg = self.cache.cfg
        shape = (2, len(self.cache.global_layers), 0, cfg.num_key_value_heads, cfg.head_dim)
        return torch.empty(shape, dtype=self.dtype)

    # ---- Redis ---------------------------------------------------------------------------------
    def _publish_missing(self, request: Request, lookup: Lookup, found) -> None:
        """Boundaries this request resumes past (or pins) that Redis lacks: send them from here
        (a replica that hits locally after Redis lost its copy writes it back)."""
        state = request.prefix
        if self.redis is None or found is None:
            return
        p, run, _, snap, source = found
        if source == "redis" and state.pinned:
            keys = [self.redis.window_key(state.keys[p])]
            keys += [self.redis.block_key(n) for n in state.names[: p // self.bs]]
            self.redis.writes.submit(self._quietly, self.redis.persist, keys)
        if source == "local" and (state.pinned or p not in lookup.windows_present):
            missing = [i for i in range(p // self.bs) if i not in state.redis_blocks]
            ids = [self.pool.lookup(state.names[i]) for i in missing]
            self._publish(request, p, snap, blocks=missing, pinned=state.pinned, block_ids=ids)

    def _publish(
        self, request: Request, p: int, snap: Snapshot, blocks, pinned: bool, block_ids=None
    ) -> None:
        """Copy what Redis needs now to the host (the blocks may be reused later); encode and
        send it on the write thread. Each block goes once per request; nothing is queued past
        ``redis_queue_bytes`` (the write is dropped and counted)."""
        state = request.prefix
        ids = block_ids or [request.block_ids[i] for i in blocks]
        size = snap.nbytes + len(blocks) * self._block_nbytes
        with self._queue_lock:
            if self._queued_bytes + size > self.config.redis_queue_bytes:
                self.num_writes_dropped += 1
                return
            self._queued_bytes += size
        state.redis_blocks.update(blocks)
        data = [
            (state.names[i], self.cache.read_rows(b, self.bs).cpu())
            for i, b in zip(blocks, ids, strict=True)
        ]
        snap = Snapshot(snap.num_tokens, snap.sliding.cpu(), snap.partial.cpu())
        window_name = state.keys[p]
        gl, sl = self.cache.global_layers, self.cache.sliding_layers
        redis = self._tier()

        def send():
            try:
                items = [
                    (
                        redis.block_key(name),
                        fmt.encode(fmt.KIND_BLOCK, self.bs, [fmt.Section(fmt.GLOBAL, gl, t)]),
                    )
                    for name, t in data
                ]
                window = fmt.encode(
                    fmt.KIND_WINDOW,
                    p,
                    [
                        fmt.Section(fmt.SLIDING, sl, snap.sliding),
                        fmt.Section(fmt.PARTIAL, gl, snap.partial),
                    ],
                )
                # Blocks first: a reader that sees the window finds its blocks.
                redis.put_many(items, pinned=pinned)
                redis.put_many([(redis.window_key(window_name), window)], pinned=pinned)
            finally:  # sent, failed or not even encoded: no longer queued
                with self._queue_lock:
                    self._queued_bytes -= size

        redis.writes.submit(self._quietly, send)

    def _tier(self) -> RedisTier:
        """The Redis tier, for the methods that run only with one."""
        if self.redis is None:
            raise RuntimeError("the prefix cache has no Redis tier")
        return self.redis

    @staticmethod
    def _quietly(fn, *args) -> None:
        with contextlib.suppress(RedisUnavailable):  # counted by the tier; an entry is lost
            fn(*args)

    def _redis_lookup(self, state: PrefixState, local_best: int, local_run: int) -> Lookup:
        """Read thread: which keys exist, then the longest hit beyond local_best."""
        redis, out = self._tier(), Lookup()
        bounds = sorted(state.keys)
        try:
            present = redis.exists(
                [redis.window_key(state.keys[p]) for p in bounds]
                + [redis.block_key(n) for n in state.names]
            )
        except RedisUnavailable:
            return out
        out.windows_present = {p for p, ok in zip(bounds, present, strict=False) if ok}
        out.blocks_present = {i for i, ok in enumerate(present[len(bounds) :]) if ok}
        for p in state.usable:
            if p <= local_best:
                break
            nfull = p // self.bs
            need = range(min(local_run, nfull), nfull)
            if p not in out.windows_present or any(i not in out.blocks_present for i in need):
                continue
            try:
                got = self._fetch(state, p, need, out)
            except RedisUnavailable:
                return out
            if got is not None:
                out.hit, out.fetched = got
                out.fetched_from = need.start
                return out
        return out

    def _fetch(self, state: PrefixState, p: int, need: range, out: Lookup):
        """Values of the window at p and blocks ``need``, all checked; a corrupt one is deleted
        (and counted as absent, so this request's capture writes it again)."""
        redis = self._tier()
        keys = [redis.window_key(state.keys[p])] + [redis.block_key(state.names[i]) for i in need]
        values = [v for v in redis.get_many(keys) if v is not None]
        if len(values) < len(keys):
            return None  # evicted between EXISTS and GET: a miss
        snap, fetched, corrupt = None, {}, False
        try:
            payload = redis.open(keys[0], values[0])
            num, win = fmt.decode(payload, fmt.KIND_WINDOW, self.dtype, self._expect_window)
            n_rows = len(self.cache.ring_rows(p))
            if (
                num != p
                or win[fmt.SLIDING].shape[2] != n_rows
                or win[fmt.PARTIAL].shape[2] != (p % self.bs)
            ):
                raise fmt.CorruptValueError(f"window for position {p} has the wrong size")
            snap = Snapshot(p, win[fmt.SLIDING], win[fmt.PARTIAL])
        except fmt.CorruptValueError:
            redis.discard_corrupt(keys[0])
            out.windows_present.discard(p)
            corrupt = True
        for i, key, value in zip(need, keys[1:], values[1:], strict=True):
            try:
                payload = redis.open(key, value)
                _, sec = fmt.decode(payload, fmt.KIND_BLOCK, self.dtype, self._expect_block)
                fetched[i] = sec[fmt.GLOBAL]
            except fmt.CorruptValueError:
                redis.discard_corrupt(key)
                out.blocks_present.discard(i)
                corrupt = True
        if corrupt:
            return None
        redis.refresh(keys)
        return snap, fetched

    # ---- pinning and stats ---------------------------------------------------------------------
    def pin(self, token_ids: list[int]) -> None:
        """Keep a snapshot at the end of this prefix for every prompt that starts with it."""
        if token_ids not in self.pinned:
            self.pinned.append(list(token_ids))

    def stats(self) -> PrefixCacheStats:
        tier = self.redis.snapshot_stats() if self.redis is not None else None
        return PrefixCacheStats(
            num_lookups=self.num_lookups,
            num_local_hits=self.num_local_hits,
            num_redis_hits=self.num_redis_hits,
            num_misses=self.num_misses,
            num_cached_tokens=self.num_cached_tokens,
            num_cached_blocks=self.pool.num_cached,
            num_snapshots=len(self.snapshots),
            snapshot_bytes=self.snapshots.num_bytes,
            redis_available=bool(tier and tier.available),
            redis_bytes_read=tier.bytes_read if tier else 0,
            redis_bytes_written=tier.bytes_written if tier else 0,
            num_redis_errors=tier.num_errors if tier else 0,
            num_corrupt_values=tier.num_corrupt if tier else 0,
            num_redis_writes_dropped=self.num_writes_dropped,
            redis_queue_bytes=self._queued_bytes,
        )

    def wait_writes(self, timeout_s: float = 10.0) -> None:
        """Until the writes queued so far have been sent (tests, shutdown)."""
        if self.redis is not None:
            self.redis.writes.submit(lambda: None).result(timeout=timeout_s)

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
