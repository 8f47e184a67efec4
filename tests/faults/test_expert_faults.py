"""Expert workers lost on the fault tier's cluster (tests/faults/conftest.py: 2 groups of 2
replicas), each under 16 concurrent greedy streams: a worker process SIGKILLed, and every
replica of one group killed at once (a group with no replica left until Serve starts new
ones). Every stream returns the colocated output or ends UNAVAILABLE (retryable) within a
bounded time, none hangs, and the cluster serves new requests afterwards."""

from __future__ import annotations

import os
import signal

import pytest
import ray
from ray.util.state import list_actors

from cluster.deployments.expert_transport import WORKER_NAMESPACE
from tests.faults.conftest import (
    expert_workers,
    full_or_unavailable,
    serves_again,
    under_streams,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def test_sigkill_of_an_expert_worker_process(nodes, reference, report):
    ps, want = reference
    (name, *_) = expert_workers(1)
    pid = ray.get(ray.get_actor(name, namespace=WORKER_NAMESPACE).pid.remote())
    results, took = under_streams(nodes.address, ps, lambda: os.kill(pid, signal.SIGKILL))
    lost = full_or_unavailable(results, want)
    report(
        f"expert worker SIGKILLed under {len(ps)} streams: {len(ps) - len(lost)} full "
        f"outputs, {len(lost)} UNAVAILABLE, all ended {took:.1f} s after the kill"
    )
    serves_again(nodes.address, ps[:4], want[:4])

    def replaced():  # the dead worker's replica was replaced: 2 again
        workers = expert_workers(1)
        return len(workers) == 2 and name not in workers

    wait_until(replaced, 120, "the dead worker's replica replaced", lambda: expert_workers(1))


def test_every_replica_of_a_group_killed(nodes, reference, report):
    """Both replicas of group 0 (and so both its workers) are killed at once: its layer calls
    wait for the replicas Serve starts in their place, within the call budget."""
    ps, want = reference
    replicas = [
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if a.class_name == "ServeReplica:exaone:ExpertGroup-0"
    ]
    assert len(replicas) == 2, replicas

    def kill_all():
        for a in replicas:
            ray.kill(ray.get_actor(a.name, namespace="serve"), no_restart=True)

    results, took = under_streams(nodes.address, ps, kill_all)
    lost = full_or_unavailable(results, want)
    report(
        f"every replica of a group killed under {len(ps)} streams: "
        f"{len(ps) - len(lost)} full outputs, {len(lost)} UNAVAILABLE, "
        f"all ended {took:.1f} s after the kill"
    )
    serves_again(nodes.address, ps[:4], want[:4])
