"""Prefix cache pieces without Redis: hash chain, shared block pool, snapshot LRU, value format,
scheduler cuts, and the local tier end to end in one engine."""

from __future__ import annotations

import random

import pytest
import torch

from cluster.bundled.presets import PRESETS
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.model.config import ModelConfig
from replicas.prefix_cache import kv_format as fmt
from replicas.prefix_cache.blocks import (
    PrefixBlockPool,
    SnapshotCache,
    block_hashes,
    boundary_key,
    chain_root,
)
from replicas.prefix_cache.manager import PrefixCacheConfig
from replicas.prefix_cache.types import stored_bytes_per_token
from replicas.sampling_params import SamplingParams

KV = 32 << 20  # KV pool bytes per engine (the 1 GiB default, times many engines, adds up)


def test_hash_chain_names_prefixes_not_blocks():
    root = chain_root("model-a", 4)
    a = block_hashes(root, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = block_hashes(root, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    c = block_hashes(root, [9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a == b  # the partial block has no name
    assert c[1] != a[1]  # same block tokens, different parent
    assert block_hashes(chain_root("model-b", 4), [1, 2, 3, 4], 4)[0] != a[0]
    assert block_hashes(chain_root("model-a", 2), [1, 2, 3, 4], 4)[0] != a[0]
    # Window names: aligned and inside a block, distinct by their partial tokens.
    toks = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    names = block_hashes(root, toks, 4)
    keys = {p: boundary_key(root, names, toks, p, 4) for p in range(1, 11)}
    assert len(set(keys.values())) == 10
    other = [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]
    assert boundary_key(root, block_hashes(root, other, 4), other, 9, 4) == keys[9]
    assert boundary_key(root, block_hashes(root, other, 4), other, 10, 4) != keys[10]


def test_pool_shares_named_blocks_and_evicts_least_recently_released():
    pool = PrefixBlockPool(4)
    a, b = pool.allocate(2)
    assert pool.register(a, b"A") and pool.register(b, b"B")
    assert not pool.register(pool.allocate(1)[0], b"A")  # the name is taken: stays private
    assert pool.num_free == 1
    assert pool.acquire(b"A") == a  # a second reference
    pool.free([a])
    assert pool.num_free == 1  # still referenced once
    pool.free([a, b])  # a released before b: a is evicted first
    assert pool.num_free == 3 and pool.num_cached == 2
    assert pool.cached_run([b"A", b"B", b"C"]) == 2
    got = pool.allocate(2)  # the one unnamed free block, then evict a
    assert a in got and pool.lookup(b"A") is None and pool.lookup(b"B") == b
    assert pool.num_evictions == 1
    assert pool.acquire(b"B") == b and pool.num_free == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([b])


def test_snapshot_cache_is_lru_under_a_byte_bound():
    cache = SnapshotCache(100)
    cache.put(b"a", "A", 40)
    cache.put(b"b", "B", 40)
    assert cache.get(b"a") == "A"  # a is now the most recent
    cache.put(b"c", "C", 40)  # evicts b
    assert b"b" not in cache and cache.get(b"a") == "A" and cache.num_bytes == 80
    cache.put(b"huge", "H", 101)  # larger than the bound: not kept
    assert b"huge" not in cache


def _window_value(dtype=torch.bfloat16):
    sliding = torch.randn(2, 3, 7, 2, 4).to(dtype)
    partial = torch.randn(2, 1, 5, 2, 4).to(dtype)
    value = fmt.encode(
        fmt.KIND_WINDOW,
        21,
        [
            fmt.Section(fmt.SLIDING, (0, 1, 2), sliding),
            fmt.Section(fmt.PARTIAL, (3,), partial),
        ],
    )
    expect = {fmt.SLIDING: ((0, 1, 2), (2, 3, -1, 2, 4)), fmt.PARTIAL: ((3,), (2, 1, -1, 2, 4))}
    return value, expect, sliding, partial


def test_value_format_round_trip_is_exact():
    value, expect, sliding, partial = _window_value()
    num, got = fmt.decode(value, fmt.KIND_WINDOW, torch.bfloat16, expect)
    assert num == 21
    assert torch.equal(got[fmt.SLIDING], sliding) and torch.equal(got[fmt.PARTIAL], partial)
    assert value[:4] == b"EXKV" and b"pickle" not in value


@pytest.mark.parametrize("damage", ["flip", "truncate", "dtype", "layers", "kind", "short"])
def test_value_format_rejects_damaged_or_foreign_values(damage):
    value, expect, _, _ = _window_value()
    kind, dtype = fmt.KIND_WINDOW, torch.bfloat16
    if damage == "flip":
        value = value[:100] + bytes([value[100] ^ 0x10]) + value[101:]
    elif damage == "truncate":
        value = value[: len(value) // 2]
    elif damage == "dtype":
        dtype = torch.float16
    elif damage == "layers":
        expect = {**expect, fmt.PARTIAL: ((7,), (2, 1, -1, 2, 4))}
    elif damage == "kind":
        kind = fmt.KIND_BLOCK
    else:
        value = value[:10]
    with pytest.raises(fmt.CorruptValueError):
        fmt.decode(value, kind, dtype, expect)


def test_stored_bytes_per_token_k_exaone_against_all_layers(report):
    """By arithmetic from the layout code: global-layer blocks + one window snapshot."""
    cfg = ModelConfig.from_hf(PRESETS["k-exaone"])
    ours, every = stored_bytes_per_token(cfg, 2048, 16)  # bf16
    # 12 global layers x 2 x 8 heads x 128 x 2 bytes = 48 KiB per token; the window is
    # 36 sliding layers x 127 rows x 4 KiB; every layer: 48 x 4 KiB = 192 KiB per token.
    window = 36 * 127 * 4096
    assert ours == (2048 * 48 * 1024 + window) / 2048
    assert every == 192 * 1024
    assert every / ours > 3
    report(
        f"k-exaone, 2048-token prefix, bf16: {ours / 1024:.1f} KiB/token stored vs "
        f"{every / 1024:.0f} KiB/token for all layers ({every / ours:.2f}x less)"
    )


def _prompts(prefix_len: int, n: int, seed: int = 0):
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 1000) for _ in range(prefix_len)]
    return prefix, [
        prefix + [rng.randrange(1, 1000) for _ in range(rng.randrange(2, 30))] for _ in range(n)
    ]


def test_scheduler_ends_chunks_on_boundaries_and_local_hits_match(tiny_model):
    """Boundaries cut chunks; the second prompt resumes at the hinted boundary (45: inside a
    block, past the sliding window of 8) and greedy outputs equal a cache-less engine."""
    prefix, prompts = _prompts(45, 5)
    params = SamplingParams(
        temperature=0.0, max_tokens=10, ignore_eos=True, prefix_boundaries=(45,)
    )
    ref = LLMEngine(tiny_model, EngineConfig(max_num_batched_tokens=64, kv_cache_bytes=KV))
    want = [ref.generate([p], params)[0] for p in prompts]
    cfg = EngineConfig(
        max_num_batched_tokens=64, kv_cache_bytes=KV, prefix_cache=PrefixCacheConfig("t", 16)
    )
    engine = LLMEngine(tiny_model, cfg)
    cuts = []
    schedule = engine.scheduler.schedule

    def spy():
        plan = schedule()
        cuts.extend((c.start, c.start + c.num_new) for c in plan.chunks if c.num_new > 1)
        return plan

    engine.scheduler.schedule = spy
    assert engine.generate([prompts[0]], params)[0] == want[0]
    assert [end for _, end in cuts] == [16, 32, 45, 48, len(prompts[0])][: len(cuts)]
    got = [engine.generate([p], params)[0] for p in prompts[1:]]
    assert got == want[1:]
    stats = engine.prefix.stats()
    assert stats.num_local_hits == 4 and stats.num_cached_tokens >= 4 * 45
    # Outputs report the cached prompt tokens.
    engine.add_request("x", prompts[1], params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[0].num_cached_tokens >= 45


def test_batched_hits_and_preemption_keep_outputs(tiny_model):
    """Many requests sharing a prefix at once, in a cache small enough to preempt and evict."""
    _, prompts = _prompts(40, 12, seed=3)
    params = SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, prefix_boundaries=(40,)
    )
    want = LLMEngine(tiny_model, EngineConfig(kv_cache_bytes=KV)).generate(prompts, params)
    cfg = EngineConfig(
        max_num_batched_tokens=96,
        num_blocks=14,
        block_size=8,
        prefix_cache=PrefixCacheConfig("t", 0),
    )
    engine = LLMEngine(tiny_model, cfg)
    assert engine.generate(prompts[:1], params) == want[:1]
    assert engine.generate(prompts, params) == want
    assert engine.prefix.stats().num_local_hits > 0
    # Another prefix needs the blocks: the first prefix's unused blocks are evicted, and its
    # prompts are then computed again with unchanged outputs.
    _, others = _prompts(40, 3, seed=4)
    assert engine.generate(others, params) == LLMEngine(
        tiny_model, EngineConfig(kv_cache_bytes=KV)
    ).generate(others, params)
    assert engine.cache.blocks.num_evictions > 0
    assert engine.generate(prompts[:2], params) == want[:2]
    assert engine.num_blocks_in_use == 0
