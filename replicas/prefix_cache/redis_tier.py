"""The Redis tier of the prefix cache: shared by every attention replica, never required.

Blocking redis-py calls run on two background threads (one for lookups, one for writes), so the
engine's step never waits on the network. Keys are ``{namespace}:b:{hash}`` (one full block's
global-layer K/V) and ``{namespace}:w:{hash}`` (a window snapshot); the namespace carries the
model fingerprint. Unpinned keys are written with ``SET NX EX ttl``; pinned ones with a plain
``SET`` (no TTL, which also clears a TTL an unpinned write gave the same key). A hit refreshes
the TTL of the keys it read, except pinned ones. With ``maxmemory-policy volatile-lru`` Redis
evicts only keys that have a TTL, so pinned prompts stay until deleted.

Any Redis trouble counts as an error and the lookup is a miss (or the write is dropped); after
a connection error the tier stays quiet for ``retry_interval_s`` and then tries again, so a
dead server costs one timeout, not one per request.

Every value is sealed with a keyed MAC (BLAKE2b-256 over the Redis key and the value, keyed by
a secret every replica shares: ``EXAONE_PREFIX_CACHE_KEY``). Whoever can write to Redis without
the secret cannot plant K/V state that changes other callers' outputs: a value whose MAC does
not verify is counted, deleted and recomputed like a corrupt one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis
from redis import exceptions as redis_errors

from replicas.prefix_cache.kv_format import CorruptValueError

log = logging.getLogger(__name__)

MAC_KEY_ENV = "EXAONE_PREFIX_CACHE_KEY"
REDIS_PASSWORD_ENV = "EXAONE_REDIS_PASSWORD"  # when prefix_cache.redis_password is not set
MAC_BYTES = 32

# Extend the TTL of keys that have one (pinned keys have none and keep none).
_REFRESH = """
for i, key in ipairs(KEYS) do
  if redis.call('TTL', key) > 0 then redis.call('EXPIRE', key, ARGV[1]) end
