"""Which attention replica gets a request: prefix affinity, bounded by load. Pure policy.

Requests whose prompts share their leading ``num_blocks`` KV blocks hash to the same replica
(rendezvous hashing, so adding or losing a replica moves only that replica's share), where that
replica's local prefix cache can hit. Affinity gives way when the preferred replica holds more
than ``max_imbalance`` requests above the least loaded one.
``cluster.deployments.request_router`` applies it as a Ray Serve request router.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

Key = bytes


def prefix_key(prompt_ids: Sequence[int], block_size: int, num_blocks: int) -> Key | None:
    """Digest of the first ``num_blocks`` full blocks (fewer if the prompt is shorter); None
    when the prompt has no full block or affinity is off (``num_blocks`` 0)."""
    n = min(len(prompt_ids) // block_size, num_blocks) * block_size
    if n == 0:
        return None
    data = b"".join(int(t).to_bytes(4, "little", signed=False) for t in prompt_ids[:n])
    return hashlib.blake2b(data, digest_size=16).digest()


def _score(key: Key, replica: str) -> bytes:
    return hashlib.blake2b(key + replica.encode(), digest_size=8).digest()


def rank_replicas(
    key: Key | None, loads: Mapping[str, int | None], max_imbalance: int, salt: bytes = b""
) -> list[str]:
    """Replica ids, best first. ``loads``: requests each replica holds (None: unknown, counted
    as the least). Without a key, or when the preferred replica is too busy: least loaded first,
    ties broken by a hash of ``salt`` (pass something per request, e.g. its id, to spread)."""
    known = [v for v in loads.values() if v is not None]
    least = min(known, default=0)
    load = {r: least if v is None else v for r, v in loads.items()}
    by_load = sorted(load, key=lambda r: (load[r], _score(salt, r)))
    if key is None or not by_load:
        return by_load
    preferred = max(load, key=lambda r: _score(key, r))
    if load[preferred] - least > max_imbalance:
        return by_load
    return [preferred] + [r for r in by_load if r != preferred]
