"""``exaone-cluster status``'s rendering (cluster/commands/status.py); the integration tier runs it
against a live cluster."""

from __future__ import annotations

import os

from cluster.commands.status import _ranges, _size, render


def test_expert_ids_print_as_ranges():
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert _ranges([3]) == "3" and _ranges([]) == ""


def test_sizes_print_in_binary_units():
    assert _size(0) == "0 B" and _size(1023) == "1023 B"
    assert _size(1536) == "1.5 KiB" and _size(3 << 20) == "3.0 MiB"
    assert _size(5 << 30) == "5.0 GiB" and _size(2048 << 40) == "2048.0 TiB"


def test_render_lists_deployments_replicas_placement_and_load():
    found = {
        "applications": {
            "exaone": {
                "status": "RUNNING",
                "deployments": {
                    "AttentionShard": {"status": "HEALTHY", "replicas": {"RUNNING": 2}},
                    "ExpertGroup-0": {
                        "status": "UPSCALING",
                        "replicas": {"RUNNING": 1, "STARTING": 1},
                        "expert_replicas": [
                            {
                                "replica": "abc",
                                "experts": [0, 1, 2, 3],
                                "tokens_per_s": 812.5,
                                "busy": 0.43,
                                "ready_s": 1.25,
                                "map_version": 2,
                                "kernels": "triton",
                                "resident_bytes": 3 << 19,
                                "weight_dtype": "bfloat16",
                            }
                        ],
                    },
                    "ExpertBalancer": {
                        "status": "HEALTHY",
                        "replicas": {"RUNNING": 1},
                        "balancer": {
                            "version": 2,
                            "phase": "idle",
                            "measured_imbalance": 1.04,
                            "imbalance": 1.01,
                            "history": [{}, {}],
                            "holdings": {1: [[0, 1, 2], [0, 3]]},
                        },
                    },
                },
            }
        }
    }
    text = render(found)
    assert "application exaone: RUNNING" in text
    assert "AttentionShard   HEALTHY    replicas: 2 running" in text
    assert "replicas: 1 running, 1 starting" in text
    assert "experts 0-3" in text and "812.5 tok/s" in text and "busy 43%" in text
    assert "map v2  triton kernels  holds 1.5 MiB bfloat16" in text
    assert "map v2 (idle), imbalance measured 1.04, predicted 1.01, 2 rebalance(s)" in text
    assert "layer 1: g0: 0-2  g1: 0,3" in text


def test_status_connects_to_loopback_as_serve_does(monkeypatch, capsys):
    """Linux Ray swaps 127.0.0.1 for the host's IP when connecting, unless this is set as
    `serve` sets it; a cluster bound to loopback was then unreachable (found by hand: status
    retried for minutes outside a loopback-only network namespace)."""
    import argparse

    import ray

    from cluster.commands import status as status_cmd

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    seen = {}

    def init(**kwargs):
        seen["env"] = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        raise ConnectionError("no cluster")

    monkeypatch.setattr(ray, "init", init)
    assert status_cmd.run(argparse.Namespace(address="auto", json=False)) == 2
    assert seen["env"] == "0"
    assert "is `exaone-cluster serve` running?" in capsys.readouterr().err
