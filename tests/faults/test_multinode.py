"""Several Ray nodes on one machine: the head (the Router, by the ``exaone_ingress`` resource),
one attention node (``attention_shard``) and two expert nodes (``expert_group``), as the Helm
chart lays them out. Greedy outputs over gRPC equal the colocated engine's, each deployment
runs on its nodes, and losing a whole expert node under 16 streams loses no request: every
stream returns the colocated output or ends UNAVAILABLE (retryable), none hangs, and the
cluster serves new requests afterwards."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve.config import HTTPOptions

from cluster.app import build_app
from cluster.config import ClusterConfig, EngineOptions
from cluster.local import wait_serving
from cluster.loopback import HOOK
from router.client import Completion, GenerationClient
from tests.integration.conftest import colocated_reference, free_port

pytestmark = [pytest.mark.integration, pytest.mark.faults]

NEW_TOKENS = 24
LOOPBACK = {"node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="module")
def nodes(served_ckpt):
    """-> (grpc address, {role: [node]}) once the application serves."""
    cluster = Cluster(initialize_head=True, head_node_args={
        **LOOPBACK, "num_cpus": 1, "resources": {"exaone_ingress": 4}})  # fmt: skip
    roles = {
        "attention": [cluster.add_node(**LOOPBACK, num_cpus=1, resources={"attention_shard": 2})],
        "experts": [cluster.add_node(**LOOPBACK, num_cpus=1, resources={"expert_group": 4})
                    for _ in range(2)],
    }  # fmt: skip
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1",
             runtime_env={"worker_process_setup_hook": HOOK},
             logging_level="WARNING", log_to_driver=False)  # fmt: skip
    port = free_port()
    config = ClusterConfig(
        model_path=str(served_ckpt),
        engine=EngineOptions(max_num_seqs=32, max_num_batched_tokens=128, block_size=8,
                             kv_cache_bytes=32 << 20, max_model_len=384),
        router={"resources": {"exaone_ingress": 1}, "grpc_host": "127.0.0.1", "grpc_port": port},
        attention={"num_cpus": 0.5, "num_threads": 1, "resources": {"attention_shard": 1}},
        experts={"num_groups": 2, "replicas_per_group": 2, "num_cpus": 0.25, "num_threads": 1,
                 "resources": {"expert_group": 1}, "attempt_timeout_s": 2,
                 "call_timeout_s": 60},
    )  # fmt: skip
    try:
        serve.start(proxy_location="HeadOnly",
                    http_options=HTTPOptions(host="127.0.0.1", port=free_port()))  # fmt: skip
        serve.run(build_app(config), name="exaone", route_prefix="/")
        address = f"127.0.0.1:{port}"
        wait_serving(address, 300)
        yield address, roles, cluster
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def reference(served_ckpt):
    return colocated_reference(served_ckpt, seed=11, num_prompts=16, max_len=60,
                               new_tokens=NEW_TOKENS)  # fmt: skip


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


def _stream_all(address: str, prompts) -> dict[int, object]:
    """Every prompt streamed at once -> {i: token ids, or the grpc.RpcError it ended with}."""
    results: dict[int, object] = {}

    def run(i, prompt):
        out = Completion()
        with GenerationClient(address, timeout_s=180) as c:
            try:
                for response in c.stream(token_ids=prompt, temperature=0.0,
                                         max_tokens=NEW_TOKENS, ignore_eos=True):  # fmt: skip
                    out.add(response)
                results[i] = out.token_ids
            except grpc.RpcError as e:
                results[i] = e

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    return results


def test_each_deployment_runs_on_its_nodes_and_greedy_equals_colocated(nodes, reference):
    address, roles, cluster = nodes
    ps, want = reference
    results = _stream_all(address, ps[:8])
    assert [results[i] for i in range(8)] == want[:8]
    where = _actors_by_node()
    node_id = {role: {n.node_id for n in ns} for role, ns in roles.items()}
    head = cluster.head_node.node_id
    assert where["Router"] == {head}
    assert where["AttentionShard"] <= node_id["attention"]
    assert where["ExpertWorker"] <= node_id["experts"] and len(where["ExpertWorker"]) >= 1


def test_losing_an_expert_node_loses_no_request(nodes, reference, report):
    """A whole expert node is removed (its raylet and every process on it killed) while 16
    streams run: each returns the colocated output or ends UNAVAILABLE; Serve puts the lost
    replicas' workers on the other expert node and new requests are served."""
    address, roles, cluster = nodes
    ps, want = reference
    from ray.util.state import list_actors

    workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
               if a.class_name == "ExpertWorker"]  # fmt: skip
    busy = {a.node_id for a in workers}
    victim = next(n for n in roles["experts"] if n.node_id in busy)
    results: dict[int, object] = {}
    runner = threading.Thread(target=lambda: results.update(_stream_all(address, ps)))
    runner.start()
    time.sleep(1.0)  # the streams are under way
    removed_at = time.monotonic()
    cluster.remove_node(victim, allow_graceful=False)
    runner.join(300)
    assert not runner.is_alive(), "a stream hung"
    took = time.monotonic() - removed_at
    lost = [i for i in range(len(ps)) if results.get(i) != want[i]]
    for i in lost:
        assert isinstance(results[i], grpc.RpcError), (i, results[i])
        assert results[i].code() == grpc.StatusCode.UNAVAILABLE, results[i].details()
    report(f"expert node removed under {len(ps)} streams: {len(ps) - len(lost)} full outputs, "
           f"{len(lost)} UNAVAILABLE, all ended {took:.1f} s after the removal")  # fmt: skip
    deadline = time.monotonic() + 180
    while True:  # served again once Serve has replaced the lost replicas
        again = _stream_all(address, ps[:4])
        if all(again[i] == want[i] for i in range(4)):
            break
        assert time.monotonic() < deadline, again
        time.sleep(2)
