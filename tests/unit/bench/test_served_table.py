"""bench/served.py's table: the ratio rows it prints under the systems' rows."""

from __future__ import annotations

import pytest

from bench.served import table


def level(tok_s: float, tpot_p50_ms: float) -> dict:
    return {
        "out_tok_s": tok_s,
        "ttft_p50_ms": 10.0,
        "ttft_p99_ms": 20.0,
        "tpot_p50_ms": tpot_p50_ms,
        "tpot_p99_ms": tpot_p50_ms + 1,
    }


def test_the_one_stream_gap_is_split_into_the_idle_servers_part_and_the_rest():
    results = {
        "ours": {"levels": {1: level(33.5, 26.5)}},
        "engine": {"levels": {1: level(37.0, 24.0)}},
        "engine-beside": {"levels": {1: level(36.2, 24.4)}},
    }
    text, ratios = table(results, [1])
    assert ratios["1"]["tpot_p50_ms_ours_minus_engine"] == pytest.approx(2.5)
    assert ratios["1"]["tpot_p50_ms_engine_beside_minus_engine"] == pytest.approx(0.4)
    assert "| in-process beside idle server | 1 | 36.2 |" in text
    assert "| in-process beside idle server - in-process | 1 | | | | +0.40 | |" in text
    # ours is compared with the in-process engine alone, never with the one beside a server
    assert ratios["1"]["ours/engine_tok_s"] == pytest.approx(33.5 / 37.0, abs=1e-3)
    assert not any("ours/engine-beside" in k for k in ratios["1"])


def test_without_the_beside_run_there_is_no_split_row():
    results = {
        "ours": {"levels": {1: level(33.5, 26.5)}},
        "engine": {"levels": {1: level(37.0, 24.0)}},
    }
    text, ratios = table(results, [1])
    assert "beside" not in text
    assert "tpot_p50_ms_engine_beside_minus_engine" not in ratios["1"]
