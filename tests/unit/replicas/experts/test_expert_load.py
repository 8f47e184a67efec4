"""Expert load over a sliding window (replicas/experts/expert_load.py), on a fake clock."""

from __future__ import annotations

import pytest
import torch

from replicas.experts.expert_load import LoadWindow


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_counts_per_layer_and_expert_within_the_window():
    clock = Clock()
    w = LoadWindow([1, 3], num_experts=4, window_s=10.0, num_buckets=5, clock=clock)
    w.add(1, torch.tensor([0, 0, 2]))
    w.add(3, torch.tensor([[3, 3], [3, 1]]))
    assert w.counts().tolist() == [[2, 0, 1, 0], [0, 1, 0, 3]]
    clock.now += 4.0
    w.add(1, torch.tensor([2]))
    assert w.counts().tolist() == [[2, 0, 2, 0], [0, 1, 0, 3]]
    clock.now += 7.0  # the first counts (11 s old) have left; the later ones (7 s) have not
    assert w.counts().tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    clock.now += 20.0
    assert w.counts().tolist() == [[0] * 4, [0] * 4]
    with pytest.raises(KeyError, match="layer 2"):
        w.add(2, torch.tensor([0]))


def test_tokens_per_second_is_per_layer_over_the_time_covered():
    clock = Clock()
    w = LoadWindow([0, 1], num_experts=2, window_s=10.0, num_buckets=5, clock=clock)
    clock.now += 2.0  # 2 s since start: the rate is over 2 s, not the whole window
    w.add(0, torch.tensor([0] * 8), busy_s=0.5)
    w.add(1, torch.tensor([1] * 8), busy_s=0.5)
    assert w.tokens_per_s() == pytest.approx(8 / 2) and w.busy() == pytest.approx(1 / 2)
    clock.now += 6.0
    assert w.tokens_per_s() == pytest.approx(8 / 8) and w.busy() == pytest.approx(1 / 8)
    clock.now += 30.0
    assert w.tokens_per_s() == 0.0 and w.busy() == 0.0
    assert LoadWindow([], 2, clock=clock).tokens_per_s() == 0.0


def test_a_reused_bucket_starts_from_zero():
    clock = Clock()
    w = LoadWindow([0], num_experts=1, window_s=4.0, num_buckets=2, clock=clock)
    for _ in range(3):
        w.add(0, torch.tensor([0, 0]))
        clock.now += 4.0  # exactly a window later the same bucket slot comes round again
    w.add(0, torch.tensor([0]))
    assert w.counts().tolist() == [[1]]
