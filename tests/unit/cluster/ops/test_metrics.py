"""The pure parts of cluster/ops/metrics.py and the imbalance figure it exports (the recorders
themselves run in the integration tier, which reads them back from Ray's Prometheus endpoint)."""

from __future__ import annotations

import pytest

from cluster.ops.balancer import busiest_over_mean as group_imbalance
from cluster.ops.metrics import _Totals


def test_group_imbalance_is_busiest_over_mean_summed_over_layers():
    assert group_imbalance([[10, 10], [5, 5]]) == 1.0
    assert group_imbalance([[30, 10], [10, 10]]) == pytest.approx((30 + 10) / (20 + 10))
    assert group_imbalance([[0, 0]]) == 1.0 and group_imbalance([]) == 1.0


class _Counter:
    def __init__(self, name: str):
        self.info, self.incs = {"name": name}, []

    def inc(self, value, tags):
        self.incs.append((value, tags))


def test_counters_fed_from_totals_get_only_the_increments():
    totals, hits = _Totals(), _Counter("hits")
    totals.add(hits, 5, {"replica": "a"})
    totals.add(hits, 5, {"replica": "a"})  # unchanged: nothing
    totals.add(hits, 8, {"replica": "a"})
    totals.add(hits, 2, {"replica": "b"})  # another series
    assert hits.incs == [(5, {"replica": "a"}), (3, {"replica": "a"}), (2, {"replica": "b"})]
