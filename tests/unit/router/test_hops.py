"""router.hops: per-hop latencies from step-stream batch times and router deliveries."""

from __future__ import annotations

from router.hops import HopStats


def test_batches_and_router_hops_summarise_recent_samples():
    seen = []
    hops = HopStats(lambda hop, s: seen.append((hop, round(s, 6))), keep=100, observe_interval_s=0)
    for i in range(200):  # step end 1.000, sent +1 ms (+i us), received +3 ms
        hops.batch(1000.0, 1000.001 + i * 1e-6, 1000.004 + i * 1e-6)
        hops.observe("router", 0.002)
    hops.batch(0.0, 0.0, 5.0)  # a batch without times (an older replica): ignored
    s = hops.summary()
    assert s["engine_to_publish"]["n"] == 100  # the most recent 100 only
    assert 1.1 < s["engine_to_publish"]["p50_ms"] < 1.2  # i in 100..199
    assert abs(s["publish_to_router"]["p99_ms"] - 3.0) < 1e-6
    assert s["router"]["mean_ms"] == 2.0
    assert len(seen) == 600 and seen[0] == ("engine_to_publish", 0.001)
    hops.clear()
    assert hops.summary() == {}


def test_the_observer_sees_at_most_one_sample_per_interval_of_each_hop():
    seen, now = [], [100.0]
    hops = HopStats(
        lambda hop, s: seen.append((hop, s)), observe_interval_s=0.1, clock=lambda: now[0]
    )
    for i in range(20):  # 20 samples 10 ms apart: the observer sees those 100 ms apart
        hops.observe("router", float(i))
        now[0] += 0.01
    hops.observe("engine_to_publish", 7.0)  # each hop has its own interval
    assert seen == [("router", 0.0), ("router", 10.0), ("engine_to_publish", 7.0)]
    assert hops.summary()["router"]["n"] == 20  # the local percentiles keep every sample
