"""Autoscaling policies (cluster/ops/autoscaling.py): the arithmetic, and the Serve adapters on a
stand-in for Serve's AutoscalingContext."""

from __future__ import annotations

from types import SimpleNamespace

from cluster.ops.autoscaling import (
    DOWNSCALE_HEADROOM,
    AttentionPolicy,
    ExpertGroupPolicy,
    attention_replicas,
    expert_group_replicas,
)


def test_expert_group_wants_replicas_for_its_tokens_and_its_busy_time():
    assert expert_group_replicas([], [], 1000, 0.7) == 1  # never below one
    assert expert_group_replicas([0.0, 0.0], [0.0, 0.0], 1000, 0.7) == 1
    assert expert_group_replicas([1000.0], [0.2], 1000, 0.7) == 1  # exactly on target
    assert expert_group_replicas([1500.0, 1500.0], [0.3, 0.3], 1000, 0.7) == 3  # tokens
    assert expert_group_replicas([100.0, 100.0], [0.95, 0.95], 1000, 0.7) == 3  # busy
    assert expert_group_replicas([900.0, 800.0], [0.5, 0.4], 1000, 0.7) == 2


def test_attention_wants_replicas_for_sequences_queue_and_kv():
    assert attention_replicas([], [], [], 32, 4, 0.8) == 1
    assert attention_replicas([40.0], [0.0], [0.1], 32, 4, 0.8) == 2
    assert attention_replicas([8.0, 8.0], [10.0, 3.0], [0.2, 0.2], 32, 4, 0.8) == 4
    assert attention_replicas([8.0], [0.0], [0.95], 32, 4, 0.8) == 2


def test_scale_down_keeps_headroom_so_a_load_near_the_target_does_not_flap():
    """Up as soon as the load exceeds what the current replicas carry; down only to a count
    with DOWNSCALE_HEADROOM (20%) of every replica's target to spare."""
    assert DOWNSCALE_HEADROOM == 0.2
    # A trickle of 50-65 slots/s against 60 per replica (the autoscaling test's, before):
    for load in (50.0, 55.0, 59.0, 65.0):
        assert expert_group_replicas([load / 2] * 2, [0.01] * 2, 60, 0.9, current=2) == 2
    assert expert_group_replicas([65.0], [0.01], 60, 0.9, current=1) == 2  # up at once
    assert expert_group_replicas([24.0, 24.0], [0.01] * 2, 60, 0.9, current=2) == 1  # <= 48
    assert expert_group_replicas([10.0] * 4, [0.01] * 4, 60, 0.9, current=4) == 1
    assert expert_group_replicas([50.0] * 4, [0.01] * 4, 60, 0.9, current=4) == 4  # 200 > 192
    assert expert_group_replicas([45.0] * 4, [0.01] * 4, 60, 0.9, current=4) == 4  # 180 > 144
    assert expert_group_replicas([35.0] * 4, [0.01] * 4, 60, 0.9, current=4) == 3  # 140 <= 144
    assert expert_group_replicas([0.0] * 3, [0.0] * 3, 60, 0.9, current=3) == 1  # idle: one
    assert attention_replicas([30.0, 0.0], [0.0] * 2, [0.1] * 2, 32, 4, 0.8, current=2) == 2
    assert attention_replicas([25.0, 0.0], [0.0] * 2, [0.1] * 2, 32, 4, 0.8, current=2) == 1


def _ctx(metrics, running=("a", "b"), target=2):
    return SimpleNamespace(
        aggregated_metrics=metrics, running_replicas=list(running), target_num_replicas=target
    )


def test_serve_adapters_read_the_replicas_reported_metrics():
    group = ExpertGroupPolicy(target_tokens_per_s=500.0, target_busy=0.5)
    ctx = _ctx({"tokens_per_s": {"a": 900.0, "b": 700.0}, "busy": {"a": 0.4, "b": 0.3}})
    assert group(ctx) == (4, {})
    assert group(_ctx({"tokens_per_s": {"a": 10.0}, "busy": {"a": 0.01}}, ["a"], 3)) == (1, {})
    assert group(_ctx({}, target=3)) == (3, {})  # nothing reported yet: keep the target
    assert group(_ctx(None, running=(), target=2)) == (2, {})
    attention = AttentionPolicy(target_running_seqs=4, target_waiting=2, target_kv_usage=0.5)
    ctx = _ctx(
        {
            "running_seqs": {"a": 4.0, "b": 4.0},
            "waiting": {"a": 3.0, "b": 3.0},
            "kv_usage": {"a": 0.3, "b": 0.3},
        }
    )
    assert attention(ctx) == (3, {})
