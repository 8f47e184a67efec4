"""Attention replicas scaled down while streams longer than the grace period run, on the fault
tier's cluster (tests/faults/conftest.py), the way an operator scales: a declarative Serve
config (what KubeRay applies from the chart's serveConfigV2) whose AttentionShard
``num_replicas`` goes from 2 to 1. Serve stops one replica in place (nothing else restarts),
waiting ``attention.graceful_shutdown_timeout_s`` (1 s here) for its streams; the streams it
cuts end UNAVAILABLE (retryable), the others return the colocated output, none hangs, and the
application serves new requests afterwards."""

from __future__ import annotations

import pytest
from ray import serve

from cluster.config import ClusterConfig
from tests.faults.conftest import (
    deploy_app,
    full_or_unavailable,
    replica_states,
    stream_all,
    under_streams,
    wait_until,
)
from tests.integration.conftest import colocated_reference, free_port

pytestmark = [pytest.mark.integration, pytest.mark.faults]

APP = "scaled"
LONG = 1000  # new tokens per stream: seconds longer than the grace period


def test_scaling_attention_down_under_long_streams(nodes, tiny_ckpt, report):
    ps, want = colocated_reference(
        tiny_ckpt, seed=13, num_prompts=16, max_len=40, new_tokens=LONG, max_model_len=1100
    )
    port = free_port()
    config = ClusterConfig(
        model_path=str(tiny_ckpt),
        engine={
            "max_num_seqs": 16,
            "max_num_batched_tokens": 128,
            "block_size": 8,
            "kv_cache_bytes": 64 << 20,
            "max_model_len": 1100,
        },
        prefix_cache={"enabled": False},
        router={"resources": {"exaone_ingress": 1}, "grpc_host": "127.0.0.1", "grpc_port": port},
        attention={
            "num_replicas": 2,
            "num_cpus": 0.25,
            "num_threads": 1,
            "graceful_shutdown_timeout_s": 1.0,
        },
    )
    address = f"127.0.0.1:{port}"
    deploy_app(APP, config, 2)
    try:

        def ready():
            running = replica_states(APP, "AttentionShard").get("RUNNING") == 2
            return running and serve.status().applications[APP].status == "RUNNING"

        wait_until(ready, 300, "2 replicas")
        routers = replica_states(APP, "Router")

        def scale_down():
            deploy_app(APP, config, 1)

        results, took = under_streams(address, ps, scale_down, timeout_s=300, new_tokens=LONG)
        lost = full_or_unavailable(results, want)
        assert lost, "the stopped replica's streams outlived the grace period"
        assert len(lost) < len(ps), "the other replica's streams went on"
        wait_until(lambda: replica_states(APP, "AttentionShard") == {"RUNNING": 1}, 60, "1 replica")
        assert replica_states(APP, "Router") == routers  # scaled in place: the Router kept running
        again = stream_all(address, ps[:4], new_tokens=LONG)
        assert [again[i] for i in range(4)] == want[:4]
        report(
            f"attention scaled 2 -> 1 under {len(ps)} streams of {LONG} tokens (grace 1 s): "
            f"{len(ps) - len(lost)} full outputs, {len(lost)} UNAVAILABLE, all ended "
            f"{took:.1f} s after the scale-down was applied"
        )
    finally:
        serve.delete(APP)
