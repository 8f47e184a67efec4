"""The expert replica's health check bounds its wait on the worker itself: Serve's first check
of a new replica (before it counts as started) has no timeout of its own, so a worker that
froze then left the replica starting for good. Fake workers here; the fault tier freezes a
real one (tests/faults/test_expert_freeze.py)."""

from __future__ import annotations

import asyncio

import pytest

from cluster.deployments.expert_group import ExpertGroupDeployment

ExpertGroupReplica = ExpertGroupDeployment.func_or_class


class _Worker:
    """A worker actor handle whose ``ready.remote()`` answers at once, or never (frozen)."""

    def __init__(self, answers: bool):
        self.answers, self.ready = answers, self

    def remote(self):
        answer = asyncio.get_running_loop().create_future()
        if self.answers:
            answer.set_result(True)
        return answer


def _replica(worker, timeout_s: float):
    replica = object.__new__(ExpertGroupReplica)  # the attributes check_health reads
    replica.worker, replica.group_id, replica.answer_timeout_s = worker, 1, timeout_s
    return replica


def _check(replica):
    # the outer bound turns a check that never returns into a failure, not a hung test
    return asyncio.run(asyncio.wait_for(replica.check_health(), 30))


def test_a_worker_that_answers_passes():
    assert _check(_replica(_Worker(answers=True), 0.2)) is None


def test_a_frozen_worker_fails_the_check_within_the_timeout():
    with pytest.raises(RuntimeError, match=r"expert group 1's worker did not answer .* 0\.2 s"):
        _check(_replica(_Worker(answers=False), 0.2))


def test_without_a_worker_the_replica_holds_its_experts_and_passes():
    assert _check(_replica(None, 0.2)) is None
