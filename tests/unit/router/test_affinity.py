"""router.affinity: prefix keys and replica ranking (pure)."""

from __future__ import annotations

from router.affinity import prefix_key, rank_replicas

REPLICAS = ["r-a", "r-b", "r-c", "r-d"]


def test_prefix_key_covers_only_leading_full_blocks():
    base = list(range(100, 140))  # 40 tokens: 2 full blocks of 16
    assert prefix_key(base, 16, 4) == prefix_key(base[:32] + [7, 8, 9], 16, 4)
    assert prefix_key(base, 16, 1) == prefix_key(base[:16] + [1] * 30, 16, 1)
    assert prefix_key(base, 16, 4) != prefix_key([99] + base[1:], 16, 4)
    assert prefix_key(base[:15], 16, 4) is None  # no full block
    assert prefix_key(base, 16, 0) is None  # affinity off


def test_same_prefix_same_replica_and_spread_over_replicas():
    loads = dict.fromkeys(REPLICAS, 0)
    chosen = {}
    for i in range(64):
        prefix = [i] * 16
        first = rank_replicas(prefix_key(prefix + [1, 2], 16, 4), loads, 8)[0]
        again = rank_replicas(prefix_key(prefix + [3, 4, 5], 16, 4), loads, 8)[0]
        assert first == again
        chosen[i] = first
    assert set(chosen.values()) == set(REPLICAS)  # 64 prefixes land on every replica


def test_rendezvous_moves_only_the_lost_replicas_share():
    loads = dict.fromkeys(REPLICAS, 0)
    fewer = dict.fromkeys(REPLICAS[:3], 0)
    for i in range(64):
        key = prefix_key([i] * 16, 16, 1)
        before = rank_replicas(key, loads, 8)[0]
        after = rank_replicas(key, fewer, 8)[0]
        if before != "r-d":
            assert after == before


def test_busy_preferred_replica_gives_way_to_least_loaded():
    key = prefix_key([5] * 16, 16, 1)
    idle = dict.fromkeys(REPLICAS, 0)
    preferred = rank_replicas(key, idle, 8)[0]
    busy = {**idle, preferred: 9}
    assert rank_replicas(key, busy, 8)[0] != preferred
    assert rank_replicas(key, {**idle, preferred: 8}, 8)[0] == preferred  # within the bound
    ranked = rank_replicas(key, {**busy, "r-a" if preferred != "r-a" else "r-b": 3}, 8)
    assert ranked[-1] == preferred  # most loaded last


def test_no_key_or_unknown_loads_go_least_loaded_first():
    loads = {"r-a": 3, "r-b": 1, "r-c": None, "r-d": 2}
    assert rank_replicas(None, loads, 8)[2:] == ["r-d", "r-a"]
    assert set(rank_replicas(None, loads, 8)[:2]) == {"r-b", "r-c"}  # 1, and unknown -> 1
    assert rank_replicas(None, {}, 8) == []
    idle = dict.fromkeys(REPLICAS, 0)
    firsts = {rank_replicas(None, idle, 8, salt=str(i).encode())[0] for i in range(64)}
    assert firsts == set(REPLICAS)  # ties spread by the per-request salt
