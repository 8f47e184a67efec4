"""One of two attention replicas frozen (SIGSTOP: how a hung node or a stopped process looks to
the rest of the cluster; its sockets stay open and the kernel still accepts connections), on
the fault tier's cluster (tests/faults/conftest.py), in an application of its own. Serve keeps
a frozen replica in its set until three health checks have failed, so the router must stop
sending it requests itself: the first request it sends there waits out the submit timeout and
is served by the other replica; the ones after it go to the other replica at once
(router.unresponsive), and every output is the colocated engine's."""

from __future__ import annotations

import os
import signal
import time

import pytest
from ray import serve

from cluster.config import ClusterConfig
from cluster.deployments.shard_client import SUBMIT_TIMEOUT_S
from router.client import GenerationClient
from tests.faults.conftest import deploy_app, replica_pids, replica_states, wait_until
from tests.integration.conftest import colocated_reference, free_port

pytestmark = [pytest.mark.integration, pytest.mark.faults]

APP = "frozen"
NEW_TOKENS = 8


def _direct_submits() -> int:
    counts = serve.get_deployment_handle("Router", APP).submit_counts.remote().result()
    return counts["direct"]


def test_one_of_two_attention_replicas_frozen_costs_one_request_the_submit_timeout(
    nodes, tiny_ckpt, report
):
    ps, want = colocated_reference(
        tiny_ckpt, seed=19, num_prompts=12, max_len=40, new_tokens=NEW_TOKENS
    )
    port = free_port()
    config = ClusterConfig(
        model_path=str(tiny_ckpt),
        engine={"max_num_seqs": 8, "block_size": 8, "kv_cache_bytes": 16 << 20},
        prefix_cache={"enabled": False},
        router={"resources": {"exaone_ingress": 1}, "grpc_host": "127.0.0.1", "grpc_port": port},
        attention={"num_replicas": 2, "num_cpus": 0.25, "num_threads": 1},
    )
    address = f"127.0.0.1:{port}"
    deploy_app(APP, config, 2)
    pid = None
    try:

        def ready():
            running = replica_states(APP, "AttentionShard").get("RUNNING") == 2
            return running and serve.status().applications[APP].status == "RUNNING"

        wait_until(ready, 300, "2 replicas")
        with GenerationClient(address, timeout_s=120) as client:

            def generate(prompt):
                return client.generate(
                    token_ids=prompt, temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True
                ).token_ids

            # Until both replicas have told Serve their step streams, Serve chooses for the
            # router; from then on the router submits to the replica it chooses.
            def submits_directly():
                before = _direct_submits()
                assert generate(ps[0]) == want[0]
                return _direct_submits() > before

            wait_until(submits_directly, 120, "the router submitting directly")
            pid = replica_pids(APP, "AttentionShard")[0]
            os.kill(pid, signal.SIGSTOP)
            took = []
            for prompt, expected in zip(ps, want, strict=True):
                start = time.monotonic()
                assert generate(prompt) == expected
                took.append(time.monotonic() - start)
        waited = [t for t in took if t >= SUBMIT_TIMEOUT_S / 2]
        assert len(waited) <= 1, f"requests that waited at the frozen replica: {took}"
        report(
            f"1 of 2 attention replicas frozen: {len(ps)} sequential requests all served, "
            f"{len(waited)} waited the {SUBMIT_TIMEOUT_S:g} s submit timeout "
            f"({max(took):.1f} s), the rest {sorted(took)[len(took) // 2]:.2f} s p50"
        )
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        serve.delete(APP)
