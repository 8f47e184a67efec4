"""Live rebalancing phases (cluster/ops/rebalancer.py), driven by fake replica reports."""

from __future__ import annotations

from cluster.ops.rebalancer import RebalanceConfig, Rebalancer
from replicas.experts.placement import ExpertMap, ExpertPlacement

LAYERS = (1, 2)
CONFIG = RebalanceConfig(
    threshold=1.2, min_gain=0.05, redundant_slots=1, min_interval_s=30, stale_s=10, min_tokens=100
)


def _rebalancer() -> Rebalancer:
    return Rebalancer(ExpertMap.of(ExpertPlacement.contiguous(8, 2)), LAYERS, CONFIG)


def _hot(scale: int = 100) -> dict[int, list[int]]:
    """Experts 0 and 1 (both in group 0) get almost every slot."""
    return {layer: [scale, scale, 1, 1, 1, 1, 1, 1] for layer in LAYERS}


def _even(scale: int = 100) -> dict[int, list[int]]:
    return {layer: [scale] * 8 for layer in LAYERS}


def test_no_rebalance_without_enough_load_or_when_balanced():
    r = _rebalancer()
    r.expert_report("a", 0, 0, _hot(scale=10), now=0.0)  # 88 slots: below min_tokens
    assert r.phase == "idle"
    r.expert_report("a", 0, 0, {layer: [100] * 4 + [0] * 4 for layer in LAYERS}, now=1.0)
    r.expert_report("b", 1, 0, {layer: [0] * 4 + [100] * 4 for layer in LAYERS}, now=1.0)
    assert r.phase == "idle" and r.imbalance(1.0) == 1.0 and r.measured_imbalance(1.0) == 1.0
    r.expert_report("c", 1, 0, {1: [0] * 4 + [50] * 4}, now=2.0)  # a second replica of group 1
    assert abs(r.measured_imbalance(2.0) - (600 + 400) / (500 + 400)) < 1e-9
    assert r.phase == "idle"  # 1.11 is under the threshold


def test_a_skewed_load_goes_through_prepare_and_switch_to_a_balanced_map():
    r = _rebalancer()
    assert r.expert_report("a", 0, 0, _hot(), now=0.0).commit  # idle: hold the published map
    assert r.phase == "idle"  # group 1 has not reported: no decision on half the picture
    first = r.expert_report("b", 1, 0, {}, now=0.1)
    assert r.phase == "prepare" and r.target.version == 1
    assert (first.version, first.commit) == (1, False)
    assert r.history[0]["imbalance_before"] > 1.9 and r.history[0]["imbalance_predicted"] < 1.1
    # Prepare: each group is told to load its share of the target, keeping what it has.
    b = r.expert_report("b", 1, 0, {}, now=1.0)
    assert b == first
    assert all(0 in ids and 1 in ids for ids in b.holdings.values())  # copies of the hot pair
    assert r.attention_report("x", 0, now=1.0).version == 0  # not published yet
    r.attention_report("y", 0, now=1.0)
    r.expert_report("a", 0, 1, _hot(), now=2.0)
    assert r.phase == "prepare"  # b has not prepared yet
    r.expert_report("b", 1, 1, {}, now=2.5)
    assert r.phase == "switch" and r.published.version == 1
    # Switch: attention replicas adopt it; experts keep both maps' experts meanwhile.
    assert r.expert_report("a", 0, 1, _hot(), now=3.0).commit is False
    assert r.attention_report("x", 1, now=3.5).version == 1
    assert r.phase == "switch"  # waits for y, which still dispatches with version 0
    r.attention_report("y", 0, now=3.6)
    assert r.phase == "switch"
    r.attention_report("y", 1, now=4.0)
    assert r.phase == "idle" and r.history[0]["switched"] == 4.0
    done = r.expert_report("a", 0, 1, _hot(), now=4.5)
    assert done.commit and done.holdings == r.published.group_holdings(0, LAYERS)
    assert r.imbalance(4.5) < 1.1
    for replica, group in (("a", 0), ("b", 1)):  # each group now serves half the hot slots
        r.expert_report(
            replica, group, 1, {layer: [50, 50, 1, 1, 1, 1, 1, 1] for layer in LAYERS}, now=5.0
        )
    assert r.measured_imbalance(5.0) == 1.0


def test_gone_replicas_are_not_waited_for_and_rebalances_are_spaced():
    r = _rebalancer()
    r.expert_report("gone", 1, 0, {}, now=0.0)
    r.expert_report("a", 0, 0, _hot(), now=0.0)
    r.attention_report("dead", 0, now=0.0)
    assert r.phase == "prepare"
    r.expert_report("a", 0, 1, _hot(), now=20.0)  # "gone" last reported 20 s ago
    assert r.phase == "switch"
    r.attention_report("x", 1, now=21.0)  # "dead" is stale too
    assert r.phase == "idle"
    # The load moves to two experts that only group 0 holds: a new rebalance, but only 30 s
    # after the last one began.
    only_in_0 = [e for e in r.published.holdings(1)[0] if e not in r.published.holdings(1)[1]]
    moved = {layer: [100 if e in only_in_0[:2] else 1 for e in range(8)] for layer in LAYERS}
    r.experts.clear()
    r.expert_report("b", 1, 1, {}, now=25.0)
    r.expert_report("a", 0, 1, moved, now=25.0)
    assert r.imbalance(25.0) > CONFIG.threshold and r.phase == "idle"
    r.expert_report("a", 0, 1, moved, now=31.0)
    assert r.phase == "prepare" and r.target.version == 2


def test_a_new_replica_loads_the_published_map():
    r = _rebalancer()
    assert r.initial_holdings(1) == (0, {1: (4, 5, 6, 7), 2: (4, 5, 6, 7)})


def test_a_restarted_balancer_walks_the_cluster_back_safely():
    """Replicas still hold and dispatch with version 7 (from a balancer that died); the new one
    numbers its maps from its epoch and prepares before anyone drops an expert."""
    initial = ExpertMap.of(ExpertPlacement.contiguous(8, 2))
    r = Rebalancer.starting(initial, LAYERS, CONFIG, epoch=1_000)
    assert (r.phase, r.published.version, r.target.version) == ("prepare", 1_000, 1_000)
    assert r.initial_holdings(0) == (1_000, {1: (0, 1, 2, 3), 2: (0, 1, 2, 3)})
    a = r.expert_report("a", 0, 7, _hot(), now=0.0)
    assert (a.version, a.commit) == (1_000, False)  # load the initial map's experts, keep all
    r.attention_report("x", 7, now=0.0)
    r.expert_report("b", 1, 7, {}, now=0.1)
    assert r.phase == "prepare"
    r.expert_report("a", 0, 1_000, _hot(), now=1.0)
    r.expert_report("b", 1, 1_000, {}, now=1.0)
    assert r.phase == "switch"
    assert r.attention_report("x", 7, now=1.5).version == 1_000  # x adopts it (a newer one)
    assert not r.expert_report("a", 0, 1_000, _hot(), now=1.6).commit  # x may still use v7
    r.attention_report("x", 1_000, now=2.0)
    assert r.phase == "idle" and r.expert_report("a", 0, 1_000, {}, now=2.1).commit
    assert r.history == [{"version": 1_000, "started": None, "reason": "start", "switched": 2.0}]
