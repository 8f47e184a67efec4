"""Local prefix cache bookkeeping: hash chains, shared KV blocks, window snapshots. Pure Python.

A prompt's full blocks are named by a hash chain: ``h_i = H(h_{i-1} | tokens of block i)``, with
``h_0 = H(model fingerprint | block size)``, so equal names mean equal prefixes on the same
model. The hybrid model needs two things to resume a prefix of P tokens (design.md decision 6):
the global layers' K/V of every position < P (shared blocks, plus the rows of the last partial
block) and each sliding layer's last window at P. The second is a *snapshot*, taken only at
reuse boundaries and named ``boundary_key(h_{P // bs}, tokens of the partial block)``.

``PrefixBlockPool`` is a drop-in for ``BlockPool``: blocks are reference-counted; a cached
block nobody uses sits in an LRU and is evicted (its name forgotten) only when a fresh block is
needed. ``SnapshotCache`` holds snapshots (opaque payloads with a byte size) under a byte bound.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from replicas.engine.block_pool import BlockPool

HASH_BYTES = 16


def _h(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    for p in parts:
        h.update(p)
    return h.digest()


def _tokens(tokens: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}I", *tokens)


def chain_root(fingerprint: str, block_size: int) -> bytes:
    return _h(b"exaone-prefix-v1|", fingerprint.encode(), struct.pack("<I", block_size))


def block_hashes(root: bytes, tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Names of the full blocks of ``tokens``: [h_1, ..., h_n], n = len // block_size."""
    out, parent = [], root
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = _h(parent, _tokens(tokens[start : start + block_size]))
        out.append(parent)
    return out


def boundary_key(
    root: bytes, hashes: Sequence[bytes], tokens: Sequence[int], num_tokens: int, block_size: int
) -> bytes:
    """Name of the snapshot after the first ``num_tokens`` tokens (``hashes``: block_hashes
    of at least num_tokens // block_size blocks)."""
    full = num_tokens // block_size
    parent = hashes[full - 1] if full else root
    return _h(b"window|", parent, _tokens(tokens[full * block_size : num_tokens]))


class PrefixBlockPool(BlockPool):
    """BlockPool with shared, named blocks. ``allocate`` hands out fresh blocks (evicting the
    least recently released cached block when no unnamed block is free); ``free`` drops one
    reference; ``acquire`` takes a reference on a cached block."""

    def __init__(self, num: int):
        super().__init__(num)
        self._refs = [0] * num
        self._name_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unused named blocks, LRU first
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds (cached blocks nobody uses count as free)."""
        return self.num_total - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} ids, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._block_of[self._name_of.pop(b)]
                self.num_evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, ids: Sequence[int]) -> None:
        for b in ids:
            self._refs[b] -= 1
            if self._refs[b] > 0:
                continue
            if self._refs[b] < 0:
                raise RuntimeError(f"block {b} freed more often than taken")
            if b in self._name_of:
                self._evictable[b] = None
            else:
                self._free.append(b)

    def lookup(self, name: bytes) -> int | None:
        return self._block_of.get(name)

    def acquire(self, name: bytes) -> int | None:
        """A reference on the cached block named ``name``, or None if it is not here."""
        b = self._block_of.get(name)
        if b is None:
            return None
        self._evictable.pop(b, None)
        self._refs[b] += 1
        return b

    def register(self, block: int, name: bytes) -> bool:
        """Name a block whose contents are final. False if another block has the name (the
        block stays private and returns to the free list when released)."""
        if name in self._block_of or block in self._name_of:
            return self._block_of.get(name) == block
        self._block_of[name] = block
        self._name_of[block] = name
        return True

    def cached_run(self, names: Iterable[bytes]) -> int:
        """How many of ``names``, from the first, are cached here."""
        n = 0
        for name in names:
            if name not in self._block_of:
                break
            n += 1
        return n


class SnapshotCache:
    """Window snapshots by boundary key, LRU under ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self.num_bytes = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: bytes, value: Any, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.num_bytes -= old[1]
        self._items[key] = (value, nbytes)
        self.num_bytes += nbytes
        while self.num_bytes > self.max_bytes:
            _, (_, size) = self._items.popitem(last=False)
            self.num_bytes -= size
