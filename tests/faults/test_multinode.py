"""Placement on the fault tier's nodes (tests/faults/conftest.py), and the loss of a whole
expert node under 16 streams: every stream returns the colocated output or ends UNAVAILABLE
(retryable), none hangs, and the cluster serves new requests afterwards. (This module runs
last: it removes a node.)"""

from __future__ import annotations

import pytest

from tests.faults.conftest import full_or_unavailable, serves_again, stream_all, under_streams

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def _actors_by_node() -> dict[str, set[str]]:
    """class name (Serve replicas: their deployment) -> node ids of its live actors."""
    from ray.util.state import list_actors

    found: dict[str, set[str]] = {}
    for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        name = a.class_name
        if name.startswith("ServeReplica:"):
            name = name.split(":")[-1]
        found.setdefault(name, set()).add(a.node_id)
    return found


def test_each_deployment_runs_on_its_nodes_and_greedy_equals_colocated(nodes, reference):
    ps, want = reference
    results = stream_all(nodes.address, ps[:8])
    assert [results[i] for i in range(8)] == want[:8]
    where = _actors_by_node()
    node_id = {role: {n.node_id for n in ns} for role, ns in nodes.roles.items()}
    assert where["Router"] == {nodes.cluster.head_node.node_id}
    assert where["AttentionShard"] <= node_id["attention"]
    assert where["ExpertWorker"] <= node_id["experts"] and len(where["ExpertWorker"]) >= 1


def test_losing_an_expert_node_loses_no_request(nodes, reference, report):
    """A whole expert node is removed (its raylet and every process on it killed) while 16
    streams run: Serve puts the lost replicas' workers on the other expert node."""
    ps, want = reference
    from ray.util.state import list_actors

    workers = [
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if a.class_name == "ExpertWorker"
    ]
    busy = {a.node_id for a in workers}
    victim = next(n for n in nodes.roles["experts"] if n.node_id in busy)

    def remove():
        nodes.cluster.remove_node(victim, allow_graceful=False)

    results, took = under_streams(nodes.address, ps, remove)
    lost = full_or_unavailable(results, want)
    report(
        f"expert node removed under {len(ps)} streams: {len(ps) - len(lost)} full outputs, "
        f"{len(lost)} UNAVAILABLE, all ended {took:.1f} s after the removal"
    )
    serves_again(nodes.address, ps[:4], want[:4])