end
return 0
"""


@dataclass
class RedisTierStats:
    num_reads: int = 0
    num_writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    num_errors: int = 0
    """Failed Redis calls (connection, timeout, out of memory) and corrupt values."""
    num_corrupt: int = 0
    """Values that failed their MAC, checksum or shape checks (ignored, deleted, recomputed)."""
    available: bool = True


class RedisUnavailable(Exception):
    """The tier is in its quiet period after a connection error."""


class RedisTier:
    def __init__(
        self,
        url: str,
        namespace: str,
        mac_key: str | bytes,
        ttl_s: int = 3600,
        password: str | None = None,
        ssl_ca_certs: str | None = None,
        timeout_s: float = 1.0,
        retry_interval_s: float = 1.0,
    ):
        """``mac_key``: the secret every replica sharing this Redis seals its values with (any
        non-empty string; replicas with another key read each other's values as corrupt)."""
        if not mac_key:
            raise ValueError(
                f"the Redis tier needs a MAC key: set {MAC_KEY_ENV} to a secret "
                "shared by every attention replica"
            )
        secret = mac_key.encode() if isinstance(mac_key, str) else bytes(mac_key)
        self._mac_key = hashlib.sha256(b"exaone-prefix-cache-mac\0" + secret).digest()
        kwargs: dict[str, float | str] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
        }
        if password is not None:
            kwargs["password"] = password
        if ssl_ca_certs is not None:
            kwargs["ssl_ca_certs"] = ssl_ca_certs
        self.client = redis.Redis.from_url(url, **kwargs)
        self.namespace, self.ttl_s = namespace, int(ttl_s)
        self.retry_interval_s = retry_interval_s
        self.stats = RedisTierStats()
        self._lock = threading.Lock()
        self._quiet_until = 0.0
        self._refresh = self.client.register_script(_REFRESH)
        self.reads = ThreadPoolExecutor(1, thread_name_prefix="prefix-redis-read")
        self.writes = ThreadPoolExecutor(1, thread_name_prefix="prefix-redis-write")

    def block_key(self, name: bytes) -> str:
        return f"{self.namespace}:b:{name.hex()}"

    def window_key(self, name: bytes) -> str:
        return f"{self.namespace}:w:{name.hex()}"

    # ---- sealing -------------------------------------------------------------------------------
    def _mac(self, key: str, payload: bytes) -> bytes:
        h = hashlib.blake2b(key=self._mac_key, digest_size=MAC_BYTES)
        name = key.encode()
        h.update(len(name).to_bytes(4, "little") + name)  # a value is bound to its key
        h.update(payload)
        return h.digest()

    def seal(self, key: str, payload: bytes) -> bytes:
        """What is stored at ``key``: the MAC, then the payload."""
        return self._mac(key, payload) + payload

    def open(self, key: str, value: bytes) -> bytes:
        """The payload of a value read at ``key``; CorruptValueError if its MAC does not verify
        (written without the secret, moved from another key, or damaged)."""
        mac, payload = value[:MAC_BYTES], value[MAC_BYTES:]
        if len(mac) != MAC_BYTES or not hmac.compare_digest(mac, self._mac(key, payload)):
            raise CorruptValueError(f"value at {key} fails its MAC")
        return payload

    # ---- calls (run them on self.reads / self.writes) ------------------------------------------
    def _call(self, fn):
        if time.monotonic() < self._quiet_until:
            raise RedisUnavailable("redis tier resting after an error")
        try:
            out = fn()
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as e:
            with self._lock:
                self.stats.num_errors += 1
                self.stats.available = False
            self._quiet_until = time.monotonic() + self.retry_interval_s
            log.warning("prefix cache: redis unreachable (%s); serving without it", e)
            raise RedisUnavailable(str(e)) from e
        except redis_errors.RedisError as e:
            with self._lock:
                self.stats.num_errors += 1
            log.warning("prefix cache: redis error (%s)", e)
            raise RedisUnavailable(str(e)) from e
        with self._lock:
            self.stats.available = True
        return out

    def exists(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []

        def run():
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(k)
            return [bool(x) for x in pipe.execute()]

        return self._call(run)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        values = self._call(lambda: self.client.mget(keys))
        with self._lock:
            self.stats.num_reads += len(keys)
            self.stats.bytes_read += sum(len(v) for v in values if v is not None)
        return values

    def refresh(self, keys: Sequence[str]) -> None:
        if keys:
            self._call(lambda: self._refresh(keys=list(keys), args=[self.ttl_s]))

    def put_many(self, items: Sequence[tuple[str, bytes]], pinned: bool = False) -> None:
        """One SET per key (each value lands whole or not at all), sealed."""
        if not items:
            return
        items = [(key, self.seal(key, payload)) for key, payload in items]

        def run():
            pipe = self.client.pipeline(transaction=False)
            for key, value in items:
                if pinned:
                    pipe.set(key, value)
                else:
                    pipe.set(key, value, nx=True, ex=self.ttl_s)
            return pipe.execute(raise_on_error=True)

        self._call(run)
        with self._lock:
            self.stats.num_writes += len(items)
            self.stats.bytes_written += sum(len(v) for _, v in items)

    def persist(self, keys: Sequence[str]) -> None:
        """Drop the TTL of keys (pinning what an unpinned write stored)."""

        def run():
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.persist(k)
            return pipe.execute()

        self._call(run)

    def discard_corrupt(self, key: str) -> None:
        with self._lock:
            self.stats.num_errors += 1
            self.stats.num_corrupt += 1
        log.warning("prefix cache: corrupt value at %s ignored and deleted", key)
        with contextlib.suppress(RedisUnavailable):
            self._call(lambda: self.client.delete(key))

    def snapshot_stats(self) -> RedisTierStats:
        with self._lock:
            return dataclasses.replace(self.stats)

    def close(self) -> None:
        self.reads.shutdown(wait=True, cancel_futures=True)
        self.writes.shutdown(wait=True, cancel_futures=True)
        self.client.close()
