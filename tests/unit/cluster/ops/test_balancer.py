"""The expert balancer's policy (cluster/ops/balancer.py): known answers and invariants."""

from __future__ import annotations

import random

import pytest

from cluster.ops.balancer import balance, group_loads, imbalance, pack, replicate


def test_spare_slots_go_to_the_most_loaded_expert_per_copy():
    assert replicate([10, 1, 1, 1], 6, 4) == [3, 1, 1, 1]  # 10 -> 5 -> 3.3 per copy
    assert replicate([10, 6, 1, 1], 6, 4) == [2, 2, 1, 1]  # 10 > 6, then 6 > 5
    assert replicate([1, 1, 1], 3, 4) == [1, 1, 1]
    assert replicate([100, 1], 10, 2) == [2, 2]  # capped at one copy per group
    with pytest.raises(ValueError, match="cannot hold"):
        replicate([1, 1, 1], 2, 2)


def test_packing_puts_the_heaviest_copies_on_the_lightest_groups():
    assert pack([8, 4, 2, 2], [1, 1, 1, 1], 2, 2) == ((0, 3), (1, 2))
    assert group_loads(((0, 3), (1, 2)), [8, 4, 2, 2]) == [10, 6]
    # A hot expert's two copies land in different groups and split its load.
    assert pack([12, 2, 2, 2, 2, 2, 2], [2, 1, 1, 1, 1, 1, 1], 2, 4) == ((0, 1, 3, 5), (0, 2, 4, 6))


def test_packing_makes_room_when_only_groups_holding_the_expert_have_slots():
    # e0 fills group 0's weight, e1..e3 fill group 1; e4's second copy then has room only in
    # group 0, which holds its first: one of group 1's experts moves over.
    holdings = pack([100, 1, 1, 1, 1], [1, 1, 1, 1, 2], 2, 3)
    assert holdings == ((0, 1, 4), (2, 3, 4))


def test_packing_refuses_what_cannot_fit():
    with pytest.raises(ValueError, match="do not fit"):
        pack([1] * 5, [1] * 5, 2, 2)
    with pytest.raises(ValueError, match="copies but there are 2 groups"):
        pack([1, 1], [3, 1], 2, 4)


def _zipf(num_experts: int, rng: random.Random, s: float = 1.2) -> list[float]:
    ranks = list(range(1, num_experts + 1))
    rng.shuffle(ranks)
    return [1000.0 / r**s for r in ranks]


@pytest.mark.parametrize(
    "num_experts,num_groups,spare", [(16, 2, 0), (16, 4, 1), (64, 4, 2), (128, 8, 2), (12, 3, 1)]
)
def test_invariants_on_skewed_loads(num_experts, num_groups, spare):
    rng = random.Random(num_experts * 31 + num_groups)
    load = [_zipf(num_experts, rng) for _ in range(3)]
    slots = -(-num_experts // num_groups) + spare
    layers = balance(load, num_groups, slots)
    contiguous = tuple(
        tuple(range(g * num_experts // num_groups, (g + 1) * num_experts // num_groups))
        for g in range(num_groups)
    )
    for holdings, layer_load in zip(layers, load, strict=True):
        assert len(holdings) == num_groups
        assert all(len(ids) <= slots and list(ids) == sorted(set(ids)) for ids in holdings)
        copies = [sum(e in ids for ids in holdings) for e in range(num_experts)]
        assert min(copies) >= 1  # every expert placed
        assert sum(copies) == min(num_groups * slots, num_experts * num_groups)
        hot = sorted(range(num_experts), key=lambda e: -layer_load[e])
        assert all(copies[a] >= copies[b] for a, b in zip(hot, hot[1:], strict=False))
        assert sum(group_loads(holdings, layer_load)) == pytest.approx(sum(layer_load))
    before = imbalance([contiguous] * 3, load)
    after = imbalance(layers, load)
    assert after <= before
    if spare:
        assert after < 1.25 < before, (before, after)


def test_imbalance_is_busiest_over_mean_summed_over_layers():
    holdings = ((0,), (1,))
    assert imbalance([holdings], [[3, 1]]) == pytest.approx(3 / 2)
    assert imbalance([holdings, holdings], [[3, 1], [1, 1]]) == pytest.approx((3 + 1) / (2 + 1))
    assert imbalance([holdings], [[0, 0]]) == 1.0
    assert imbalance([((0,), (0, 1))], [[4, 2]]) == pytest.approx(4 / 3)  # e0 split 2 + 2
