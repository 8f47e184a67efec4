"""cluster.cpus: the cores thread pools are sized by, capped by a cgroup CPU quota (a pod's
CPU limit)."""

from __future__ import annotations

import pytest

from cluster.cpus import node_cpus, quota_cpus, usable_cpus


@pytest.mark.parametrize(
    "files, cpus",
    [
        ({"cpu_max": "max 100000\n"}, None),
        ({"cpu_max": "200000 100000\n"}, 2.0),
        ({"cpu_max": "150000 100000"}, 1.5),
        ({"cpu_max": "garbage"}, None),
        ({"cfs_quota_us": "-1\n", "cfs_period_us": "100000\n"}, None),
        ({"cfs_quota_us": "400000\n", "cfs_period_us": "100000\n"}, 4.0),
        ({}, None),
    ],
)
def test_quota_from_cgroup_v2_and_v1_files(files, cpus):
    assert quota_cpus(**files) == cpus


def test_usable_cpus_are_the_allowed_ones_capped_by_the_quota_rounded_up():
    assert usable_cpus(64, None) == 64  # no limit: every allowed CPU
    assert usable_cpus(64, 4.0) == 4  # a pod limited to 4 CPUs on a 64-core node
    assert usable_cpus(64, 1.5) == 2
    assert usable_cpus(2, 8.0) == 2  # a quota above the allowed CPUs does not add any
    assert usable_cpus(8, 0.25) == 1


def test_node_cpus_on_this_machine_is_within_what_it_may_use():
    import os

    assert 1 <= node_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("usable, owns", [(4, True), (2, False)])
def test_a_process_owns_its_cores_unless_a_quota_is_narrower(monkeypatch, usable, owns):
    """Four cores to run on: a quota of 2 means they are shared (no binding to some of them)."""
    import os

    from cluster import cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpus, "node_cpus", lambda: usable)
    assert cpus.owns_its_cores() is owns
