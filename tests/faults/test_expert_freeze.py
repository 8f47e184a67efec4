"""An expert worker frozen for good (SIGSTOP: a hung process or node, its sockets open), on the
fault tier's cluster (tests/faults/conftest.py: 2 groups of 2 replicas). The layer calls it
holds go to its group's other replica after ``attempt_timeout_s``, so every stream returns the
colocated output; its replica's health check (the worker's ``ready``) goes unanswered, so Serve
replaces the replica within ``experts.health_check_timeout_s``'s three failed checks, the frozen
process goes with it, and the group has two live workers again."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import ray

from cluster.deployments.expert_transport import WORKER_NAMESPACE
from tests.faults.conftest import (
    APP,
    expert_workers,
    full_or_unavailable,
    replica_states,
    serves_again,
    under_streams,
    wait_until,
)
from tests.integration.conftest import process_gone

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def test_a_frozen_expert_worker_is_replaced(nodes, reference, report):
    ps, want = reference
    (name, *_) = expert_workers(0)
    pid = ray.get(ray.get_actor(name, namespace=WORKER_NAMESPACE).pid.remote())
    frozen_at = 0.0

    def freeze():
        nonlocal frozen_at
        frozen_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)

    try:
        results, took = under_streams(nodes.address, ps, freeze)
        assert full_or_unavailable(results, want) == []  # the group's other worker served

        def replaced():
            workers = expert_workers(0)
            return len(workers) == 2 and name not in workers and process_gone(pid)

        def state():
            alive = "gone" if process_gone(pid) else "alive"
            return f"workers {expert_workers(0)}, {name}'s process {alive}, replicas " + str(
                replica_states(APP, "ExpertGroup-0")
            )

        wait_until(replaced, 180, "the frozen worker's replica replaced", state)
        replaced_after = time.monotonic() - frozen_at
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone once its replica was replaced
            os.kill(pid, signal.SIGCONT)
    report(
        f"expert worker frozen under {len(ps)} streams: all {len(ps)} outputs full, done "
        f"{took:.1f} s after the freeze; its replica replaced (the process gone, 2 workers "
        f"again) {replaced_after:.1f} s after it"
    )
    serves_again(nodes.address, ps[:4], want[:4])
