"""bench.loadgen's rows and rounds (what bench/served.py --rounds merges)."""

from __future__ import annotations

import pytest

from bench.loadgen import Stream, Workload, merge, summarize


def stream(start: float, arrivals: list[float]) -> Stream:
    s = Stream(start=start)
    s.tokens = len(arrivals)
    s.messages = len(arrivals)
    s.first, s.last = arrivals[0], arrivals[-1]
    return s


def test_a_row_keeps_every_requests_ttft_and_tpot():
    row = summarize([stream(0.0, [0.1, 0.2, 0.3]), stream(1.0, [1.3, 1.5])], wall_s=2.0)
    assert row["ttft_ms"] == pytest.approx([100.0, 300.0])
    assert row["tpot_ms"] == pytest.approx([100.0, 200.0])
    assert (row["requests"], row["out_tokens"], row["out_tok_s"]) == (2, 5, 2.5)
    assert row["ttft_p50_ms"] == pytest.approx(200.0)


def test_merged_rounds_pool_requests_and_sum_tokens_and_time():
    a = summarize([stream(0.0, [0.1, 0.2]), stream(0.0, [0.2, 0.3])], wall_s=1.0)
    b = summarize([stream(0.0, [0.4, 0.7, 1.0])], wall_s=3.0)
    row = merge([a, b])
    assert row["requests"] == 3 and row["out_tokens"] == 7 and row["messages"] == 7
    assert row["wall_s"] == 4.0 and row["out_tok_s"] == pytest.approx(7 / 4)
    assert row["tpot_ms"] == pytest.approx([100.0, 100.0, 300.0])
    assert row["tpot_p50_ms"] == pytest.approx(100.0)  # over all three, not a mean of medians
    assert row["ttft_ms"] == pytest.approx([100.0, 200.0, 400.0])


def test_rounds_deal_out_each_levels_requests_once():
    prompts = {1: [[i] for i in range(10)], 8: [[100 + i] for i in range(16)]}
    work = Workload([1, 8], prompts, {1: [[7]], 8: [[9]] * 8}, new_tokens=4, warmup_tokens=2)
    parts = work.rounds(3)
    assert len(parts) == 3
    for c in (1, 8):
        dealt = [p for part in parts for p in part.prompts[c]]
        assert sorted(dealt) == sorted(prompts[c])
        assert (
            max(len(part.prompts[c]) for part in parts)
            - min(len(part.prompts[c]) for part in parts)
            <= 1
        )
    assert all(part.warmup == work.warmup and part.new_tokens == 4 for part in parts)
    assert work.rounds(1)[0].prompts == prompts
